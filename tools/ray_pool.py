"""The expert models as Ray Serve deployments: a model pool whose models live elsewhere.

Tools take their models from a pool (`tools.model_pool`): `with pool.use(kind, spec, builder) as
model: model.transcribe(...)`. `RayModelPool` hands out a proxy instead of the model: each method
call goes to the deployment that serves that kind of model (`transcriber`, `speech`,
`image_encoder`, `image_generator`, `audio_generator`, `embedder`), which builds the model once
with the same builder and spec, and runs it. The tools do not know the difference, so the same
tool code runs in one process or across a cluster, each model with its own replicas and resources.

A replica that dies mid-call is replaced by Ray; the call is tried once more on another replica,
and then fails as a typed error (a tool error the reply explains), never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from models.errors import SignalgraphError

CALL_TIMEOUT_S = 600.0  # a generator on a CPU may take minutes; a hung replica must still end the call
_METHOD = "<method>"


class ExpertUnavailableError(SignalgraphError):
    """A model's deployment could not answer."""


def _dead_replica(exc: BaseException) -> bool:
    """Errors after which another replica may well answer: the one called died or went away."""
    import ray.exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(exc, rex.RayActorError | rex.ActorUnavailableError | DeploymentUnavailableError
                      | BackPressureError | rex.WorkerCrashedError | rex.NodeDiedError)


def call_deployment(handle, method: str, *args, what: str, timeout: float = CALL_TIMEOUT_S, **kwargs) -> Any:
    """`handle.method(*args, **kwargs)`, waited for; retried once if its replica died; errors typed."""
    import ray.exceptions as rex

    for attempt in (1, 2):
        try:
            return getattr(handle, method).remote(*args, **kwargs).result(timeout_s=timeout)
        except rex.RayTaskError as exc:  # the model itself raised: its own error, as it was
            cause = exc.as_instanceof_cause()
            if isinstance(cause, SignalgraphError | ValueError | AttributeError):
                raise cause from None
            raise ExpertUnavailableError(f"{what} failed: {type(cause).__name__}: {cause}") from None
        except TimeoutError:
            raise ExpertUnavailableError(f"{what} did not answer within {timeout:.0f} s") from None
        except Exception as exc:
            if attempt == 1 and _dead_replica(exc):
                time.sleep(0.5)  # Ray is starting a new replica; the handle routes to a live one
                continue
            raise ExpertUnavailableError(f"{what} is unavailable ({type(exc).__name__}): {exc}") from None
    raise AssertionError("unreachable")


class ModelProxy:
    """Stands for a model in a deployment: attributes are read there, methods run there."""

    def __init__(self, handle, kind: str, spec: Any, builder: Callable[[Any], Any]):
        self._handle, self._kind, self._spec, self._builder = handle, kind, spec, builder
        self._callable: dict[str, bool] = {}

    def _call(self, method: str, *args) -> Any:
        return call_deployment(self._handle, method, self._kind, self._spec, self._builder, *args,
                               what=f"the {self._kind.replace('_', ' ')} deployment")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._callable.get(name):
            value = self._call("attribute", name)
            if value != _METHOD:
                return value
            self._callable[name] = True
        return lambda *args, **kwargs: self._call("run", name, args, kwargs)


class RayModelPool:
    """A model pool (the `use`/`get` of `tools.model_pool.ModelPool`) over deployments' handles,
    one per kind of model."""

    def __init__(self, handles: dict[str, Any]):
        self.handles = handles

    def get(self, kind: str, spec: Any, builder: Callable[[Any], Any]) -> ModelProxy:
        if kind not in self.handles:
            raise ExpertUnavailableError(f"no deployment serves the {kind.replace('_', ' ')} (add it to the "
                                         "deployments file)")
        return ModelProxy(self.handles[kind], kind, spec, builder)

    @contextmanager
    def use(self, kind: str, spec: Any, builder: Callable[[Any], Any]) -> Iterator[ModelProxy]:
        yield self.get(kind, spec, builder)  # the deployment serialises runs of one model itself


class ExpertModels:
    """What an expert deployment's replica does: build models by (kind, spec) with their builders,
    once, and run them one call at a time (diffusers pipelines keep per-call state)."""

    def __init__(self):
        from tools.model_pool import ModelPool

        self.pool = ModelPool()

    def attribute(self, kind: str, spec: Any, builder: Callable, name: str) -> Any:
        model = self.pool.get(kind, spec, builder)
        value = getattr(model, name)  # AttributeError goes back to the caller as it is
        return _METHOD if callable(value) else value

    def run(self, kind: str, spec: Any, builder: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        with self.pool.use(kind, spec, builder) as model:
            return getattr(model, name)(*args, **kwargs)
