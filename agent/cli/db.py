"""`signalgraph db upgrade` and `signalgraph db status`: the shared Postgres database's schema."""

from __future__ import annotations

from agent.config import load_config
from models.errors import ConfigError


def db(args) -> int:
    from tools.database import DATABASE_ENV, Database, database_url, migrations

    url = database_url(args.url or load_config(args.config).database)
    if url is None:
        raise ConfigError(f"no database is configured (set `database:` in the config, ${DATABASE_ENV} or --url); "
                          "without one, everything lives in SQLite files under the data folder and needs no upgrade")
    database = Database(url)
    try:
        if args.action == "upgrade":
            before, after = database.upgrade()
            print(f"schema version {before} -> {after}" if after != before else f"up to date (schema version {after})")
            return 0
        current, known = database.version(), migrations()
        print(f"schema version {current} of {known[-1].version}")
        for migration in known:
            state = "applied" if migration.version <= current else "pending"
            print(f"  {migration.version:04d} {migration.name:<24} {state}")
        return 0 if current >= known[-1].version else 1
    finally:
        database.close()
