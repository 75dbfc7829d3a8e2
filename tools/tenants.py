"""Tenants and their API keys.

A tenant is a name (`acme`, `team-2`) that owns sessions, media and a knowledge base. A server
with tenant keys answers only requests that carry one, and everything a request names is looked
up inside its key's tenant: the same session id sent by two tenants names two sessions, and
another tenant's session or media id is simply not found.

Inside the system a tenant's session `s` is the thread `tenant/s`. Session ids that clients send
may not contain '/', so no id a client can send reaches another tenant's thread; the default
tenant (no keys, or the server's single `--api-key`) keeps the bare ids it always had.

Keys are shown once, when made, and stored only as their SHA-256: a key is 32 random bytes, so a
fast hash is enough (a slow password hash guards guessable secrets, which these are not). They
live in the shared database (Postgres, table `api_keys`) or, embedded, in `keys.sqlite` under the
data folder; a revoked key stops working on every replica at its next request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from models.errors import SignalgraphError

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PREFIX = "sg-"


class TenantError(SignalgraphError):
    """A tenant name or key id that cannot be used."""


def check_tenant(name: str) -> str:
    if not _TENANT.match(name or ""):
        raise TenantError(f"tenant name {name!r} must be 1-63 lowercase letters, digits, '-' or '_', starting with "
                          "a letter or digit")
    return name


def scoped(tenant: str | None, session: str) -> str:
    """The thread that holds `tenant`'s session `session`."""
    return session if tenant is None else f"{tenant}/{session}"


def tenant_of(thread: str) -> tuple[str | None, str]:
    """(tenant, the session id its tenant knows) for a thread made by `scoped`."""
    tenant, slash, session = thread.partition("/")
    return (tenant, session) if slash and _TENANT.match(tenant) else (None, thread)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str  # public: what `keys list` shows and `keys revoke` takes
    tenant: str
    name: str
    created: float
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


class ApiKeys:
    """The key table, in Postgres (`database`) or in a SQLite file (`path`)."""

    def __init__(self, *, database=None, path: str | Path | None = None):
        if (database is None) == (path is None):
            raise ValueError("ApiKeys needs a database or a path")
        self.database = database
        self._conn = None
        self._lock = threading.Lock()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            with self._lock, self._conn:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                                   "name TEXT NOT NULL, key_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL, "
                                   "revoked REAL)")

    def _rows(self, sql: str, params: tuple = ()) -> list[dict]:
        if self._conn is not None:
            with self._lock, self._conn:
                return [dict(row) for row in self._conn.execute(sql, params).fetchall()]
        with self.database.connection() as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def add(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`: its record, and the key itself (shown once, never stored)."""
        check_tenant(tenant)
        key_id, key = secrets.token_hex(4), KEY_PREFIX + secrets.token_urlsafe(32)
        created = time.time()
        self._rows("INSERT INTO api_keys (id, tenant, name, key_sha256, created) VALUES (?, ?, ?, ?, ?)",
                   (key_id, tenant, name, _digest(key), created))
        return ApiKey(key_id, tenant, name, created, None), key

    def list(self) -> list[ApiKey]:
        rows = self._rows("SELECT id, tenant, name, created, revoked FROM api_keys ORDER BY tenant, created")
        return [ApiKey(**row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey:
        rows = self._rows("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL "
                          "RETURNING id, tenant, name, created, revoked", (time.time(), key_id))
        if not rows:
            known = {k.id: k for k in self.list()}
            if key_id in known:
                raise TenantError(f"key {key_id} was revoked already")
            raise TenantError(f"there is no key {key_id!r}; `signalgraph keys list` shows them")
        return ApiKey(**rows[0])

    def lookup(self, key: str) -> tuple[str | None, bool]:
        """(the tenant whose active key this is, or None; whether any key is active), in one query:
        what a request's authorization needs."""
        rows = self._rows("SELECT (SELECT tenant FROM api_keys WHERE key_sha256 = ? AND revoked IS NULL) AS tenant, "
                          "EXISTS (SELECT 1 FROM api_keys WHERE revoked IS NULL) AS any_active", (_digest(key),))
        return rows[0]["tenant"], bool(rows[0]["any_active"])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def open_keys(database, data_dir: str | Path) -> ApiKeys:
    """The key table where this deployment keeps shared state: the database, else the data folder."""
    if database is not None:
        return ApiKeys(database=database)
    return ApiKeys(path=Path(data_dir).expanduser() / "keys.sqlite")
