"""`signalgraph serve`: the OpenAI-compatible API and the web chat on one uvicorn server."""

from __future__ import annotations

import os

from agent.config import load_config
from agent.runtime import Runtime
from models.errors import ConfigError


def serve(args) -> int:
    if args.queue < 0 or not 0 < args.port < 65536:
        raise ConfigError(f"--queue must be 0 or more and --port between 1 and 65535 (got {args.queue}, {args.port})")
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be 1 or more (got {args.max_concurrency})")
    import uvicorn

    from agent.server.app import create_app

    config = load_config(args.config)
    if args.profile:
        config.profile = args.profile
    key = args.api_key or os.environ.get("SIGNALGRAPH_API_KEY") or None
    runtime = Runtime(config)
    try:
        print(f"loading the {runtime.profile.name} profile's backbone…", flush=True)
        app = create_app(runtime, api_key=key, queue_size=args.queue, max_concurrency=args.max_concurrency)
        where = f"http://{args.host}:{args.port}/"
        print(f"serving signalgraph-{runtime.profile.name}: web chat at {where}, OpenAI API at {where}v1"
              + (" (bearer token required)" if key else ""), flush=True)
        if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host} without an API key; anyone who can reach this port can "
                  "use the agent (set --api-key or $SIGNALGRAPH_API_KEY)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        runtime.close()
    return 0
