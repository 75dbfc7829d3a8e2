"""A content-addressed media store: each file's bytes stored once, per-session ids.

Tools and graphs never pass file paths or media bytes around; they pass ids such as `image-1`
or `audio-2` that this store resolves for one session (HuggingGPT #75: models hallucinate
paths; LangGraph checkpoints bloat with base64 media). By default everything lives under `root`:

    index.sqlite                  sessions' ids -> blobs, with kind, origin and metadata
    blobs/ab/abcdef....png        the bytes, named by their sha256 (stored once, read-only)

With `database=` (a `tools.database.Database`), the ids and the bytes live in Postgres instead
(tools/media_store_pg.py), shared by every replica, and `root/blobs/` is only this replica's
cache of them, laid out the same way: `MediaRecord.path` is a local file either way. Adding
`bucket=` (tools/media_bucket.py) keeps new bytes in an S3-compatible bucket, the ids in Postgres.

Rules (here, once, whichever index stores the media):

- A user file (`add_file`) must resolve, symlinks followed, inside one of `allowed_dirs`;
  anything else is refused with `PathNotAllowedError`. It is decoded with `models.media`
  before it is stored, so a corrupt or oversized file raises that module's typed error.
- Ids count per session and per kind: image-1, image-2, audio-1, ... Sessions are isolated:
  another session's id is simply not found.
- The same user bytes added twice to one session, as the same kind, get the id they already
  have (re-attaching a file does not multiply ids). Generated media always get a new id, even
  when the bytes repeat: nothing is ever overwritten (smolagents #2393).
- `delete_session` forgets a session's ids and counters; a blob is removed only when no other
  session still refers to it.

Thread-safe, and safe across processes sharing one index; decoding and hashing run outside
any lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from models.errors import ConfigError, MediaError, SignalgraphError
from models.specs import MediaLimits

if TYPE_CHECKING:
    from tools.database import Database
    from tools.media_bucket import MediaBucket

MediaKind = Literal["image", "audio", "video"]
Origin = Literal["user", "generated"]
KINDS: tuple[str, ...] = get_args(MediaKind)

# suffix -> kind, for add_file without a kind
SUFFIX_KINDS: dict[str, str] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"), "audio"),
    **dict.fromkeys((".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"), "video"),
}

_SUFFIX = re.compile(r"^\.[a-z0-9]{1,10}$")
_ID = re.compile(r"^(image|audio|video)-([1-9][0-9]*)$")


class PathNotAllowedError(SignalgraphError):
    """A user-supplied path that lies outside every folder the store may read."""


class MediaNotFoundError(MediaError):
    """A media id that the session does not have."""


@dataclass(frozen=True)
class MediaRecord:
    """One id of one session. `path` is the blob on disk (shared by every id with these bytes)."""

    id: str
    kind: str
    sha256: str
    path: Path
    suffix: str
    origin: str  # "user" or "generated"
    created: float  # unix time
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (the path as a string)."""
        return {
            "id": self.id, "kind": self.kind, "sha256": self.sha256, "path": str(self.path),
            "suffix": self.suffix, "origin": self.origin, "created": self.created, "meta": dict(self.meta),
        }


@dataclass(frozen=True)
class NewMedia:
    """Checked bytes on their way into an index."""

    data: bytes
    sha256: str
    kind: str
    suffix: str
    origin: str
    meta_json: str


class MediaIndex(Protocol):
    """Where a `MediaStore` keeps its ids and bytes. The store checks everything before `add`; an
    index only stores, each call atomic for every thread and process that shares the index."""

    def add(self, session: str, media: NewMedia, *, reuse: bool) -> MediaRecord:
        """`media` under the session's next id of its kind (`media_id`); with `reuse`, the id that
        the session's user media with these bytes and this kind already have, if any."""

    def get(self, session: str, media_id: str) -> MediaRecord | None: ...

    def list(self, session: str) -> list[MediaRecord]:
        """In the order the media were added."""

    def sessions(self) -> list[str]: ...

    def delete_session(self, session: str) -> int:
        """Forget the session's ids and counters, and the blobs no other session refers to;
        the number of ids forgotten."""

    def close(self) -> None: ...


def media_id(kind: str, number: int) -> str:
    return f"{kind}-{number}"


def blob_relpath(sha: str, suffix: str) -> str:
    """Where a blob's file lies under a store's root."""
    return f"blobs/{sha[:2]}/{sha}{suffix}"


def write_blob(dest: Path, data: bytes) -> None:
    """Write a blob file atomically and read-only: a reader never sees half of one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o444)  # blobs are never modified in place
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _kind(kind: str | None, suffix: str, what: str) -> str:
    if kind is None:
        found = SUFFIX_KINDS.get(suffix)
        if found is None:
            raise MediaError(
                f"cannot tell whether {what} is an image, audio or video from its suffix {suffix or '(none)'!r}; "
                f"give the kind explicitly (known suffixes: {', '.join(sorted(SUFFIX_KINDS))})"
            )
        return found
    if kind not in KINDS:
        raise MediaError(f"unknown media kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def _suffix(suffix: str) -> str:
    cleaned = suffix.lower() if suffix.startswith(".") else f".{suffix.lower()}"
    if not _SUFFIX.match(cleaned):
        raise MediaError(f"invalid file suffix {suffix!r}; use a short extension such as '.png' or '.wav'")
    return cleaned


def _check_session(session: str) -> str:
    if not isinstance(session, str) or not session:
        raise SignalgraphError("a session id must be a non-empty string")
    return session


class MediaStore:
    """Media files by id, per session. See the module docstring for the rules.

    `MediaStore(root, ...)` keeps everything under `root` (SQLite); `MediaStore(root, ...,
    database=db)` keeps ids and bytes in that Postgres database and caches files under `root`;
    `bucket=` moves the bytes of new media to an S3-compatible bucket."""

    def __init__(
        self, root: str | Path, *, allowed_dirs: Iterable[str | Path] = (), limits: MediaLimits = MediaLimits(),
        database: Database | None = None, bucket: MediaBucket | None = None,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.allowed_dirs: list[Path] = [Path(d).expanduser().resolve() for d in allowed_dirs]
        self.limits = limits
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        if bucket is not None and database is None:
            raise ConfigError("media_bucket needs a Postgres database (database: postgresql://...) to keep the "
                              "media ids in; on the embedded default, media stay in the data folder")
        if database is None:
            self._index: MediaIndex = SqliteMediaIndex(self.root)
        else:
            from tools.media_store_pg import PgMediaIndex

            self._index = PgMediaIndex(database, self.root, bucket)

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> MediaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adding -------------------------------------------------------------------------------

    def resolve_user_path(self, path: str | Path) -> Path:
        """The real file a user path names, or `PathNotAllowedError` when it lies outside every
        allowed folder. A relative path is taken relative to each allowed folder in turn."""
        raw = Path(path).expanduser()
        if not self.allowed_dirs:
            raise PathNotAllowedError(
                f"reading files from disk is not enabled here, so {str(path)!r} cannot be attached; "
                "upload the file instead, or allow its folder (allowed_dirs)"
            )
        candidates = [raw.resolve()]  # absolute, or relative to the working folder
        if not raw.is_absolute():
            candidates += [(d / raw).resolve() for d in self.allowed_dirs]
        inside = [c for c in candidates if any(c.is_relative_to(d) for d in self.allowed_dirs)]
        if not inside:
            folders = ", ".join(repr(str(d)) for d in self.allowed_dirs)
            raise PathNotAllowedError(
                f"{str(path)!r} is outside the folders files may be read from ({folders}); "
                "move the file into one of them, or upload it instead"
            )
        return next((c for c in inside if c.exists()), inside[0])

    def add_file(self, session: str, path: str | Path, kind: MediaKind | None = None, *,
                 confine: bool = True) -> MediaRecord:
        """Validate a user's file (allowed folder, decodes within the limits) and store it.

        `confine=False` is for a path the person at the keyboard typed (the CLI): their own file,
        read wherever they can read it. Paths from anywhere else (model output, the API, workflow
        files) stay confined to `allowed_dirs`.

        Raises `PathNotAllowedError`, or the `models.media` error (`MediaError`,
        `CorruptMediaError`, `MediaTooLargeError`) that decoding it raised.
        """
        _check_session(session)
        real = self.resolve_user_path(path) if confine else Path(path).expanduser().resolve()
        suffix = real.suffix.lower() if _SUFFIX.match(real.suffix.lower()) else ""
        kind = _kind(kind, suffix, f"{str(path)!r}")
        before = real.stat() if real.is_file() else None
        meta = self._validate(real, kind)  # a missing file or a folder is reported here, typed
        # read what was validated; a file swapped in between is refused rather than stored unchecked
        with open(real, "rb") as fp:
            after = os.fstat(fp.fileno())
            data = fp.read(self.limits.max_bytes + 1)
        if before is None or (before.st_size, before.st_mtime_ns, before.st_ino) != (
            after.st_size, after.st_mtime_ns, after.st_ino
        ) or len(data) != after.st_size:
            raise MediaError(f"{str(path)!r} changed while it was being attached; attach it again")
        return self._add(session, data, kind, suffix or ".bin", "user", meta, reuse=True)

    def add_bytes(self, session: str, data: bytes, kind: MediaKind, suffix: str) -> MediaRecord:
        """Validate uploaded bytes (they decode as `kind` within the limits) and store them."""
        _check_session(session)
        suffix = _suffix(suffix)
        kind = _kind(kind, suffix, "the upload")
        meta = self._validate(bytes(data), kind)
        return self._add(session, bytes(data), kind, suffix, "user", meta, reuse=True)

    def add_generated(
        self, session: str, kind: MediaKind, data: bytes, suffix: str, meta: dict[str, Any] | None = None
    ) -> MediaRecord:
        """Store a tool's or generator's output under a new id (never an existing one).

        The bytes are trusted (they come from this system), so they are not decoded again.
        `meta` must be JSON-able (e.g. the prompt and seed that made it)."""
        _check_session(session)
        suffix = _suffix(suffix)
        kind = _kind(kind, suffix, "the generated file")
        return self._add(session, bytes(data), kind, suffix, "generated", dict(meta or {}), reuse=False)

    def _validate(self, source: Path | bytes, kind: str) -> dict[str, Any]:
        """Decode once with models.media; a few facts worth keeping go into the record's meta."""
        from models import media

        if kind == "image":
            image = media.load_image(source, self.limits)
            return {"width": image.width, "height": image.height}
        if kind == "audio":
            samples = media.load_audio(source, self.limits, sample_rate=16_000)
            return {"seconds": round(len(samples) / 16_000, 3)}
        frames = media.load_video_frames(source, self.limits, frames=1)
        return {"width": frames[0].width, "height": frames[0].height}

    def _add(
        self, session: str, data: bytes, kind: str, suffix: str, origin: str, meta: dict[str, Any], *, reuse: bool
    ) -> MediaRecord:
        if not data:
            raise MediaError(f"the {kind} is empty (0 bytes); send it again")
        meta_json = json.dumps(meta, sort_keys=True)  # fails early on meta that is not JSON-able
        media = NewMedia(data, hashlib.sha256(data).hexdigest(), kind, suffix, origin, meta_json)
        return self._index.add(session, media, reuse=reuse)

    # --- reading ------------------------------------------------------------------------------

    def get(self, session: str, media_id: str) -> MediaRecord:
        """The record of `media_id` in `session`; `MediaNotFoundError` (naming the known ids) if none."""
        _check_session(session)
        record = self._index.get(session, str(media_id))
        if record is None:
            raise MediaNotFoundError(self.not_found_message(session, media_id))
        return record

    def not_found_message(self, session: str, media_id: object, kinds: Iterable[str] = KINDS) -> str:
        """Why `media_id` was not found, naming the session's ids of `kinds` (for tool errors too)."""
        kinds = tuple(kinds)
        known = [r.id for r in self.list(session) if r.kind in kinds]
        what = " or ".join(kinds) if kinds != KINDS else "media"
        if looks_like_path(str(media_id)):
            head = (f"{str(media_id)!r} looks like a file path; media are named by ids such as {kinds[0]}-1, "
                    "never by paths")
        else:
            head = f"there is no {what} with id {str(media_id)!r} in this session"
        if known:
            return f"{head}; known {what} ids: {', '.join(known)}"
        return f"{head}; this session has no {what} yet (attach one or generate one first)"

    def list(self, session: str) -> list[MediaRecord]:
        """The session's media in the order they were added."""
        _check_session(session)
        return self._index.list(session)

    def sessions(self) -> list[str]:
        return self._index.sessions()

    # --- deleting -----------------------------------------------------------------------------

    def delete_session(self, session: str) -> int:
        """Forget a session's ids and counters; delete blobs no other session refers to.
        Returns how many ids were forgotten."""
        _check_session(session)
        return self._index.delete_session(session)


# --- the SQLite index -----------------------------------------------------------------------------

# One lock per store root in this process, so two MediaStore objects on one root do not race.
_ROOT_LOCKS: dict[str, threading.RLock] = {}
_ROOT_LOCKS_GUARD = threading.Lock()


def _root_lock(root: Path) -> threading.RLock:
    with _ROOT_LOCKS_GUARD:
        return _ROOT_LOCKS.setdefault(str(root), threading.RLock())


_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS media (
    session TEXT NOT NULL,
    media_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    suffix TEXT NOT NULL,
    origin TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (session, media_id)
);
CREATE INDEX IF NOT EXISTS media_by_sha ON media (sha256);
CREATE TABLE IF NOT EXISTS counters (
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (session, kind)
);
"""

_SELECT = ("SELECT m.media_id, m.kind, m.sha256, b.relpath, m.suffix, m.origin, m.created, m.meta "
           "FROM media m JOIN blobs b ON b.sha256 = m.sha256")


class SqliteMediaIndex:
    """Ids in `root/index.sqlite`, bytes in `root/blobs/`. The SQLite work and the blob writes of
    one root run under one lock shared by every index of that root in the process; BEGIN IMMEDIATE
    makes other processes wait."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = _root_lock(root)
        # autocommit mode; transactions are explicit (BEGIN IMMEDIATE) so other processes wait
        self._db = sqlite3.connect(root / "index.sqlite", check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, session: str, media: NewMedia, *, reuse: bool) -> MediaRecord:
        with self._lock, self._transaction() as db:
            if reuse:
                row = db.execute(
                    "SELECT media_id FROM media WHERE session=? AND sha256=? AND kind=? AND origin='user' "
                    "ORDER BY rowid LIMIT 1", (session, media.sha256, media.kind),
                ).fetchone()
                if row is not None:
                    return self._get(db, session, row[0])
            self._write_blob(db, media)
            row = db.execute("SELECT last FROM counters WHERE session=? AND kind=?", (session, media.kind)).fetchone()
            number = (row[0] if row else 0) + 1
            db.execute(
                "INSERT INTO counters (session, kind, last) VALUES (?, ?, ?) "
                "ON CONFLICT (session, kind) DO UPDATE SET last=excluded.last", (session, media.kind, number),
            )
            new_id = media_id(media.kind, number)
            db.execute(
                "INSERT INTO media (session, media_id, kind, sha256, suffix, origin, created, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (session, new_id, media.kind, media.sha256, media.suffix, media.origin, time.time(), media.meta_json),
            )
            return self._get(db, session, new_id)

    def _write_blob(self, db: sqlite3.Connection, media: NewMedia) -> None:
        """The blob once: an existing one (any suffix) is kept; a new one is written atomically."""
        row = db.execute("SELECT relpath FROM blobs WHERE sha256=?", (media.sha256,)).fetchone()
        if row is not None and (self.root / row[0]).is_file():
            return
        relpath = blob_relpath(media.sha256, media.suffix)
        write_blob(self.root / relpath, media.data)
        db.execute(
            "INSERT INTO blobs (sha256, relpath, size) VALUES (?, ?, ?) "
            "ON CONFLICT (sha256) DO UPDATE SET relpath=excluded.relpath, size=excluded.size",
            (media.sha256, relpath, len(media.data)),
        )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def get(self, session: str, media_id: str) -> MediaRecord | None:
        with self._lock:
            return self._get(self._db, session, media_id)

    def _get(self, db: sqlite3.Connection, session: str, media_id: str) -> MediaRecord | None:
        row = db.execute(f"{_SELECT} WHERE m.session=? AND m.media_id=?", (session, media_id)).fetchone()
        return None if row is None else self._record(row)

    def list(self, session: str) -> list[MediaRecord]:
        with self._lock:
            rows = self._db.execute(f"{_SELECT} WHERE m.session=? ORDER BY m.rowid", (session,)).fetchall()
        return [self._record(row) for row in rows]

    def _record(self, row: tuple) -> MediaRecord:
        found_id, kind, sha, relpath, suffix, origin, created, meta = row
        return MediaRecord(found_id, kind, sha, self.root / relpath, suffix, origin, created, json.loads(meta))

    def sessions(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT session FROM media ORDER BY session").fetchall()
        return [row[0] for row in rows]

    def delete_session(self, session: str) -> int:
        with self._lock:
            with self._transaction() as db:
                count = db.execute("SELECT COUNT(*) FROM media WHERE session=?", (session,)).fetchone()[0]
                db.execute("DELETE FROM media WHERE session=?", (session,))
                db.execute("DELETE FROM counters WHERE session=?", (session,))
                orphans = db.execute(
                    "SELECT sha256, relpath FROM blobs WHERE sha256 NOT IN (SELECT DISTINCT sha256 FROM media)"
                ).fetchall()
                db.executemany("DELETE FROM blobs WHERE sha256=?", [(sha,) for sha, _ in orphans])
            for _, relpath in orphans:  # after the commit: a rolled-back delete keeps its files
                (self.root / relpath).unlink(missing_ok=True)
        return count


def looks_like_path(value: str) -> bool:
    """True for strings that are clearly file paths rather than media ids."""
    return not _ID.match(value) and ("/" in value or "\\" in value or bool(Path(value).suffix))
