-- The media store (tools/media_store_pg.py): each content's bytes once, by sha256, and every
-- session's ids, shared by all replicas; a replica keeps only a local cache of the bytes.
CREATE TABLE media_blobs (
    sha256 text PRIMARY KEY,
    suffix text NOT NULL,  -- of the first file with these bytes; names the cached files
    size bigint NOT NULL,
    data bytea NOT NULL
);
-- out of line, uncompressed: images, audio and video are mostly compressed already
ALTER TABLE media_blobs ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE media (
    session text NOT NULL,
    media_id text NOT NULL,
    added bigint GENERATED ALWAYS AS IDENTITY,  -- the order a session's media were added in
    kind text NOT NULL,
    sha256 text NOT NULL REFERENCES media_blobs (sha256),
    suffix text NOT NULL,
    origin text NOT NULL,
    created double precision NOT NULL,  -- unix time
    meta jsonb NOT NULL,
    PRIMARY KEY (session, media_id)
);
CREATE INDEX media_by_session ON media (session, added);
CREATE INDEX media_by_sha256 ON media (sha256);

-- the last number handed out per session and kind (image-3 -> 3)
CREATE TABLE media_counters (
    session text NOT NULL,
    kind text NOT NULL,
    last integer NOT NULL,
    PRIMARY KEY (session, kind)
);
