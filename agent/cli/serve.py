"""`signalgraph serve`: the OpenAI-compatible API and the web chat on one uvicorn server."""

from __future__ import annotations

import os
import threading
import time

import uvicorn

from agent.config import load_config
from agent.runtime import Runtime
from models.errors import ConfigError


def serve(args) -> int:
    if args.queue < 0 or not 0 < args.port < 65536:
        raise ConfigError(f"--queue must be 0 or more and --port between 1 and 65535 (got {args.queue}, {args.port})")
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be 1 or more (got {args.max_concurrency})")
    from agent.server.app import create_app

    config = load_config(args.config)
    if args.profile:
        config.profile = args.profile
    key = args.api_key or os.environ.get("SIGNALGRAPH_API_KEY") or None
    if args.ray:
        from agent.server.ray_app import load_deployments, serve_on_ray
        from models.profiles import check_ready, load_profile

        profile = load_profile(config.profile)
        check_ready(profile)
        return serve_on_ray(config, profile, deployments=load_deployments(args.deployments), address=args.address,
                            host=args.host, port=args.port,
                            app_options={"api_key": key, "queue_size": args.queue,
                                         "max_concurrency": args.max_concurrency})
    if args.address or args.deployments:
        raise ConfigError("--address and --deployments go with --ray")
    runtime = Runtime(config)
    try:
        print(f"loading the {runtime.profile.name} profile's backbone…", flush=True)
        app = create_app(runtime, api_key=key, queue_size=args.queue, max_concurrency=args.max_concurrency)
        print("warming up (the decode copy, the tool-call grammar, the embedder)…", flush=True)
        runtime.warm_up()
        where = f"http://{args.host}:{args.port}/"
        tenants = sorted({k.tenant for k in runtime.api_keys.list() if k.active})
        guard = (f" (tenant keys for {', '.join(tenants)}" + (", and the server's key)" if key else ")") if tenants
                 else " (bearer token required)" if key else "")
        print(f"serving signalgraph-{runtime.profile.name}: web chat at {where}, OpenAI API at {where}v1{guard}",
              flush=True)
        if key is None and not tenants and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host} without an API key; anyone who can reach this port can "
                  "use the agent (set --api-key or $SIGNALGRAPH_API_KEY)", flush=True)
        server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level),
                                drain_seconds=args.drain_seconds)
        server.run()
    finally:
        runtime.close()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn, stopped gracefully: on SIGTERM (or Ctrl-C) the server stops taking turns (the API
    answers 503 and /readyz says draining, so a load balancer sends them elsewhere), lets the running
    turns finish for up to `drain_seconds`, then exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, *, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig, frame) -> None:
        state = self.config.app.state
        if state.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        state.draining = True
        print(f"draining: {state.queue.busy} turn(s) to finish; new ones are refused", flush=True)

        def drain():
            deadline = time.monotonic() + self.drain_seconds
            while state.queue.busy and time.monotonic() < deadline:
                time.sleep(0.1)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="signalgraph-drain", daemon=True).start()
