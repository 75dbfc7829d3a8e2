"""The media store on Postgres: the SQLite store's behaviours, replicas that share one database
with empty local folders of their own, and ids that stay distinct under concurrent adds.

The tests of tests/test_media_store.py that use its `store` fixture run again here, collected
from that module, against the `store` fixture below; the ones that build their own store are
mirrored. Real PostgreSQL (the `postgres_url` fixture), real media files; no models are loaded.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_media_store import (  # noqa: F401 - tests and fixtures collected here again, on Postgres
    _png_bytes,
    allowed,
    outside,
    test_a_stored_wav_loads,
    test_absolute_path_outside_is_refused,
    test_add_file_stores_the_bytes_once_by_sha256,
    test_corrupt_and_missing_files_raise_the_media_errors,
    test_delete_session_keeps_blobs_other_sessions_use,
    test_dot_dot_escape_is_refused,
    test_eight_threads_adding_at_once_get_eight_ids,
    test_generated_media_always_get_new_ids_and_never_overwrite,
    test_ids_count_per_session_and_per_kind,
    test_kind_comes_from_the_suffix_or_is_given,
    test_meta_must_be_json,
    test_missing_id_lists_the_known_ids,
    test_relative_paths_are_taken_from_the_allowed_folder,
    test_same_bytes_are_stored_once_and_keep_their_id_in_a_session,
    test_sessions_are_isolated,
    test_symlink_inside_the_allowed_folder_is_fine,
    test_symlink_pointing_outside_is_refused,
    test_uploaded_bytes,
    test_video_is_validated_and_gets_a_video_id,
)

from models.errors import MediaTooLargeError
from models.specs import MediaLimits
from tools.database import Database
from tools.media_store import MediaNotFoundError, MediaStore, PathNotAllowedError


@pytest.fixture
def store(tmp_path: Path, allowed: Path, database: Database):  # noqa: F811 - `allowed` is the imported fixture
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed], database=database) as s:
        yield s


@pytest.fixture
def replica(tmp_path: Path, allowed: Path, postgres_url: str):  # noqa: F811
    """A second server process: its own connections, its own empty folder, the same database."""
    db = Database(postgres_url)
    with MediaStore(tmp_path / "replica", allowed_dirs=[allowed], database=db) as s:
        yield s
    db.close()


def _cached(store: MediaStore) -> list[Path]:
    return sorted(p for p in (store.root / "blobs").rglob("*") if p.is_file())


# --- the tests of test_media_store.py that build their own store --------------------------------


def test_no_allowed_folders_means_no_paths(tmp_path, allowed, database):  # noqa: F811
    with MediaStore(tmp_path / "closed", database=database) as closed:
        with pytest.raises(PathNotAllowedError, match="upload the file instead"):
            closed.add_file("s1", allowed / "red.png")
        assert closed.add_bytes("s1", _png_bytes(), "image", ".png").id == "image-1"


def test_limits_apply(tmp_path, allowed, database):  # noqa: F811
    with MediaStore(tmp_path / "small", allowed_dirs=[allowed], limits=MediaLimits(max_image_pixels=100),
                    database=database) as small:
        with pytest.raises(MediaTooLargeError):
            small.add_file("s1", allowed / "red.png")
    with database.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM media_blobs").fetchone()["n"] == 0


def test_the_index_survives_a_restart(tmp_path, allowed, postgres_url):  # noqa: F811
    first_db = Database(postgres_url)
    first_db.upgrade()
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed], database=first_db) as first:
        first.add_file("s1", allowed / "red.png")
    first_db.close()
    second_db = Database(postgres_url)
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed], database=second_db) as second:
        assert second.get("s1", "image-1").path.is_file()
        assert second.add_generated("s1", "image", _png_bytes(), ".png").id == "image-2"
    second_db.close()


# --- replicas -----------------------------------------------------------------------------------


def test_a_replica_with_an_empty_folder_serves_every_medium(store, replica, allowed):  # noqa: F811
    added = [store.add_file("s1", allowed / "red.png"), store.add_file("s1", allowed / "tone.wav"),
             store.add_generated("s1", "image", _png_bytes((1, 2, 3)), ".png", {"prompt": "dark"})]
    assert _cached(replica) == []
    for record in added:
        served = replica.get("s1", record.id)
        assert served.path.is_relative_to(replica.root) and served.path.read_bytes() == record.path.read_bytes()
        assert (served.id, served.kind, served.sha256, served.suffix, served.origin, served.meta) == (
            record.id, record.kind, record.sha256, record.suffix, record.origin, record.meta)
    assert len(_cached(replica)) == 3
    assert [r.id for r in replica.list("s1")] == ["image-1", "audio-1", "image-2"]
    assert replica.sessions() == store.sessions() == ["s1"]


def test_the_cache_is_written_once_and_refilled_when_cleared(store, replica, allowed):  # noqa: F811
    record = store.add_file("s1", allowed / "red.png")
    cached = replica.get("s1", "image-1").path
    first_write = cached.stat().st_mtime_ns
    assert replica.get("s1", "image-1").path.stat().st_mtime_ns == first_write  # reused, not rewritten
    cached.unlink()
    assert replica.get("s1", "image-1").path.read_bytes() == record.path.read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary files left behind


def test_listing_fills_the_cache_so_every_path_is_a_file(store, replica, allowed):  # noqa: F811
    store.add_file("s1", allowed / "red.png")
    store.add_file("s1", allowed / "blue.png")
    assert all(record.path.is_file() for record in replica.list("s1"))


def test_the_same_user_bytes_through_either_replica_keep_one_id(store, replica, allowed, database):  # noqa: F811
    first = store.add_file("s1", allowed / "red.png")
    assert replica.add_file("s1", allowed / "red-copy.png").id == first.id
    assert replica.add_bytes("s1", _png_bytes((10, 20, 230)), "image", ".png").id == "image-2"
    assert store.add_file("s1", allowed / "blue.png").id == "image-2"
    with database.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM media_blobs").fetchone()["n"] == 2


def test_concurrent_adds_through_two_replicas_get_distinct_consecutive_ids(store, replica):
    generated: list[str] = []
    uploaded: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def generate(target: MediaStore, shade: int) -> None:
        try:
            barrier.wait()
            generated.append(target.add_generated("s1", "image", _png_bytes((shade, 0, 0)), ".png").id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def upload_the_same(target: MediaStore) -> None:
        try:
            barrier.wait()
            uploaded.append(target.add_bytes("s1", _png_bytes((0, 0, 99)), "image", ".png").id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=generate, args=(target, 10 * i))
               for i, target in enumerate([store, replica] * 6)]
    threads += [threading.Thread(target=upload_the_same, args=(target,)) for target in [store, replica] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(uploaded)) == 1  # four uploads of one content, one id
    every_id = [f"image-{n}" for n in range(1, 14)]
    assert sorted(generated + uploaded[:1], key=lambda i: int(i.split("-")[1])) == every_id
    assert [r.id for r in replica.list("s1")] == every_id


def test_a_deleted_session_is_gone_for_every_replica(store, replica, allowed, database):  # noqa: F811
    shared = store.add_file("s1", allowed / "red.png")
    store.add_file("s2", allowed / "red.png")
    only_s1 = store.add_file("s1", allowed / "blue.png")
    replica.get("s1", only_s1.id)  # cached over there too
    assert replica.delete_session("s1") == 2
    with pytest.raises(MediaNotFoundError, match="this session has no media yet"):
        store.get("s1", shared.id)
    assert store.list("s1") == [] and store.sessions() == ["s2"]
    assert store.get("s2", "image-1").path.read_bytes() == (allowed / "red.png").read_bytes()
    with database.connection() as conn:
        left = [r["sha256"] for r in conn.execute("SELECT sha256 FROM media_blobs")]
    assert left == [shared.sha256]
    assert store.add_file("s1", allowed / "blue.png").id == "image-1"  # a deleted session starts afresh
