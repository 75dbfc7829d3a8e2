"""One thread owns the backbone's decode loop; requests from any thread share its batch.

Each step is ONE forward: a token for every running row, packed with the whole new part of each
waiting request's prompt (as many as fit), so a request joins without stalling the others for a
prefill of its own. Then each row picks its next token with its own logits processors, streamer
and stopping criteria, and finished rows retire at once, so a new request joins on the next step
instead of waiting for the batch to drain (continuous batching).

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
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from models.decoding.decode_copy import attention_view
from models.decoding.prefix_cache import PrefixCache, token_prefix
from models.decoding.row_cache import Joining, RowCache
from models.errors import SignalgraphError

# Prompt positions that may join one step: a longer prompt joins alone, and the running rows wait
# that one step for it (about 0.7 s for 512 positions of SmolLM2 on 2 CPU cores).
STEP_PROMPT_POSITIONS = 512
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

    model: a transformers causal LM (a peft wrapper works too), in the dtype it decodes in. Steps
        run on it as is when it has the decode attention (models/decoding/decode_attention.py, as
        `decode_model` copies have), else on a view of its weights that does.
    stop_ids: tokens that end a row (the token itself is the last one returned).
    max_batch: the most rows decoded together; more requests wait their turn.
    on_step: called after each step with the number of rows in it (for benchmarks).
    on_join: called after each step that took requests in, with their number.
    prefix_cache: where finished rows leave their keys and values, so that a prompt that starts
        the same way computes only the rest.
    """

    def __init__(self, model, *, stop_ids: Iterable[int], max_batch: int = 16,
                 on_step: Callable[[int], None] | None = None, prefix_cache: PrefixCache | None = None,
                 on_join: Callable[[int], None] | None = None):
        self.model = attention_view(model)
        self._weights_version = 0
        self.prefix_cache = prefix_cache
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.max_batch = max_batch
        self.on_step = on_step
        self.on_join = on_join
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cache: RowCache | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._keep_logits = "logits_to_keep" in _forward_parameters(self.model)

    # --- the caller's side ----------------------------------------------------------------------

    def use(self, model, weights_version: int = 0) -> None:
        """Decode with this model from the next step on. A new model, or new weights (a changed
        `weights_version`), make what the prefix cache holds stale, so it is dropped."""
        model = attention_view(model)
        if model is not self.model or weights_version != self._weights_version:
            self.model = model
            self._keep_logits = "logits_to_keep" in _forward_parameters(model)
            self._weights_version = weights_version
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def submit(self, request: DecodeRequest) -> Future:
        """Queue a request; the future's result is the new token ids (a stop token ends them)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[DecodeRequest]) -> list[Future]:
        """Queue requests at once, so that the loop takes them in one step (as room allows)."""
        hidden = self.model.get_input_embeddings().embedding_dim
        for request in requests:
            if request.embeds.dim() != 2 or request.embeds.shape[0] == 0 or request.embeds.shape[1] != hidden:
                raise ValueError(f"a request's embeds must be (length >= 1, {hidden}), "
                                 f"got {tuple(request.embeds.shape)}")
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
                    admitted = self._take_waiting()
                try:
                    joining = [row for row in admitted if row.future.set_running_or_notify_cancel()
                               and not self._cancelled(row)]
                    self._drop_cancelled()
                    if self._running or joining:
                        self._step(joining)
                except Exception as exc:  # noqa: BLE001 - a fault in the loop itself: fail its rows, never hang them
                    for row in [*admitted, *self._running]:
                        if not row.future.done():
                            row.future.set_exception(exc)
                    self._running = []
                    self._cache = None

    def _take_waiting(self) -> list[_Row]:
        """The waiting requests that join the next step: as many as the batch has room for, while
        their prompts fit STEP_PROMPT_POSITIONS (a longer one joins alone)."""
        taken, positions = [], 0
        while self._waiting and len(self._running) + len(taken) < self.max_batch:
            length = self._waiting[0].request.embeds.shape[0]
            if taken and positions + length > STEP_PROMPT_POSITIONS:
                break
            taken.append(self._waiting.popleft())
            positions += length
        return taken

    def _fail_all(self, error: Exception) -> None:
        for row in [*self._waiting, *self._running]:
            if not row.future.done() and (row.future.running() or row.future.set_running_or_notify_cancel()):
                row.future.set_exception(error)
        self._waiting.clear()
        self._running = []
        self._cache = None

    def _step(self, joining: list[_Row]) -> None:
        """One forward: a token for every running row, then each joining row's prompt (after what
        it reuses from the prefix cache); then each row's own token choice."""
        model, running = self.model, self._running
        embeddings = model.get_input_embeddings()
        device, dtype = embeddings.weight.device, embeddings.weight.dtype
        if self._cache is None:
            config = model.config
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            self._cache = RowCache(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                                   head_dim, dtype, device)
        cache = self._cache
        joins, reused_layers, start = [], [], len(running)
        for row in joining:
            reused, layers = 0, None
            n = row.request.embeds.shape[0]
            if self.prefix_cache is not None and row.prefix:
                reused, layers = self.prefix_cache.lookup(row.prefix, limit=n - 1)  # compute at least one
            joins.append(Joining(start, n - reused, reused))
            reused_layers.append(layers)
            start += n - reused
        layout = cache.begin_step(joins, reused_layers)
        tokens = torch.tensor([row.tokens[-1] for row in running], dtype=torch.long, device=device)
        embeds = torch.cat([embeddings(tokens), *[row.request.embeds[j.reused:].to(device=device, dtype=dtype)
                                                  for row, j in zip(joining, joins)]])
        positions = torch.tensor([row.position for row in running]
                                 + [p for j in joins for p in range(j.reused, j.length)], device=device)
        last = torch.tensor([*range(len(running)), *[j.start + j.new - 1 for j in joins]], device=device)
        try:
            kwargs = {"logits_to_keep": last} if self._keep_logits else {}
            out = model(inputs_embeds=embeds[None], position_ids=positions[None], attention_mask=cache.step_mask(),
                        cache=cache, use_cache=True, step_layout=layout, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed forward leaves the batch's cache unusable
            for row in [*running, *joining]:
                row.future.set_exception(exc)
            self._running = []
            self._cache = None
            return
        cache.advance()
        logits = out.logits[0] if self._keep_logits else out.logits[0, last]
        if self.on_step is not None:
            self.on_step(layout.decoding + len(joins))
        if joining and self.on_join is not None:
            self.on_join(len(joining))
        for row in running:
            row.position += 1
        outcomes: list[bool | Exception] = [False] * len(running)
        for row, j in zip(joining, joins):
            row.position = j.length
            try:
                if row.request.streamer is not None:  # the prompt first: embeds only, so no ids
                    row.context.run(row.request.streamer.put, torch.empty(1, 0, dtype=torch.long))
                outcomes.append(False)
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the batch's
                row.future.set_exception(exc)
                outcomes.append(exc)
        rows = [*running, *joining]
        chosen = [index for index, outcome in enumerate(outcomes) if outcome is False]
        for index, outcome in zip(chosen, self._choose([rows[i] for i in chosen], logits[chosen])):
            outcomes[index] = outcome
        self._running = rows
        keep = []
        for index, (row, outcome) in enumerate(zip(rows, outcomes, strict=True)):
            if outcome is False:
                keep.append(index)
            elif outcome is True and self.prefix_cache is not None and row.prefix:
                self._remember(index, row)
        if len(keep) != len(rows):
            self._retire(keep)

    @staticmethod
    def _cancelled(row: _Row) -> bool:
        if row.request.cancel is not None and row.request.cancel.is_set():
            row.future.set_exception(DecodeCancelled("the generation was cancelled"))
            return True
        return False

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
        keep = [index for index, row in enumerate(self._running) if not self._cancelled(row)]
        if len(keep) != len(self._running):
            self._retire(keep)

    def _retire(self, keep: list[int]) -> None:
        """Keep only these running rows; the last rows move into the places of those that left (the
        cache copies no others), and an empty batch frees its cache."""
        if not keep:
            self._running = []
            self._cache = None
            return
        count, kept = len(keep), set(keep)
        order = list(range(count))
        holes = [i for i in range(count) if i not in kept]
        for hole, source in zip(holes, [i for i in keep if i >= count], strict=True):
            order[hole] = source
        self._running = [self._running[i] for i in order]
        self._cache.keep(order)


def _forward_parameters(model) -> set[str]:
    """The keyword arguments the underlying causal LM's forward takes (through a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)
