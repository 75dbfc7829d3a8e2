"""The media store's index and bytes in Postgres, so replicas share every medium.

`MediaStore(root, ..., database=db)` uses it (the rules stay in tools/media_store.py). Ids,
metadata and each content's bytes (bytea, once per sha256) live in the tables of
tools/migrations/0003_media.sql, so a replica whose data folder is empty still serves every
medium. With a bucket (`MediaStore(..., bucket=MediaBucket(...))`, tools/media_bucket.py) new bytes
go to the S3-compatible bucket instead, and their row names the bucket in place of the data.
`MediaRecord.path` must be a local file all the same: `root/blobs/` caches the bytes under their
content-addressed names, written once, atomically, the first time a record needs them here.

Locks, all transaction-scoped advisory locks: an add holds one on its session, so two processes
never hand out one id nor store the same user bytes twice; adds hold a shared lock on the blobs
and `delete_session` an exclusive one, so a blob is never removed while an add is about to refer
to it. Both take the blobs lock first, so they cannot deadlock. An object is uploaded inside the
add's transaction, before its row; a deleted session's objects are removed in a later transaction
under the exclusive lock, and only those that no row has come to name again in between.
"""

from __future__ import annotations

import time
from pathlib import Path

from models.errors import MediaError
from tools.database import Database
from tools.media_bucket import MediaBucket
from tools.media_store import MediaRecord, NewMedia, blob_relpath, media_id, write_blob

_SELECT = ("SELECT m.media_id, m.kind, m.sha256, b.suffix AS blob_suffix, m.suffix, m.origin, m.created, m.meta "
           "FROM media m JOIN media_blobs b ON b.sha256 = m.sha256")
_LOCK_BLOBS_SHARED = "SELECT pg_advisory_xact_lock_shared(hashtext('signalgraph-media-blobs'))"
_LOCK_BLOBS = "SELECT pg_advisory_xact_lock(hashtext('signalgraph-media-blobs'))"
_LOCK_SESSION = "SELECT pg_advisory_xact_lock(hashtext('signalgraph-media'), hashtext(%s))"


class PgMediaIndex:
    """A `MediaIndex` on a shared Postgres database, with a local file cache under `root/blobs/`."""

    def __init__(self, database: Database, root: Path, bucket: MediaBucket | None = None) -> None:
        self.database = database
        self.root = root
        self.bucket = bucket

    def close(self) -> None:
        """Nothing to close: the database belongs to whoever made it, and may serve others."""

    def add(self, session: str, media: NewMedia, *, reuse: bool) -> MediaRecord:
        with self.database.connection() as conn, conn.transaction():
            conn.execute(_LOCK_BLOBS_SHARED)
            conn.execute(_LOCK_SESSION, (session,))
            row = None
            if reuse:
                row = conn.execute(
                    f"{_SELECT} WHERE m.session=%s AND m.sha256=%s AND m.kind=%s AND m.origin='user' "
                    "ORDER BY m.added LIMIT 1", (session, media.sha256, media.kind),
                ).fetchone()
            if row is None:
                row = self._insert(conn, session, media)
        return self._record(row, media.data)

    def _insert(self, conn, session: str, media: NewMedia) -> dict:
        # look before inserting, so bytes the database already has are not sent again
        if conn.execute("SELECT 1 FROM media_blobs WHERE sha256=%s", (media.sha256,)).fetchone() is None:
            if self.bucket is not None:
                self.bucket.put(media.sha256, media.suffix, media.data)  # before the row that names it
            conn.execute(
                "INSERT INTO media_blobs (sha256, suffix, size, data, bucket) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (sha256) DO NOTHING",
                (media.sha256, media.suffix, len(media.data), None if self.bucket else media.data,
                 self.bucket.url if self.bucket else None),
            )
        number = conn.execute(
            "INSERT INTO media_counters (session, kind, last) VALUES (%s, %s, 1) "
            "ON CONFLICT (session, kind) DO UPDATE SET last = media_counters.last + 1 RETURNING last",
            (session, media.kind),
        ).fetchone()["last"]
        new_id = media_id(media.kind, number)
        conn.execute(
            "INSERT INTO media (session, media_id, kind, sha256, suffix, origin, created, meta) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
            (session, new_id, media.kind, media.sha256, media.suffix, media.origin, time.time(), media.meta_json),
        )
        return conn.execute(f"{_SELECT} WHERE m.session=%s AND m.media_id=%s", (session, new_id)).fetchone()

    def get(self, session: str, media_id: str) -> MediaRecord | None:
        with self.database.connection() as conn:
            row = conn.execute(f"{_SELECT} WHERE m.session=%s AND m.media_id=%s", (session, media_id)).fetchone()
        found = self._cached([row] if row else [])
        return found[0] if found else None

    def list(self, session: str) -> list[MediaRecord]:
        with self.database.connection() as conn:
            rows = conn.execute(f"{_SELECT} WHERE m.session=%s ORDER BY m.added", (session,)).fetchall()
        return self._cached(rows)

    def _cached(self, rows: list[dict]) -> list[MediaRecord]:
        """The records of `rows`, their bytes fetched into the cache where it lacks them; a row
        whose blob a concurrent `delete_session` removed in between is left out."""
        missing = {row["sha256"] for row in rows if not self._path(row).is_file()}
        fetched: dict[str, bytes] = {}
        if missing:
            with self.database.connection() as conn:
                stored = conn.execute("SELECT sha256, suffix, data, bucket FROM media_blobs WHERE sha256 = ANY(%s)",
                                      (sorted(missing),)).fetchall()
            fetched = {r["sha256"]: r["data"] if r["data"] is not None else self._from_bucket(r) for r in stored}
        return [self._record(row, fetched.get(row["sha256"])) for row in rows
                if row["sha256"] in fetched or row["sha256"] not in missing]

    def _from_bucket(self, row: dict) -> bytes:
        if self.bucket is None or self.bucket.url != row["bucket"]:
            configured = f"the bucket {self.bucket.url}" if self.bucket else "no media bucket"
            raise MediaError(f"this medium's bytes are in {row['bucket']}, but this server is set up with "
                             f"{configured}; set media_bucket to {row['bucket']}")
        return self.bucket.get(row["sha256"], row["suffix"])

    def _record(self, row: dict, data: bytes | None) -> MediaRecord:
        """The record of `row`; `data`, its bytes, are written to the cache unless already there."""
        path = self._path(row)
        if data is not None and not path.is_file():
            write_blob(path, data)
        return MediaRecord(row["media_id"], row["kind"], row["sha256"], path, row["suffix"], row["origin"],
                           row["created"], row["meta"])

    def _path(self, row: dict) -> Path:
        return self.root / blob_relpath(row["sha256"], row["blob_suffix"])

    def sessions(self) -> list[str]:
        with self.database.connection() as conn:
            return [r["session"] for r in conn.execute("SELECT DISTINCT session FROM media ORDER BY session")]

    def delete_session(self, session: str) -> int:
        with self.database.connection() as conn:
            with conn.transaction():
                conn.execute(_LOCK_BLOBS)
                forgotten = conn.execute("DELETE FROM media WHERE session=%s RETURNING sha256", (session,)).fetchall()
                conn.execute("DELETE FROM media_counters WHERE session=%s", (session,))
                orphans = conn.execute(
                    "DELETE FROM media_blobs b WHERE b.sha256 = ANY(%s) "
                    "AND NOT EXISTS (SELECT 1 FROM media m WHERE m.sha256 = b.sha256) "
                    "RETURNING b.sha256, b.suffix AS blob_suffix, b.bucket",
                    (sorted({r["sha256"] for r in forgotten}),),
                ).fetchall()
        # after the commit: a rolled-back delete keeps its files. Other replicas' caches keep theirs
        # (unreachable: no id refers to them any more) until those folders are cleared
        for orphan in orphans:
            self._path(orphan).unlink(missing_ok=True)
        self._delete_objects([o for o in orphans if o["bucket"] is not None])
        return len(forgotten)

    def _delete_objects(self, orphans: list[dict]) -> None:
        """Remove orphaned objects, holding the blobs lock so no add is between upload and row, and
        sparing any that an add has stored again since the rows went."""
        if not orphans:
            return
        with self.database.connection() as conn, conn.transaction():
            conn.execute(_LOCK_BLOBS)
            again = {r["sha256"] for r in conn.execute("SELECT sha256 FROM media_blobs WHERE sha256 = ANY(%s)",
                                                       ([o["sha256"] for o in orphans],))}
            for url in {o["bucket"] for o in orphans}:
                if self.bucket is None or self.bucket.url != url:
                    continue  # a bucket this server is not set up for keeps its objects
                self.bucket.delete((o["sha256"], o["blob_suffix"]) for o in orphans
                                   if o["bucket"] == url and o["sha256"] not in again)
