"""The server's turn queue: a bounded number of turns at once, one at a time per session."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from agent.server.schemas import ApiError


class TurnQueue:
    """Up to `workers` jobs at once (the backbone batches their decoding); up to `size` more wait;
    beyond that, 429. Jobs with the same key (a session) run one after another: only a session's
    oldest job is handed to a worker, so its later turns wait without holding one."""

    def __init__(self, size: int, workers: int = 1):
        self.size = size
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="signalgraph-turn")
        self._lock = threading.Lock()
        self._admitted = 0
        self._keys: dict[str, deque] = {}  # session -> its admitted jobs, oldest (running) first

    def submit(self, job: Callable[[], Any], key: str | None = None) -> Future:
        future: Future = Future()
        with self._lock:
            if self._admitted >= self.size + self.workers:
                raise ApiError(429, f"the server is busy: {self.workers} turn(s) are running and {self.size} are "
                                    "waiting; try again shortly", code="queue_full")
            self._admitted += 1
            if key is not None:
                jobs = self._keys.setdefault(key, deque())
                jobs.append((job, future))
                if len(jobs) > 1:
                    return future  # started when the session's earlier jobs are done
        self._start(job, future, key)
        return future

    @property
    def busy(self) -> int:
        """Turns admitted and not finished: running or waiting."""
        with self._lock:
            return self._admitted

    def _start(self, job: Callable[[], Any], future: Future, key: str | None) -> None:
        def run():
            future.set_running_or_notify_cancel()
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                self._finish(key)
                future.set_exception(exc)
            else:
                self._finish(key)  # before the result is out, so a caller's next turn finds room
                future.set_result(result)
        self._executor.submit(run)

    def _finish(self, key: str | None) -> None:
        with self._lock:
            self._admitted -= 1
            if key is None:
                return
            jobs = self._keys[key]
            jobs.popleft()
            if not jobs:
                del self._keys[key]
                return
            following = jobs[0]
        self._start(*following, key)
