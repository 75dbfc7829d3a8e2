"""`signalgraph keys add|list|revoke`: tenants' API keys, where the server keeps its shared state."""

from __future__ import annotations

import time

from agent.config import load_config
from tools.database import Database, database_url
from tools.tenants import open_keys


def keys(args) -> int:
    config = load_config(args.config)
    url = database_url(config.database)
    database = Database(url) if url else None
    try:
        if database is not None:
            database.check()  # the key table comes with the migrations
        store = open_keys(database, config.data_dir)
        if args.action == "add":
            record, key = store.add(args.tenant, args.name)
            print(f"key {record.id} for tenant {record.tenant}: {key}")
            print("this is the only time the key is shown; the server keeps only its hash")
        elif args.action == "revoke":
            record = store.revoke(args.id)
            print(f"revoked key {record.id} of tenant {record.tenant}; requests with it now get 401")
        else:
            listed = store.list()
            if not listed:
                print("no keys: the server is open, or guarded by its single --api-key")
            for record in listed:
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created))
                state = "active" if record.active else "revoked " + time.strftime("%Y-%m-%d %H:%M",
                                                                              time.localtime(record.revoked))
                print(f"{record.id}  {record.tenant:<20} {made}  {state:<24} {record.name}")
        store.close()
        return 0
    finally:
        if database is not None:
            database.close()
