"""Constrained tool-call decoding (xgrammar) on real models.

The strongest evidence is the tiny profile's *random* backbone: left alone it writes newlines or
byte soup, yet with the constraint every reply is a tool call that parses, names an allowed tool
and validates against that tool's JSON schema.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from graphs.signal_parser import parse_message
from models.decoding.constrained import ToolCallConstraint, compile_stats, tool_call_prefix
from models.errors import ConfigError

try:
    import jsonschema
except ImportError:  # not in the project's test extras (yet): a validator for the subset used here
    jsonschema = None

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
          "array": list, "null": type(None)}


def validate(instance, schema: dict, path: str = "$") -> None:
    """Validate against a JSON schema: with jsonschema when installed, else the subset below."""
    if jsonschema is not None:
        jsonschema.validate(instance, schema)
        return
    kind = schema.get("type")
    if kind:
        assert isinstance(instance, _TYPES[kind]) and not (kind in ("integer", "number")
                                                            and isinstance(instance, bool)), (path, instance)
    if "enum" in schema:
        assert instance in schema["enum"], (path, instance)
    if isinstance(instance, str):
        assert len(instance) <= schema.get("maxLength", len(instance)), (path, instance)
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        assert schema.get("minimum", instance) <= instance <= schema.get("maximum", instance), (path, instance)
    if isinstance(instance, list):
        assert len(instance) <= schema.get("maxItems", len(instance)), (path, instance)
        for i, item in enumerate(instance):
            validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(instance), (path, instance)
        if schema.get("additionalProperties") is False:
            assert set(instance) <= set(properties), (path, instance)
        for key, value in instance.items():
            if key in properties:
                validate(value, properties[key], f"{path}.{key}")

# Bounded strings and numbers, so that a random model (which writes uniformly at random inside
# a string) finishes its call within the token budget.
TOOLS = [
    {"name": "transcribe", "description": "Speech to text.",
     "parameters": {"type": "object", "properties": {"audio_id": {"type": "string", "maxLength": 12}},
                    "required": ["audio_id"]}},
    {"name": "generate_image", "description": "Text to image.",
     "parameters": {"type": "object",
                    "properties": {"prompt": {"type": "string", "maxLength": 20},
                                   "steps": {"type": "integer", "minimum": 1, "maximum": 50},
                                   "style": {"enum": ["photo", "sketch"]},
                                   "hd": {"type": "boolean"}},
                    "required": ["prompt"]}},
    {"name": "search_notes", "description": "Search the notes.",
     "parameters": {"type": "object",
                    "properties": {"query": {"type": "string", "maxLength": 16},
                                   "k": {"type": "integer", "minimum": 1, "maximum": 10},
                                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                            "maxItems": 3},
                                   "window": {"type": "object",
                                              "properties": {"days": {"type": "integer", "minimum": 0,
                                                                      "maximum": 99}},
                                              "required": ["days"]}},
                    "required": ["query", "k"]}},
    {"name": "stop_recording", "description": "No arguments.", "parameters": {"type": "object", "properties": {}}},
]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
PROMPTS = [f"{verb} {thing}" for verb in ("Please", "Could you", "Now", "Quickly", "Kindly")
           for thing in ("transcribe audio-1", "draw a cat", "search my notes", "stop recording")]


@pytest.fixture(scope="module")
def mm():
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    return MMLLM.from_profile(load_profile("tiny"), require_trained=False)




class _Ban:
    def __init__(self, ids):
        self.ids = ids

    def __call__(self, input_ids, scores):
        scores[:, self.ids] = float("-inf")
        return scores


def _no_surrogates(tokenizer) -> _Ban:
    """xgrammar 0.2.8 accepts UTF-8-encoded surrogates (ED A0..BF xx), which are invalid UTF-8;
    only a byte-by-byte random sampler finds them, so such tests hold the 0xED byte back."""
    import xgrammar as xgr

    vocab = xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab
    return _Ban([i for i, piece in enumerate(vocab) if piece == b"\xed"])


def _constraint(mm, **kwargs) -> ToolCallConstraint:
    b = mm.backbone
    return ToolCallConstraint(b.tokenizer, TOOLS, banned_token_ids=b.new_token_ids, **kwargs)


def _check_calls(text: str, *, allow_cut_last: bool = False) -> list:
    parsed = parse_message(text, tools=SCHEMAS, truncated=allow_cut_last)
    for call in parsed.tool_calls:
        assert not call.repaired, call.raw  # the constraint leaves nothing to repair
        json.loads(call.raw)  # strict JSON
        validate(call.arguments, SCHEMAS[call.name])
        assert "[IMG" not in call.raw and "[AUD" not in call.raw
    if allow_cut_last:
        assert len(parsed.malformed) <= 1 and all("cut off" in m.error for m in parsed.malformed)
    else:
        assert parsed.malformed == []
    return parsed.tool_calls


def test_forced_calls_from_a_random_model_parse_and_validate(mm):
    constraint = _constraint(mm, force_tool_call=True, parallel_tool_calls=False)
    named = set()
    for prompt in PROMPTS:
        out = mm.generate([{"role": "user", "content": prompt}], max_new_tokens=300, logits_processors=[constraint])
        assert len(out.token_ids) < 300, "the call did not finish"
        assert out.text.startswith("<tool_call>") and out.text.endswith("</tool_call>")
        (call,) = _check_calls(out.text)
        named.add(call.name)
    assert named <= set(SCHEMAS)


def test_sampled_calls_cover_the_schemas_and_all_validate(mm, chaotic_mm):
    """Sampling at temperature 1 from a random model: as adversarial a writer as there is."""
    from transformers import LogitsProcessorList

    from models.decoding.signal_spans import SignalSpanProcessor

    names = set()
    for model in (mm, chaotic_mm):
        b = model.backbone
        constraint = _constraint(model, force_tool_call=True)
        no_surrogates = _no_surrogates(b.tokenizer)
        for seed in range(6):
            torch.manual_seed(seed)
            ids = torch.tensor([b.chat_ids([{"role": "user", "content": PROMPTS[seed]}])])
            out = b.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                   top_k=0, max_new_tokens=250, pad_token_id=b.tokenizer.pad_token_id,
                                   logits_processor=LogitsProcessorList([SignalSpanProcessor(b.signal_ids),
                                                                         no_surrogates, constraint]))
            new = out[0, ids.shape[1]:].tolist()
            text = b.tokenizer.decode(new, skip_special_tokens=False).removesuffix(b.tokenizer.eos_token)
            assert text.startswith("<tool_call>")
            names |= {c.name for c in _check_calls(text, allow_cut_last=len(new) == 250)}
    assert len(names) >= 3  # the grammar lets the model reach the different tools


def test_batch_rows_are_constrained_independently(mm):
    b = mm.backbone
    constraint = _constraint(mm, force_tool_call=True, parallel_tool_calls=False)
    prompts = [b.chat_ids([{"role": "user", "content": p}]) for p in ("one", "another prompt")]
    width = max(map(len, prompts))
    pad = b.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(1)
    out = b.model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=250, pad_token_id=pad,
                           logits_processor=[_no_surrogates(b.tokenizer), constraint])
    for row in out[:, width:].tolist():
        text = b.tokenizer.decode(row, skip_special_tokens=False)
        text = text.split(b.tokenizer.eos_token)[0]
        assert len(_check_calls(text)) == 1


def test_without_force_free_text_is_untouched(mm, chaotic_mm):
    """No `<tool_call>` written: the constrained output equals the unconstrained one token for token."""
    for model in (mm, chaotic_mm):
        constraint = _constraint(model)
        for prompt in PROMPTS[:4]:
            chat = [{"role": "user", "content": prompt}]
            free = model.generate(chat, max_new_tokens=40)
            constrained = model.generate(chat, max_new_tokens=40, logits_processors=[constraint])
            assert "<tool_call>" not in free.text
            assert constrained.token_ids == free.token_ids


def _feed(constraint, tokenizer, text: str, vocab: int) -> torch.Tensor:
    """Run the processor as generate() would over `text`, token by token; the next-token scores."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    scores = None
    for n in range(len(ids) + 1):
        scores = constraint(torch.tensor([ids[:n]], dtype=torch.long), torch.zeros(1, vocab))
    return scores[0]


def test_after_the_trigger_only_the_call_format_is_allowed(mm):
    tok = mm.backbone.tokenizer
    vocab = len(tok)
    constraint = _constraint(mm)
    free = _feed(constraint, tok, "Sure, I will <tool", vocab)
    assert torch.isfinite(free).all()  # free text: nothing masked
    inside = _feed(_constraint(mm), tok, "Sure. <tool_call>", vocab)
    assert torch.isfinite(inside).nonzero().flatten().tolist() == tok.convert_tokens_to_ids(["{"])
    in_name = _feed(_constraint(mm), tok, 'Sure. <tool_call>{"name": "', vocab)
    allowed = {tok.decode([i]) for i in torch.isfinite(in_name).nonzero().flatten().tolist()}
    assert allowed == {"t", "g", "s"}  # the first letters of the tool names
    done = _feed(_constraint(mm), tok, tool_call_prefix("stop_recording") + "{}}</tool_call>", vocab)
    assert torch.isfinite(done).all()  # free again after the call


def test_eos_and_signal_tokens_are_masked_inside_a_call(mm):
    b = mm.backbone
    scores = _feed(_constraint(mm), b.tokenizer, tool_call_prefix("transcribe") + '{"audio_id": "a', len(b.tokenizer))
    assert scores[b.tokenizer.eos_token_id] == float("-inf")
    assert all(scores[i] == float("-inf") for i in b.new_token_ids)
    assert torch.isfinite(scores[b.tokenizer.convert_tokens_to_ids('"')])


def test_special_tokens_other_than_stop_are_masked_inside_a_call(mm):
    # xgrammar lets the tiny tokenizer's pad token into a plain JSON string; it would end the call there
    b = mm.backbone
    tools = [{"name": "note", "description": "d",
              "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}]
    constraint = ToolCallConstraint(b.tokenizer, tools, banned_token_ids=b.new_token_ids)
    scores = _feed(constraint, b.tokenizer, tool_call_prefix("note") + '{"text": "a', len(b.tokenizer))
    specials = set(b.tokenizer.all_special_ids) - set(constraint.stop_token_ids)
    assert b.tokenizer.pad_token_id in specials
    assert all(scores[i] == float("-inf") for i in specials)


def test_force_requires_a_call_first_and_single_call_then_stops(mm):
    tok = mm.backbone.tokenizer
    vocab = len(tok)
    first = _feed(_constraint(mm, force_tool_call=True), tok, "", vocab)
    assert torch.isfinite(first).nonzero().flatten().tolist() == tok.convert_tokens_to_ids(["<"])
    call = tool_call_prefix("stop_recording") + "{}}</tool_call>"
    after = _feed(_constraint(mm, force_tool_call=True, parallel_tool_calls=False), tok, call, vocab)
    assert torch.isfinite(after).nonzero().flatten().tolist() == [tok.eos_token_id]


def test_wider_model_vocabulary_masks_the_padding_rows(mm):
    tok = mm.backbone.tokenizer
    wide = len(tok) + 13  # lm_head rows beyond the tokenizer, as in padded vocabularies
    constraint = ToolCallConstraint(tok, TOOLS, vocab_size=wide)
    scores = _feed(constraint, tok, "<tool_call>", wide)
    assert scores.shape[0] == wide and (scores[len(tok):] == float("-inf")).all()
    # a constraint built for the tokenizer's size adapts when the logits are wider
    scores = _feed(ToolCallConstraint(tok, TOOLS), tok, "<tool_call>", wide)
    assert (scores[len(tok):] == float("-inf")).all()


def test_reused_across_generations(mm):
    constraint = _constraint(mm, force_tool_call=True, parallel_tool_calls=False)
    for prompt in ("first", "second", "first"):
        out = mm.generate([{"role": "user", "content": prompt}], max_new_tokens=300, logits_processors=[constraint])
        assert len(_check_calls(out.text)) == 1


def test_no_tools_is_a_no_op(mm):
    constraint = ToolCallConstraint(mm.backbone.tokenizer, [])
    scores = torch.randn(1, len(mm.backbone.tokenizer))
    assert torch.equal(constraint(torch.tensor([[1, 2]]), scores.clone()), scores)
    assert not constraint.active


def test_compiled_grammars_are_cached(mm):
    tok = mm.backbone.tokenizer
    tools = [{"name": "fresh_tool", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}]
    compiled = compile_stats["compiled"]
    start = time.perf_counter()
    ToolCallConstraint(tok, tools)
    first = time.perf_counter() - start
    hits = compile_stats["cache_hits"]
    ToolCallConstraint(tok, tools)
    assert compile_stats["compiled"] == compiled + 1 and compile_stats["cache_hits"] == hits + 1
    print(f"\n[grammar] compiled in {first * 1000:.1f} ms (tiny tokenizer)")


def test_openai_style_tools_and_bad_schemas(mm):
    tok = mm.backbone.tokenizer
    openai = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert ToolCallConstraint(tok, openai).tool_names == ["f"]
    with pytest.raises(ConfigError, match="tool-call grammar.*broken"):
        ToolCallConstraint(tok, [{"name": "broken", "parameters": {"type": "frobnicate"}}])
    with pytest.raises(ConfigError, match="unique"):
        ToolCallConstraint(tok, TOOLS + TOOLS[:1])


# --- the real backbone ----------------------------------------------------------------------

SMOKE_TOOLS = [
    {"name": "transcribe", "description": "Transcribe speech in an audio file to text. audio_id is like audio-1.",
     "parameters": {"type": "object", "properties": {"audio_id": {"type": "string"}}, "required": ["audio_id"]}},
    {"name": "generate_image", "description": "Generate an image from a text description.",
     "parameters": {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"]}},
    {"name": "search_notes", "description": "Search the user's notes for passages about a query.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                     "k": {"type": "integer", "default": 3}},
                    "required": ["query"]}},
]
SMOKE_PROMPTS = [
    ("Please transcribe audio-1.", "transcribe"),
    ("Generate an image of a red bicycle on a beach.", "generate_image"),
    ("Search my notes for the meeting with Anna.", "search_notes"),
    ("What is said in audio-2? Transcribe it.", "transcribe"),
    ("Search my notes about the budget.", "search_notes"),
]


@pytest.mark.smoke
def test_smollm2_forced_tool_calls_parse_and_name_real_tools():
    from agent.chat_model import SignalgraphChatModel

    llm = SignalgraphChatModel(profile_name="local", max_tokens=80).bind_tools(SMOKE_TOOLS, tool_choice="any")
    right = 0
    for prompt, expected in SMOKE_PROMPTS:
        start = time.perf_counter()
        reply = llm.invoke(prompt)
        seconds = time.perf_counter() - start
        print(f"\n[smollm2] {seconds:.1f}s {prompt!r} -> {reply.tool_calls} {reply.invalid_tool_calls}")
        assert reply.invalid_tool_calls == [] and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call["name"] in {t["name"] for t in SMOKE_TOOLS}
        validate(call["args"], next(t["parameters"] for t in SMOKE_TOOLS if t["name"] == call["name"]))
        right += call["name"] == expected
    print(f"[smollm2] right tool in {right}/{len(SMOKE_PROMPTS)}")
    assert right >= 3
