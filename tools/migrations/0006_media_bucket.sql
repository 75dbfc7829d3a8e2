-- Media bytes may live in an S3-compatible bucket instead (tools/media_bucket.py): such a row names
-- the bucket ('s3://bucket/prefix') and keeps no data; every row has exactly one of the two.
ALTER TABLE media_blobs ALTER COLUMN data DROP NOT NULL;
ALTER TABLE media_blobs ADD COLUMN bucket text;
ALTER TABLE media_blobs ADD CONSTRAINT media_blobs_bytes_somewhere CHECK ((data IS NULL) <> (bucket IS NULL));
