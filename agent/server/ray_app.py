"""`signalgraph serve --ray`: the same API, with its models as Ray Serve deployments.

    gateway            the HTTP API and web chat (agent.server.app) and the controller; calls
                       the others through their deployment handles
    backbone           the MM-LLM with its decode scheduler (graphs.ray_thinker.BackboneReplica)
    transcriber, speech, image_encoder, image_generator, audio_generator, embedder
                       the expert models, each built once per replica (tools.ray_pool.ExpertModels)

Each deployment has its own replica count, resources (`num_cpus`, `num_gpus`, fractions allowed)
and, if given, Ray Serve's autoscaling settings, all from one YAML file (`--deployments`; see
examples/ray-deployments.yaml). A local Ray starts by default; `--address` joins a running cluster.
More than one gateway replica shares sessions only through a Postgres `database:`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import AgentConfig
from models.errors import ConfigError
from models.specs import ProfileSpec

EXPERTS = ("transcriber", "speech", "image_encoder", "image_generator", "audio_generator", "embedder")
APP_NAME = "signalgraph"


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling settings (a subset, by their Ray names)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)  # the expert models mostly wait: a laptop's few cores host them all
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    autoscaling: Autoscaling | None = None  # replaces num_replicas when given

    def least(self, resource: str) -> float:
        """What its replicas need of `resource` at the least (at start, or at the autoscaler's minimum)."""
        replicas = self.autoscaling.min_replicas if self.autoscaling else self.num_replicas
        return replicas * getattr(self, resource)

    def options(self, name: str) -> dict[str, Any]:
        options: dict[str, Any] = {"name": name, "max_ongoing_requests": self.max_ongoing_requests,
                                   "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class Deployments(BaseModel):
    """The deployments file: one entry per deployment, each optional."""

    model_config = ConfigDict(extra="forbid")
    gateway: Deployment = Deployment(num_cpus=0.25, max_ongoing_requests=64)
    backbone: Deployment = Deployment(num_cpus=1.0, max_ongoing_requests=16)
    transcriber: Deployment = Deployment()
    speech: Deployment = Deployment()
    image_encoder: Deployment = Deployment()
    image_generator: Deployment = Deployment(max_ongoing_requests=4)
    audio_generator: Deployment = Deployment(max_ongoing_requests=4)
    embedder: Deployment = Deployment()


def load_deployments(path: str | None) -> Deployments:
    if path is None:
        return Deployments()
    from models.config_files import problems, read_mapping

    data = read_mapping(Path(path).expanduser(), "deployments file")
    try:
        return Deployments.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"deployments file {path!r} is invalid: {problems(exc)}") from None


class Gateway:
    """The ingress deployment: the API over a Runtime whose backbone and models are deployments."""

    def __init__(self, config: AgentConfig, profile: ProfileSpec, backbone, experts: dict, app_options: dict):
        from agent.runtime import Runtime
        from graphs.ray_thinker import RayThinker
        from tools.ray_pool import RayModelPool

        self.runtime = Runtime(config, profile, thinker=RayThinker(backbone), pool=RayModelPool(experts))
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        from agent.server.app import create_app

        return create_app(self.runtime, **self.app_options)


def build_app(config: AgentConfig, profile: ProfileSpec, deployments: Deployments, app_options: dict):
    """The Ray Serve application: every deployment bound, the gateway as its ingress."""
    from ray import serve

    from graphs.ray_thinker import BackboneReplica
    from tools.ray_pool import ExpertModels

    if deployments.gateway.num_replicas > 1 or deployments.gateway.autoscaling is not None:
        from tools.database import database_url

        if database_url(config.database) is None:
            raise ConfigError("more than one gateway replica needs a shared Postgres `database:` in the config "
                              "(each replica would keep its own sessions otherwise)")
    backbone = serve.deployment(BackboneReplica).options(**deployments.backbone.options("backbone")).bind(
        profile, config.max_new_tokens)
    experts = {kind: serve.deployment(ExpertModels).options(**getattr(deployments, kind).options(kind)).bind()
               for kind in EXPERTS}
    gateway = serve.deployment(serve.ingress()(Gateway)).options(**deployments.gateway.options("gateway"))
    return gateway.bind(config, profile, backbone, experts, app_options)


def _check_fits(deployments: Deployments, cluster: dict[str, float]) -> None:
    """Refuse a deployments file the cluster cannot place (Ray would wait for resources forever)."""
    for resource, ray_name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        wanted = sum(getattr(deployments, name).least(resource) for name in Deployments.model_fields)
        have = cluster.get(ray_name, 0.0)
        if wanted > have + 1e-9:
            raise ConfigError(f"the deployments ask for {wanted:g} {ray_name}s and the Ray cluster has {have:g}: "
                              f"lower {resource} or num_replicas in the deployments file, or add nodes")


def serve_on_ray(config: AgentConfig, profile: ProfileSpec, *, deployments: Deployments, address: str | None,
                 host: str, port: int, app_options: dict) -> int:
    """Deploy, print where, and keep serving until SIGINT or SIGTERM; then take the deployments down."""
    import ray
    from ray import serve

    application = build_app(config, profile, deployments, app_options)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    _check_fits(deployments, ray.cluster_resources())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"deploying the {profile.name} profile on Ray: gateway, backbone, {', '.join(EXPERTS)}…", flush=True)
        serve.run(application, name=APP_NAME, route_prefix="/")
        where = f"http://{host}:{port}/"
        print(f"serving signalgraph-{profile.name} on Ray Serve: web chat at {where}, OpenAI API at {where}v1",
              flush=True)
        stop.wait()
        print("stopping: taking the deployments down", flush=True)
    finally:
        try:  # a shared cluster keeps running without this app; a local one goes with it
            serve.delete(APP_NAME) if address else serve.shutdown()
        finally:
            ray.shutdown()
    return 0

