"""Constrained decoding of tool calls: once the backbone writes `<tool_call>`, what follows must
be `{"name": <an allowed tool>, "arguments": <that tool's JSON schema>}</tool_call>`.

Small local models break output formats (smolagents #201 #1251, TaskMatrix #324); masking the
logits with a grammar makes a tool call that parses the only thing the model *can* write once
it has decided to call a tool. Outside tool calls decoding is free: text and signal spans are
untouched.

The grammar is an xgrammar structural tag: free text with the trigger `<tool_call>`, each tool
one tag whose begin string fixes the name (`<tool_call>{"name": "NAME", "arguments": `), whose
content is the tool's JSON schema and whose end is `}</tool_call>`. With `force_tool_call`
(tool_choice "required" or a named tool) the output must be one or more tool calls and nothing
else. Compiled grammars are cached per (tokenizer, vocabulary size, tools, options).

    constraint = ToolCallConstraint(tokenizer, tools, vocab_size=model_vocab)
    model.generate(..., logits_processor=LogitsProcessorList([constraint]))
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from models.errors import ConfigError

log = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_MAX_CACHED_GRAMMARS = 64


def tool_call_prefix(name: str) -> str:
    """What the constrained format fixes before a tool's arguments."""
    return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": '


def normalize_tools(tools: Iterable[dict]) -> list[dict]:
    """{"name", "description", "parameters"} per tool; OpenAI's {"type": "function", ...} too."""
    out = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ConfigError(f"a tool must be a dict with a name and a JSON schema, got {type(tool).__name__}")
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a tool needs a non-empty string name, got {tool!r:.200}")
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ConfigError(f"the parameters of tool {name!r} must be a JSON schema object")
        out.append({"name": name, "description": tool.get("description", ""), "parameters": params})
    names = [t["name"] for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"tool names must be unique; repeated: {', '.join(duplicates)}")
    return out


# --- compiled grammar cache -----------------------------------------------------------------

class _TokenizerEntry:
    def __init__(self):
        self.lock = threading.Lock()
        self.compilers: dict[tuple, Any] = {}  # (len(tokenizer), vocab_size, stops) -> GrammarCompiler
        self.grammars: OrderedDict[tuple, Any] = OrderedDict()


_entries: weakref.WeakKeyDictionary[Any, _TokenizerEntry] = weakref.WeakKeyDictionary()
_entries_lock = threading.Lock()
compile_stats = {"compiled": 0, "cache_hits": 0, "last_compile_s": 0.0}


def _entry(tokenizer) -> _TokenizerEntry:
    with _entries_lock:
        entry = _entries.get(tokenizer)
        if entry is None:
            entry = _entries[tokenizer] = _TokenizerEntry()
        return entry


def _compiler(entry: _TokenizerEntry, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    """(GrammarCompiler, ids of tokens holding control characters) for this vocabulary."""
    import xgrammar as xgr

    key = (len(tokenizer), vocab_size, stop_ids)
    if key not in entry.compilers:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_ids) or None)
        control = [i for i, piece in enumerate(info.decoded_vocab) if _CONTROL.intersection(piece)]
        entry.compilers[key] = (xgr.GrammarCompiler(info, max_threads=2), control)
    return entry.compilers[key]


# Raw control characters are invalid inside JSON strings, but xgrammar 0.2.8 lets them into
# strings with minLength/maxLength; tokens holding one are banned inside tool calls (JSON never
# needs them: whitespace between values can be spaces and newlines).
_CONTROL = frozenset(set(range(0x20)) - {0x0A, 0x0D, 0x20})


def control_token_ids(tokenizer, vocab_size: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    entry = _entry(tokenizer)
    with entry.lock:
        return _compiler(entry, tokenizer, vocab_size, stop_ids)[1]


def structural_tag(tools: list[dict], *, force: bool, max_whitespace: int | None,
                   excluded: tuple[str, ...], parallel: bool = True):
    """The xgrammar structural tag for these tools (see the module docstring)."""
    from xgrammar import structural_tag as st

    tags = [
        st.TagFormat(
            begin=tool_call_prefix(t["name"]),
            content=st.JSONSchemaFormat(json_schema=t["parameters"], max_whitespace_cnt=max_whitespace,
                                        excludes=list(excluded)),  # (xgrammar then drops min/maxLength)
            end="}" + TOOL_CALL_CLOSE,
        )
        for t in tools
    ]
    if force:
        fmt = st.TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
    else:
        fmt = st.TriggeredTagsFormat(triggers=[TOOL_CALL_OPEN], tags=tags, stop_after_first=not parallel)
    return st.StructuralTag(format=fmt)


def compiled_grammar(tokenizer, tools: list[dict], *, vocab_size: int, stop_ids: tuple[int, ...],
                     force: bool, max_whitespace: int | None, excluded: tuple[str, ...] = (),
                     parallel: bool = True):
    import time

    entry = _entry(tokenizer)
    shape = [(t["name"], t["parameters"]) for t in tools]  # descriptions do not change the grammar
    key = (len(tokenizer), vocab_size, stop_ids, json.dumps(shape, sort_keys=True, default=str), force,
           max_whitespace, excluded, parallel)
    with entry.lock:
        hit = entry.grammars.get(key)
        if hit is not None:
            entry.grammars.move_to_end(key)
            compile_stats["cache_hits"] += 1
            return hit
        compiler = _compiler(entry, tokenizer, vocab_size, stop_ids)[0]
        tag = structural_tag(tools, force=force, max_whitespace=max_whitespace, excluded=excluded, parallel=parallel)
        start = time.perf_counter()
        try:
            grammar = compiler.compile_structural_tag(tag)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError on unsupported schemas
            names = ", ".join(t["name"] for t in tools)
            raise ConfigError(f"could not build the tool-call grammar for tools [{names}]: {exc}") from None
        compile_stats["compiled"] += 1
        compile_stats["last_compile_s"] = time.perf_counter() - start
        entry.grammars[key] = grammar
        while len(entry.grammars) > _MAX_CACHED_GRAMMARS:
            entry.grammars.popitem(last=False)
        return grammar


def _mask_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "torch_native"
    return "torch_native"


# --- the logits processor -------------------------------------------------------------------

class ToolCallConstraint:
    """A transformers logits processor that keeps tool calls inside the tools' schemas.

    tokenizer: the backbone's (Hugging Face) tokenizer.
    tools: [{"name", "description", "parameters": JSON schema}] (OpenAI tool dicts work too).
    force_tool_call: the output must open with a tool call and consist of tool calls only
        (separated by newlines); for tool_choice "required" or a named tool.
    parallel_tool_calls: False ends the output right after the first tool call (only a stop
        token may follow), which keeps a small model from rambling into further calls.
    vocab_size: the model's vocabulary (its lm_head rows), which may exceed the tokenizer's.
        Defaults to the tokenizer's; if the logits turn out wider, the grammar is recompiled
        (cached) for their width, so a mismatch never leaves tokens unmasked.
    stop_token_ids: what ends generation (default: the tokenizer's eos).
    max_whitespace: the most consecutive whitespace characters inside the JSON (None: any);
        bounded so that an unsure model cannot pad forever.
    banned_token_ids: tokens never allowed inside a tool call (give the backbone's signal tokens
        and media placeholders: a signal span inside the arguments would be read as a span). The
        tokenizer's special tokens other than the stop tokens are always banned there.
    excluded: substrings forbidden in the arguments' strings. Off by default: xgrammar 0.2.8
        then ignores minLength/maxLength of those strings.

    Reusable: state resets when a new generation starts (the sequence does not continue the
    last one seen); `reset()` forces it. With no tools it is a no-op.
    """

    def __init__(self, tokenizer, tools: list[dict] | None, *, force_tool_call: bool = False,
                 parallel_tool_calls: bool = True, vocab_size: int | None = None,
                 stop_token_ids: Iterable[int] | None = None,
                 max_whitespace: int | None = 2, banned_token_ids: Iterable[int] = (),
                 excluded: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.tools = normalize_tools(tools or [])
        self.force_tool_call = bool(force_tool_call and self.tools)
        self.parallel_tool_calls = parallel_tool_calls
        if stop_token_ids is None:
            eos = tokenizer.eos_token_id
            stop_token_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.stop_token_ids = tuple(sorted(set(int(i) for i in stop_token_ids)))
        self.max_whitespace = max_whitespace
        self.excluded = tuple(excluded)
        self.vocab_size = vocab_size or max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        self.banned_token_ids = sorted(set(int(i) for i in banned_token_ids))
        self._grammars: dict[int, Any] = {}
        self._bans: dict[int, torch.Tensor] = {}
        if self.tools:
            self._grammar(self.vocab_size)  # compile now: a bad schema fails here, not mid-generation
        self.reset()

    @property
    def active(self) -> bool:
        return bool(self.tools)

    @property
    def tool_names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    def _grammar(self, vocab_size: int):
        if vocab_size not in self._grammars:
            self._grammars[vocab_size] = compiled_grammar(
                self.tokenizer, self.tools, vocab_size=vocab_size, stop_ids=self.stop_token_ids,
                force=self.force_tool_call, max_whitespace=self.max_whitespace, excluded=self.excluded,
                parallel=self.parallel_tool_calls)
        return self._grammars[vocab_size]

    def _ban(self, vocab_size: int) -> torch.Tensor:
        """A bitmask row with the bits of the tokens banned inside tool calls cleared."""
        if vocab_size not in self._bans:
            import numpy as np

            words = (vocab_size + 31) // 32
            banned = set(self.banned_token_ids)
            banned |= set(control_token_ids(self.tokenizer, vocab_size, self.stop_token_ids))
            # special tokens (pad, <|im_start|>) are no text: xgrammar may see none of them as
            # special and let them into strings, where a pad token would end the call mid-string
            banned |= set(self.tokenizer.all_special_ids) - set(self.stop_token_ids)
            row = np.full(words, 0xFFFFFFFF, dtype=np.uint32)
            for token in sorted(banned):
                if token < words * 32:
                    row[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF)
            self._bans[vocab_size] = torch.from_numpy(row.view(np.int32).copy())
        return self._bans[vocab_size]

    def reset(self) -> None:
        self._matchers: list | None = None
        self._bitmask: torch.Tensor | None = None
        self._length = -1  # sequence length at the last call
        self._last: list[int] = []
        self._broken: set[int] = set()

    def _start(self, input_ids: torch.LongTensor, vocab_size: int) -> None:
        import xgrammar as xgr

        grammar = self._grammar(vocab_size)
        batch = input_ids.shape[0]
        self._matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        self._bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
        self._broken = set()

    def _continues(self, input_ids: torch.LongTensor) -> bool:
        """Whether this call continues the generation of the previous call."""
        if self._matchers is None or len(self._matchers) != input_ids.shape[0]:
            return False
        if input_ids.shape[1] != self._length + 1:
            return False
        if self._length > 0:
            previous = input_ids[:, self._length - 1].tolist()
            return previous == self._last
        return True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.tools:
            return scores
        if self._continues(input_ids):
            new = input_ids[:, -1].tolist()
            for row, (matcher, token) in enumerate(zip(self._matchers, new)):
                if row in self._broken or matcher.is_terminated():
                    continue
                if not matcher.accept_token(token):
                    # another processor forced a token the grammar does not allow; stop
                    # constraining this row rather than mask everything
                    log.warning("tool-call constraint: token %d left the grammar; row %d now decodes freely",
                                token, row)
                    self._broken.add(row)
        else:
            self._start(input_ids, scores.shape[-1])
        self._length = input_ids.shape[1]
        self._last = input_ids[:, -1].tolist() if self._length else []

        rows = []
        for row, matcher in enumerate(self._matchers):
            if row in self._broken or matcher.is_terminated():
                continue
            if matcher.fill_next_token_bitmask(self._bitmask, row):
                # a mask is needed only inside a tool call (free text allows every token)
                self._bitmask[row] &= self._ban(scores.shape[-1])
                rows.append(row)
        if rows:
            import xgrammar as xgr

            bitmask = self._bitmask.to(scores.device, non_blocking=True)
            if scores.dtype == torch.float32 or scores.device.type != "cpu":
                xgr.apply_token_bitmask_inplace(scores, bitmask, indices=rows,
                                                backend=_mask_backend(scores.device))
            else:  # the CPU kernel takes float32 only
                as_float = scores.float()
                xgr.apply_token_bitmask_inplace(as_float, bitmask, indices=rows, backend="cpu")
                scores.copy_(as_float)
        return scores

    def __repr__(self) -> str:
        return (f"ToolCallConstraint(tools={self.tool_names}, force_tool_call={self.force_tool_call}, "
                f"parallel_tool_calls={self.parallel_tool_calls}, vocab_size={self.vocab_size})")
