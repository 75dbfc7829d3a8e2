"""One thread owns the backbone's decode loop; requests from any thread share its batch.

Each step admits waiting requests (prefilled together, one padded forward for as many as fit),
then runs ONE forward for all running rows, picks each row's next token with that row's own logits
processors, streamer and stopping criteria, and retires finished rows at once, so a new request
joins on the next step instead of waiting for the batch to drain (continuous batching).

A row sees exactly what `transformers`' greedy `generate` would show it for a lone prompt given
as `inputs_embeds`: processors and stopping criteria get (1, generated ids so far) and (1, vocab)
float32 scores; a streamer gets an empty prompt first, then each token, then `end()`. So the
tokens are those of a lone `generate`, up to float rounding in the batched matmuls.
"""

from __future__ import annotations

import atexit
import contextvars
import inspect
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from transformers.cache_utils import DynamicCache

from models.decoding.prefix_cache import PrefixCache, token_prefix
from models.decoding.row_cache import RowCache
from models.errors import SignalgraphError


# Padding costs a prefill compute; a batch of 8 ~40-token prompts took half the time of their 8
# prefills one at a time on SmolLM2 here, so a batch may carry half as much padding as real tokens.
PAD_SLACK = 1.5
# Past this many positions (padding included) a prefill is compute-bound anyway, and one forward's
# activations and (rows, queries, keys) mask only grow: more rows go in another forward.
PREFILL_POSITIONS = 4096
IDLE_EXIT_S = 2.0  # the loop's thread ends after this long with nothing to do; a submit starts it again

# A loop thread still alive when the interpreter tears down aborts the process in torch's C++
# ("terminate called without an active exception"), so each live loop is stopped and joined first.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loops() -> None:
    for scheduler in list(_LIVE):
        scheduler.close()


class DecodeCancelled(SignalgraphError):
    """The request was cancelled before it finished."""


class SchedulerClosed(SignalgraphError):
    """The scheduler was closed; nothing more runs on it."""


@dataclass
class DecodeRequest:
    embeds: torch.Tensor  # (prompt length, hidden): the spliced prompt
    max_new_tokens: int
    logits_processors: list = field(default_factory=list)  # called as p(ids (1, n), scores (1, V))
    streamer: Any = None  # put(tensor) / end(), as transformers streamers
    stopping_criteria: list = field(default_factory=list)  # c(ids, scores) -> bool tensor
    cancel: threading.Event | None = None  # set it to stop the request; its future raises DecodeCancelled
    token_ids: list[int] | None = None  # the prompt's id at each position (negative: spliced features), for reuse


@dataclass
class _Row:
    request: DecodeRequest
    future: Future
    position: int = 0  # position id of the next token
    tokens: list[int] = field(default_factory=list)
    prefix: tuple[int, ...] = ()  # the prompt's leading token ids: its key in the prefix cache
    # the submitter's context variables (e.g. LangGraph's stream writer), for the row's callbacks
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class DecodeScheduler:
    """Continuous-batching greedy decoding over one causal LM.

    model: a transformers causal LM (a peft wrapper works too), in the dtype it decodes in.
    stop_ids: tokens that end a row (the token itself is the last one returned).
    max_batch: the most rows decoded together; more requests wait their turn.
    on_step: called after each step with the number of rows that stepped (for benchmarks).
    on_prefill: called after each prefill forward with the number of requests it prefilled.
    prefix_cache: where finished rows leave their keys and values, so that a prompt that starts
        the same way prefills only the rest.
    """

    def __init__(self, model, *, stop_ids: Iterable[int], max_batch: int = 16,
                 on_step: Callable[[int], None] | None = None, prefix_cache: PrefixCache | None = None,
                 on_prefill: Callable[[int], None] | None = None):
        self.model = model
        self._weights_version = 0
        self.prefix_cache = prefix_cache
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.max_batch = max_batch
        self.on_step = on_step
        self.on_prefill = on_prefill
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cache: RowCache | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._keep_logits = "logits_to_keep" in _forward_parameters(model)

    # --- the caller's side ----------------------------------------------------------------------

    def use(self, model, weights_version: int = 0) -> None:
        """Decode with this model from the next step on. A new model, or new weights (a changed
        `weights_version`), make what the prefix cache holds stale, so it is dropped."""
        if model is not self.model or weights_version != self._weights_version:
            self.model = model
            self._weights_version = weights_version
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def submit(self, request: DecodeRequest) -> Future:
        """Queue a request; the future's result is the new token ids (a stop token ends them)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[DecodeRequest]) -> list[Future]:
        """Queue requests at once, so that the loop admits them in one step (as room allows)."""
        for request in requests:
            if request.embeds.dim() != 2:
                raise ValueError(f"a request's embeds must be (length, hidden), got {tuple(request.embeds.shape)}")
        futures: list[Future] = [Future() for _ in requests]
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the decode scheduler is closed; build a new one")
            self._waiting.extend(_Row(request, future, prefix=token_prefix(request.token_ids))
                                 for request, future in zip(requests, futures, strict=True))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="signalgraph-decode", daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._cond.notify()
        return futures

    def close(self) -> None:
        """Stop the loop; waiting and running requests fail with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach here
            while True:
                with self._cond:
                    if not self._closed and not self._waiting and not self._running:
                        self._cond.wait(timeout=IDLE_EXIT_S)
                    if not self._closed and not self._waiting and not self._running:
                        self._thread = None  # idle: let the model go when nothing else holds it
                        return
                    if self._closed:
                        self._fail_all(SchedulerClosed("the decode scheduler was closed"))
                        return
                    admitted = []
                    while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                        admitted.append(self._waiting.popleft())
                try:
                    self._admit([row for row in admitted if row.future.set_running_or_notify_cancel()])
                    self._drop_cancelled()
                    if self._running:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - a fault in the loop itself: fail its rows, never hang them
                    for row in [*admitted, *self._running]:
                        if not row.future.done():
                            row.future.set_exception(exc)
                    self._running = []
                    self._cache = None

    def _fail_all(self, error: Exception) -> None:
        for row in [*self._waiting, *self._running]:
            if not row.future.done() and (row.future.running() or row.future.set_running_or_notify_cancel()):
                row.future.set_exception(error)
        self._waiting.clear()
        self._running = []
        self._cache = None

    def _admit(self, rows: list[_Row]) -> None:
        """Prefill the admitted requests, as few forwards as padding allows, and add them to the batch."""
        prefills = []
        for row in rows:
            if row.request.cancel is not None and row.request.cancel.is_set():
                row.future.set_exception(DecodeCancelled("the generation was cancelled"))
                continue
            reused, layers = 0, None
            n = row.request.embeds.shape[0]
            if self.prefix_cache is not None and row.prefix:
                reused, layers = self.prefix_cache.lookup(row.prefix, limit=n - 1)  # prefill at least one
            prefills.append(_Prefill(row, reused, layers))
        for batch in prefill_batches(prefills):
            self._prefill(batch)

    def _prefill(self, batch: list[_Prefill]) -> None:
        """One forward for rows that reuse equally long prefixes, then each row's first token.

        Each row's new positions come right after its reused ones and the padding after them all, so
        its keys, values and logits are a lone prefill's to the bit (SmolLM2 here; padding on the
        left moved the logits by about 5e-5, enough to flip a close greedy choice)."""
        reused, width = batch[0].reused, max(p.new for p in batch)
        device = batch[0].row.request.embeds.device
        embeds = torch.zeros(len(batch), width, batch[0].row.request.embeds.shape[1], dtype=self._dtype(),
                             device=device)
        mask = torch.zeros(len(batch), reused + width, dtype=torch.long, device=device)
        for index, prefill in enumerate(batch):
            embeds[index, :prefill.new] = prefill.row.request.embeds[reused:]
            mask[index, :reused + prefill.new] = 1
        last = torch.tensor([[p.new - 1] for p in batch], device=device)
        try:
            past = None
            if reused:
                past = DynamicCache()
                for layer in range(len(batch[0].layers)):
                    past.update(torch.cat([p.layers[layer][0] for p in batch]),
                                torch.cat([p.layers[layer][1] for p in batch]), layer)
            kwargs = {"logits_to_keep": last} if self._keep_logits else {}
            out = self.model(inputs_embeds=embeds, attention_mask=mask,
                             position_ids=torch.arange(reused, reused + width, device=device).repeat(len(batch), 1),
                             cache=past, use_cache=True, **kwargs)
            logits = out.logits[:, -1] if self._keep_logits else out.logits[torch.arange(len(batch)), last[:, 0]]
        except Exception as exc:  # noqa: BLE001 - these requests' failure, not the running batch's
            for prefill in batch:
                prefill.row.future.set_exception(exc)
            return
        if self.on_prefill is not None:
            self.on_prefill(len(batch))
        started, rows = [], []
        for index, prefill in enumerate(batch):
            row = prefill.row
            row.position = reused + prefill.new
            try:
                if row.request.streamer is not None:  # the prompt first: embeds only, so no ids
                    row.context.run(row.request.streamer.put, torch.empty(1, 0, dtype=torch.long))
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the batch's
                row.future.set_exception(exc)
                continue
            started.append(index)
            rows.append(row)
        if not rows:
            return
        for index, row, outcome in zip(started, rows, self._choose(rows, logits[started]), strict=True):
            if outcome is not False:  # finished at its first token, or failed
                continue
            n = row.position
            layers = [(layer.keys[index:index + 1, :, :n], layer.values[index:index + 1, :, :n])
                      for layer in out.cache.layers]
            if self._cache is None:
                self._cache = RowCache(len(layers))
            self._cache.add(layers)
            self._running.append(row)

    def _step(self) -> None:
        """One forward for every running row, then each row's own token choice."""
        cache = self._cache
        device = cache.valid.device
        tokens = torch.tensor([[row.tokens[-1]] for row in self._running], device=device)
        positions = torch.tensor([[row.position] for row in self._running], device=device)
        try:
            kwargs = {"logits_to_keep": 1} if self._keep_logits else {}
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=cache.step_mask(),
                             cache=cache, use_cache=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed forward leaves the batch's cache unusable
            for row in self._running:
                row.future.set_exception(exc)
            self._running = []
            self._cache = None
            return
        cache.advance()
        if self.on_step is not None:
            self.on_step(len(self._running))
        for row in self._running:
            row.position += 1
        keep = []
        for index, (row, outcome) in enumerate(zip(self._running, self._choose(self._running, out.logits[:, -1]),
                                                   strict=True)):
            if outcome is False:
                keep.append(index)
            elif outcome is True and self.prefix_cache is not None and row.prefix:
                self._remember(index, row)
        if len(keep) != len(self._running):
            self._retire(keep)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _remember(self, index: int, row: _Row) -> None:
        """Leave a finished row's keys and values in the prefix cache: its prompt's leading tokens,
        and its answer too when the whole prompt was tokens."""
        whole = len(row.prefix) == row.request.embeds.shape[0]
        ids = row.prefix + tuple(row.tokens[:-1]) if whole else row.prefix  # the last token was never fed
        cache = self._cache
        start = cache.length - (row.request.embeds.shape[0] + len(row.tokens) - 1)
        columns = slice(start, start + len(ids))
        self.prefix_cache.store(ids, [(layer.k_buf[index:index + 1, :, columns].clone(),
                                       layer.v_buf[index:index + 1, :, columns].clone()) for layer in cache.layers])

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[bool | Exception]:
        """Each row's next token from its row of `logits` (rows, vocab). Each row's processors work
        on its own row of one float32 copy, then one argmax picks every row's token. For each row:
        True when it finished (its future resolved), False when it goes on, or the exception its
        processor, streamer or criterion raised (its future failed with it). A row's callbacks run
        in the context of the thread that submitted it."""
        scores = logits.to(copy=True, dtype=torch.float32)
        outcomes: list[bool | Exception] = [False] * len(rows)
        for index, row in enumerate(rows):
            if row.request.logits_processors:
                try:
                    mine = scores[index:index + 1]
                    processed = row.context.run(self._process, row, mine)
                    if processed.data_ptr() != mine.data_ptr():
                        mine.copy_(processed)
                except Exception as exc:  # noqa: BLE001 - one row's processor failed, not the batch
                    outcomes[index] = exc
        tokens = scores.argmax(dim=-1).tolist()
        for index, row in enumerate(rows):
            if outcomes[index] is False:
                try:
                    outcomes[index] = row.context.run(self._take, row, tokens[index], scores[index:index + 1])
                except Exception as exc:  # noqa: BLE001 - one row's streamer or criterion failed
                    outcomes[index] = exc
            if isinstance(outcomes[index], Exception) and not row.future.done():
                row.future.set_exception(outcomes[index])
        return outcomes

    @staticmethod
    def _process(row: _Row, scores: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([row.tokens], dtype=torch.long, device=scores.device).reshape(1, -1)
        for processor in row.request.logits_processors:
            scores = processor(ids, scores)
        return scores

    def _take(self, row: _Row, token: int, scores: torch.Tensor) -> bool:
        """Give the row its token; True (and the future resolved) when the row is finished."""
        request = row.request
        row.tokens.append(token)
        if request.streamer is not None:
            request.streamer.put(torch.tensor([token]))
        stopped = False
        if request.stopping_criteria:
            ids = torch.tensor([row.tokens], dtype=torch.long, device=scores.device)
            stopped = any([bool(criterion(ids, scores).any()) for criterion in request.stopping_criteria])
        if token in self.stop_ids or len(row.tokens) >= request.max_new_tokens or stopped:
            if request.streamer is not None:
                request.streamer.end()
            row.future.set_result(row.tokens)
            return True
        return False

    def _drop_cancelled(self) -> None:
        keep = []
        for index, row in enumerate(self._running):
            if row.request.cancel is not None and row.request.cancel.is_set():
                row.future.set_exception(DecodeCancelled("the generation was cancelled"))
            else:
                keep.append(index)
        if len(keep) != len(self._running):
            self._retire(keep)

    def _retire(self, keep: list[int]) -> None:
        """Keep only these running rows; an empty batch frees its cache."""
        self._running = [self._running[i] for i in keep]
        if self._running:
            self._cache.keep(keep)
        else:
            self._cache = None


@dataclass
class _Prefill:
    row: _Row
    reused: int  # leading positions whose keys and values come from the prefix cache
    layers: list | None  # those keys and values, per layer (1, heads, reused, head_dim)

    @property
    def new(self) -> int:
        return self.row.request.embeds.shape[0] - self.reused


def prefill_batches(prefills: list[_Prefill]) -> list[list[_Prefill]]:
    """Rows that reuse equally long prefixes prefill together (a row's reused positions must end
    where the others' do), longest first, cut where padding would pass PAD_SLACK x the real tokens
    or the forward PREFILL_POSITIONS positions."""
    groups: dict[int, list[_Prefill]] = {}
    for prefill in sorted(prefills, key=lambda p: p.new, reverse=True):
        groups.setdefault(prefill.reused, []).append(prefill)
    batches = []
    for group in groups.values():
        batch: list[_Prefill] = []
        for prefill in group:
            padded = (len(batch) + 1) * (batch[0].new if batch else prefill.new)
            if batch and (padded > PREFILL_POSITIONS or padded > PAD_SLACK * (sum(p.new for p in batch) + prefill.new)):
                batches.append(batch)
                batch = []
            batch.append(prefill)
        batches.append(batch)
    return batches


def _forward_parameters(model) -> set[str]:
    """The keyword arguments the underlying causal LM's forward takes (through a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)
