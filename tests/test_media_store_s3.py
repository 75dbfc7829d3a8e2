"""Media bytes in an S3-compatible bucket, ids in Postgres: the Postgres store's behaviours again,
the bytes only in the bucket (once, checked when read back), objects removed with their last id,
a bucket that fails loses nothing, and two `signalgraph serve` replicas sharing media through it.

Real parts: PostgreSQL (the `postgres_url` fixture), moto's S3 server over HTTP (`s3_endpoint`),
boto3 as the client, real media files and real server processes.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import boto3
import httpx
import pytest
from test_media_store import allowed  # noqa: F401 - the shared fixture
from test_media_store_pg import (  # noqa: F401 - the Postgres store's tests, collected again with a bucket
    test_a_deleted_session_is_gone_for_every_replica,
    test_a_replica_with_an_empty_folder_serves_every_medium,
    test_add_file_stores_the_bytes_once_by_sha256,
    test_concurrent_adds_through_two_replicas_get_distinct_consecutive_ids,
    test_delete_session_keeps_blobs_other_sessions_use,
    test_eight_threads_adding_at_once_get_eight_ids,
    test_generated_media_always_get_new_ids_and_never_overwrite,
    test_listing_fills_the_cache_so_every_path_is_a_file,
    test_same_bytes_are_stored_once_and_keep_their_id_in_a_session,
    test_sessions_are_isolated,
    test_the_cache_is_written_once_and_refilled_when_cleared,
    test_the_same_user_bytes_through_either_replica_keep_one_id,
    test_uploaded_bytes,
)
from test_replicas import _free_port, send_picture
from test_replicas import replica as serving_replica

from models.errors import ConfigError, MediaError
from tools.database import Database
from tools.media_bucket import BucketUnavailableError, MediaBucket
from tools.media_store import MediaStore


@pytest.fixture
def bucket(media_bucket: str, s3_endpoint: str) -> MediaBucket:
    return MediaBucket(media_bucket, endpoint_url=s3_endpoint)


@pytest.fixture
def store(tmp_path: Path, allowed: Path, database: Database, bucket: MediaBucket):  # noqa: F811
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed], database=database, bucket=bucket) as s:
        yield s


@pytest.fixture
def replica_store(tmp_path: Path, allowed: Path, postgres_url: str, media_bucket: str, s3_endpoint: str):  # noqa: F811
    """A second server process: its own connections, bucket client and empty folder."""
    db = Database(postgres_url)
    with MediaStore(tmp_path / "replica", allowed_dirs=[allowed], database=db,
                    bucket=MediaBucket(media_bucket, endpoint_url=s3_endpoint)) as s:
        yield s
    db.close()


@pytest.fixture
def replica(replica_store):  # noqa: F811 - the collected tests' name for it
    return replica_store


def _objects(bucket: MediaBucket) -> dict[str, bytes]:
    client = bucket._client
    listed = client.list_objects_v2(Bucket=bucket.bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket.bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_the_bytes_live_in_the_bucket_once_and_not_in_the_database(store, bucket, database, allowed):  # noqa: F811
    red = store.add_file("s1", allowed / "red.png")
    store.add_file("s2", allowed / "red.png")
    store.add_generated("s1", "image", (allowed / "red.png").read_bytes(), ".png")
    key = f"signalgraph/blobs/{red.sha256[:2]}/{red.sha256}.png"
    assert _objects(bucket) == {key: (allowed / "red.png").read_bytes()}
    with database.connection() as conn:
        rows = conn.execute("SELECT data, bucket, size FROM media_blobs").fetchall()
    assert rows == [{"data": None, "bucket": bucket.url, "size": red.path.stat().st_size}]


def test_deleting_the_last_session_removes_the_object(store, replica, bucket, allowed):  # noqa: F811
    kept = store.add_file("s1", allowed / "red.png")
    store.add_file("s2", allowed / "red.png")
    gone = store.add_file("s2", allowed / "blue.png")
    assert len(_objects(bucket)) == 2
    replica.delete_session("s2")
    assert list(_objects(bucket)) == [f"signalgraph/blobs/{kept.sha256[:2]}/{kept.sha256}.png"]
    assert gone.sha256 not in str(_objects(bucket))
    assert replica.get("s1", kept.id).path.read_bytes() == (allowed / "red.png").read_bytes()


def test_an_altered_or_missing_object_is_a_typed_error(store, replica, bucket, allowed):  # noqa: F811
    red = store.add_file("s1", allowed / "red.png")
    key = bucket.key(red.sha256, ".png")
    bucket._client.put_object(Bucket=bucket.bucket, Key=key, Body=b"not the picture")
    with pytest.raises(MediaError, match="were altered; attach it again"):
        replica.get("s1", red.id)  # its cache is empty, so it reads the bucket
    bucket._client.delete_object(Bucket=bucket.bucket, Key=key)
    with pytest.raises(MediaError, match="are missing from"):
        replica.get("s1", red.id)
    assert store.get("s1", red.id).path.is_file()  # a replica that cached it still serves it


def test_a_bucket_that_fails_loses_nothing(tmp_path, allowed, database, store, postgres_url):  # noqa: F811
    before = store.add_file("s1", allowed / "red.png")
    down = MediaBucket(store._index.bucket.url, endpoint_url=f"http://127.0.0.1:{_free_port()}")
    with MediaStore(tmp_path / "down", allowed_dirs=[allowed], database=database, bucket=down) as broken:
        with pytest.raises(BucketUnavailableError, match="could not write to the media bucket"):
            broken.add_file("s1", allowed / "blue.png")
        with pytest.raises(BucketUnavailableError):
            down.check()
    # no id was used up and no row names bytes that were never stored
    assert [r.id for r in store.list("s1")] == [before.id]
    assert store.add_file("s1", allowed / "blue.png").id == "image-2"


def test_bad_bucket_settings_are_refused_in_words(tmp_path, allowed, s3_endpoint):  # noqa: F811
    with pytest.raises(ConfigError, match="write it as s3://BUCKET"):
        MediaBucket("https://example.com/media")
    with pytest.raises(ConfigError, match="needs a Postgres database"):
        MediaStore(tmp_path / "m", bucket=MediaBucket("s3://b", endpoint_url=s3_endpoint))
    with pytest.raises(BucketUnavailableError, match="does not exist; create it first"):
        MediaBucket("s3://no-such-bucket", endpoint_url=s3_endpoint).check()


def test_two_servers_share_media_through_the_bucket(tmp_path, postgres_url, media_bucket, s3_endpoint):
    Database(postgres_url).upgrade()
    settings = f"media_bucket: {media_bucket}\nmedia_bucket_endpoint: {s3_endpoint}\n"
    with ExitStack() as stack:
        (a, _), (b, _) = [stack.enter_context(serving_replica(tmp_path, name, postgres_url, settings)) for name in "ab"]
        sent = send_picture(a, "shared", (30, 200, 30))
        fetched = httpx.get(f"{b}/v1/media/shared/image-1", timeout=30)
        assert fetched.status_code == 200 and fetched.content == sent
        assert httpx.get(f"{b}/readyz").json()["status"] == "ready"
    name = media_bucket.removeprefix("s3://").split("/")[0]
    stored = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=name)["Contents"]
    assert len(stored) == 1 and stored[0]["Size"] == len(sent)


def test_a_server_whose_bucket_is_unreachable_stops_with_one_line(tmp_path, postgres_url):
    Database(postgres_url).upgrade()
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'c'}\ndatabase: {postgres_url}\n"
                      f"media_bucket: s3://media\nmedia_bucket_endpoint: http://127.0.0.1:{_free_port()}\n")
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "--config", str(config),
                           "serve", "--port", str(_free_port())], capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "could not reach the media bucket s3://media" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
