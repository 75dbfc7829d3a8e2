"""Heavy models loaded lazily, once per process, and shared by every session's tools.

TaskMatrix loads every tool's model at start and runs out of memory; here a model is built the
first time a tool needs it and kept. The key is the model's role and its spec (as JSON), so two
sessions with the same profile share one Whisper, and a profile that changes a spec gets its own.

Two threads asking for the same model at once load it once. Builds of different models wait for
each other too (`models.loading.LOADING`): the libraries' loaders patch global torch state while
they run, so two at once corrupt each other. A build that raises is not cached; the next request
tries again and meets the same, typed error.

Running a model is a separate matter: diffusers pipelines keep per-call state in their
scheduler, so two threads must not denoise on one pipeline at once. `use()` hands out the model
while holding its run lock; `get()` hands it out without one, for models that are safe to share.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from models.loading import LOADING

T = TypeVar("T")
Key = tuple[str, str]


def spec_key(spec: Any) -> str:
    """A stable text key for a spec: pydantic models by their JSON, mappings by sorted JSON."""
    if hasattr(spec, "model_dump_json"):
        return f"{type(spec).__name__}:{spec.model_dump_json()}"
    if isinstance(spec, (dict, list, tuple, str, int, float, bool)) or spec is None:
        return json.dumps(spec, sort_keys=True, default=str)
    return repr(spec)


class ModelPool:
    """Built models by (kind, spec). `builder(spec)` is called at most once per key while it succeeds."""

    def __init__(self) -> None:
        self._models: dict[Key, Any] = {}
        self._load_locks: dict[Key, threading.Lock] = {}
        self._run_locks: dict[Key, threading.RLock] = {}
        self._guard = threading.Lock()  # protects the dicts themselves, held only briefly

    def _key(self, kind: str, spec: Any) -> Key:
        return (kind, spec_key(spec))

    def get(self, kind: str, spec: Any, builder: Callable[[Any], T]) -> T:
        """The model for (kind, spec), built with `builder(spec)` the first time."""
        key = self._key(kind, spec)
        with self._guard:
            if key in self._models:
                return self._models[key]
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:  # only callers of this key wait here
            with self._guard:
                if key in self._models:
                    return self._models[key]
            with LOADING:
                model = builder(spec)
            with self._guard:
                self._models[key] = model
            return model

    def run_lock(self, kind: str, spec: Any) -> threading.RLock:
        """The lock that serialises runs of one model (re-entrant)."""
        key = self._key(kind, spec)
        with self._guard:
            return self._run_locks.setdefault(key, threading.RLock())

    @contextmanager
    def use(self, kind: str, spec: Any, builder: Callable[[Any], T]) -> Iterator[T]:
        """The model, held for this caller alone until the block ends."""
        model = self.get(kind, spec, builder)
        with self.run_lock(kind, spec):
            yield model

    def loaded(self) -> list[Key]:
        """(kind, spec key) of every model built so far."""
        with self._guard:
            return list(self._models)

    def __contains__(self, item: tuple[str, Any]) -> bool:
        kind, spec = item
        with self._guard:
            return self._key(kind, spec) in self._models

    def clear(self) -> None:
        with self._guard:
            self._models.clear()


DEFAULT_POOL = ModelPool()


def default_pool() -> ModelPool:
    """The process-wide pool that tools use unless given another."""
    return DEFAULT_POOL
