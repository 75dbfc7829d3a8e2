"""The decode scheduler: rows decoded together give each request the tokens a lone `generate` gives.

The backbone is the tiny profile's with larger random weights (conftest's `chaotic_mm`), so rows
write varied tokens and a mix-up between rows would show. The reference is transformers' own greedy
`generate` on one prompt at a time.
"""

from __future__ import annotations

import contextvars
import json
import threading
from concurrent.futures import Future

import pytest
import torch
from transformers import LogitsProcessorList

from models.decoding import DecodeCancelled, DecodeRequest, DecodeScheduler
from models.decoding.constrained import ToolCallConstraint, tool_call_prefix
from models.decoding.signal_spans import SignalSpanProcessor

TOOLS = [{"name": "transcribe", "description": "Speech to text.",
          "parameters": {"type": "object", "properties": {"audio_id": {"type": "string", "maxLength": 6}},
                         "required": ["audio_id"]}}]
QUESTIONS = ["hi", "What is in this picture, and why is it there?", "Draw a red circle.",
             "Tell me a long story about a fox who learns to read the stars at night."]


def embeds(mm, text: str) -> torch.Tensor:
    return mm.backbone.splice(mm.backbone.chat_ids([{"role": "user", "content": text}]), {})[0]


def stops(mm) -> set[int]:
    tokenizer = mm.backbone.tokenizer
    return {tokenizer.eos_token_id, tokenizer.pad_token_id, mm.backbone.model.generation_config.eos_token_id}


def answer(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Up to and including the first stop token: what both decoders agree to return."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:end]


def lone(mm, prompt: torch.Tensor, processors: list, max_new_tokens: int, model=None) -> list[int]:
    """transformers' greedy generate on this one prompt (on the backbone, or `model`)."""
    with torch.no_grad():
        out = (model or mm.backbone.model).generate(
            inputs_embeds=prompt[None], attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=mm.backbone.tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList(processors))
    return answer(out[0].tolist(), stops(mm))


class ForceAt:
    """Writes `token` as the `step`-th new token: makes the random model open a signal span."""

    def __init__(self, step: int, token: int):
        self.step, self.token = step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.step:
            scores[:] = float("-inf")
            scores[:, self.token] = 0.0
        return scores


class FailAt:
    def __init__(self, step: int):
        self.step = step

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.step:
            raise RuntimeError("a processor failed")
        return scores


class Collect:
    """A streamer that keeps what it is given; `seen` is set once `after` tokens came."""

    def __init__(self, after: int = 1):
        self.ids: list[int] = []
        self.prompts = 0
        self.ended = False
        self.after = after
        self.seen = threading.Event()

    def put(self, value):
        if value.numel() == 0:
            self.prompts += 1
            return
        self.ids += value.flatten().tolist()
        if len(self.ids) >= self.after:
            self.seen.set()

    def end(self):
        self.ended = True


@pytest.fixture
def scheduler(chaotic_mm):
    steps: list[int] = []
    joined: list[int] = []
    scheduler = DecodeScheduler(chaotic_mm.backbone.model, stop_ids=stops(chaotic_mm), on_step=steps.append,
                                on_join=joined.append)
    scheduler.steps, scheduler.joined = steps, joined
    yield scheduler
    scheduler.close()


def test_batched_rows_of_different_lengths_match_lone_generation(chaotic_mm, scheduler):
    prompts = [embeds(chaotic_mm, q) for q in QUESTIONS]
    assert len({p.shape[0] for p in prompts}) == len(prompts)
    span = SignalSpanProcessor(chaotic_mm.backbone.signal_ids)
    futures = scheduler.submit_all([DecodeRequest(p, 24, [span]) for p in prompts])
    got = [answer(f.result(timeout=60), stops(chaotic_mm)) for f in futures]
    assert got == [lone(chaotic_mm, p, [span], 24) for p in prompts]
    assert max(scheduler.steps) == len(prompts)  # decoded together, not one after another
    assert scheduler.joined == [len(prompts)]  # all prompts computed in the first step, with no padding


def test_the_decode_copy_with_packed_linears_decodes_rows_together_as_alone(chaotic_mm):
    from models.decoding import decode_model
    from models.decoding.packed_linear import PackedLinear

    model = decode_model(chaotic_mm.backbone.model)
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    scheduler = DecodeScheduler(model, stop_ids=stops(chaotic_mm))
    prompts = [embeds(chaotic_mm, q) for q in QUESTIONS]
    futures = [scheduler.submit(DecodeRequest(p, 24)) for p in prompts]
    got = [answer(f.result(timeout=60), stops(chaotic_mm)) for f in futures]
    scheduler.close()
    assert got == [lone(chaotic_mm, p, [], 24, model=model) for p in prompts]
    with torch.no_grad():  # and the packed layers compute what the plain ones do
        x = torch.randn(3, 5, chaotic_mm.backbone.hidden_size)
        plain = chaotic_mm.backbone.model.model.layers[0].mlp.up_proj
        torch.testing.assert_close(model.model.layers[0].mlp.up_proj(x), plain(x), rtol=1e-4, atol=1e-5)


def test_the_decode_copys_step_attention_matches_sdpa_with_and_without_padding(chaotic_mm):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from models.decoding import decode_model
    from models.decoding.decode_attention import NAME, decode_attention_forward

    assert decode_model(chaotic_mm.backbone.model).config._attn_implementation == NAME
    assert chaotic_mm.backbone.model.config._attn_implementation == "sdpa"  # the model itself is left alone
    attention = chaotic_mm.backbone.model.model.layers[0].self_attn
    heads, key_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
    torch.manual_seed(0)
    query, key, value = torch.randn(3, heads, 1, 16), torch.randn(3, key_heads, 20, 16), torch.randn(3, key_heads,
                                                                                                     20, 16)
    padding = torch.zeros(3, 1, 1, 20)
    padding[1, ..., :6] = float("-inf")  # a shorter row, padded on the left
    for mask in (None, padding):
        got, _ = decode_attention_forward(attention, query, key, value, mask, scaling=0.25)
        want, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=0.25)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # a padded row's keys really are left out
        torch.testing.assert_close(decode_attention_forward(attention, query, key, value, padding, scaling=0.25)[0],
                                   decode_attention_forward(attention, query, key, value, None, scaling=0.25)[0])


def test_requests_join_while_others_decode(chaotic_mm, scheduler):
    first = Collect(after=6)
    long = scheduler.submit(DecodeRequest(embeds(chaotic_mm, QUESTIONS[3]), 40, [], first))
    assert first.seen.wait(timeout=60)
    late = scheduler.submit_all([DecodeRequest(embeds(chaotic_mm, q), 12) for q in QUESTIONS[:3]])
    assert answer(long.result(timeout=60), stops(chaotic_mm)) == lone(chaotic_mm, embeds(chaotic_mm, QUESTIONS[3]),
                                                                      [], 40)
    for q, future in zip(QUESTIONS[:3], late):
        assert answer(future.result(timeout=60), stops(chaotic_mm)) == lone(chaotic_mm, embeds(chaotic_mm, q), [], 12)
    # the late prompts were computed in one step that also decoded the long row: it never waited for them
    assert scheduler.joined == [1, 3] and max(scheduler.steps) == 4


def test_prompts_past_a_steps_budget_join_in_later_steps(chaotic_mm, scheduler, monkeypatch):
    from models.decoding import scheduler as module

    prompts = [embeds(chaotic_mm, q) for q in QUESTIONS]
    monkeypatch.setattr(module, "STEP_PROMPT_POSITIONS", prompts[0].shape[0] + prompts[1].shape[0])
    futures = scheduler.submit_all([DecodeRequest(p, 16) for p in prompts])
    got = [answer(f.result(timeout=60), stops(chaotic_mm)) for f in futures]
    assert got == [lone(chaotic_mm, p, [], 16) for p in prompts]
    # the first two fit one step; each longer one joins a step of its own, beside the rows decoding
    assert scheduler.joined == [2, 1, 1]


def test_a_malformed_prompt_is_refused_and_the_batch_goes_on(chaotic_mm, scheduler):
    prompt = embeds(chaotic_mm, QUESTIONS[1])
    running = scheduler.submit(DecodeRequest(prompt, 16))
    for bad in (prompt[:, :-1], prompt[:0], prompt[None]):
        with pytest.raises(ValueError, match="embeds must be"):
            scheduler.submit(DecodeRequest(bad, 4))
    assert answer(running.result(timeout=60), stops(chaotic_mm)) == lone(chaotic_mm, prompt, [], 16)


def test_a_tool_call_row_beside_free_text_and_signal_span_rows(chaotic_mm, scheduler):
    backbone = chaotic_mm.backbone
    vocab = backbone.input_embeddings().weight.shape[0]
    image = backbone.signal_ids["image"]

    def processors(kind: str) -> list:
        span = SignalSpanProcessor(backbone.signal_ids)
        if kind == "tool":
            return [span, ToolCallConstraint(backbone.tokenizer, TOOLS, force_tool_call=True, vocab_size=vocab,
                                             banned_token_ids=backbone.new_token_ids)]
        if kind == "signal":
            return [ForceAt(2, image[0]), span]
        return [span]

    kinds = ["tool", "text", "signal"]
    prompts = [embeds(chaotic_mm, q) for q in QUESTIONS[1:]]
    futures = scheduler.submit_all([DecodeRequest(p, 48, processors(k)) for p, k in zip(prompts, kinds)])
    got = [answer(f.result(timeout=60), stops(chaotic_mm)) for f in futures]
    assert scheduler.joined == [3]  # the three prompts in one step
    assert got == [lone(chaotic_mm, p, processors(k), 48) for p, k in zip(prompts, kinds)]
    call = backbone.tokenizer.decode(got[0], skip_special_tokens=True)
    assert call.startswith(tool_call_prefix("transcribe"))
    if call.endswith("</tool_call>"):
        json.loads(call[len("<tool_call>"):-len("</tool_call>")])
    assert got[2][2:2 + len(image)] == image  # the whole span, in order
    assert not any(t in got[0] + got[1] for t in image)


def test_a_failing_or_cancelled_row_leaves_the_others_alone(chaotic_mm, scheduler):
    prompts = [embeds(chaotic_mm, q) for q in QUESTIONS]
    cancel = threading.Event()
    watched = Collect(after=3)
    failing = scheduler.submit(DecodeRequest(prompts[0], 30, [FailAt(4)]))
    cancelled = scheduler.submit(DecodeRequest(prompts[1], 30, [], watched, cancel=cancel))
    healthy = [scheduler.submit(DecodeRequest(p, 30)) for p in prompts[2:]]
    assert watched.seen.wait(timeout=60)
    cancel.set()
    with pytest.raises(RuntimeError, match="a processor failed"):
        failing.result(timeout=60)
    with pytest.raises(DecodeCancelled):
        cancelled.result(timeout=60)
    for prompt, future in zip(prompts[2:], healthy):
        assert answer(future.result(timeout=60), stops(chaotic_mm)) == lone(chaotic_mm, prompt, [], 30)
    # and the scheduler goes on serving
    assert answer(scheduler.submit(DecodeRequest(prompts[0], 8)).result(timeout=60), stops(chaotic_mm)) == \
        lone(chaotic_mm, prompts[0], [], 8)


OWNER = contextvars.ContextVar("owner", default=None)


class Owned(Collect):
    """Also notes whose context variables each token arrived in."""

    def put(self, value):
        self.owners = getattr(self, "owners", set()) | {OWNER.get()}
        super().put(value)


def test_each_streamer_gets_its_own_rows_tokens_in_its_submitters_context(chaotic_mm, scheduler):
    streamers = [Owned() for _ in QUESTIONS]

    def submit(index: int, question: str, streamer) -> Future:
        OWNER.set(index)  # what a caller's context holds, e.g. LangGraph's stream writer
        return scheduler.submit(DecodeRequest(embeds(chaotic_mm, question), 16, [], streamer))

    futures = [contextvars.copy_context().run(submit, i, q, s) for i, (q, s) in enumerate(zip(QUESTIONS, streamers))]
    for index, (future, streamer) in enumerate(zip(futures, streamers)):
        assert streamer.ids == future.result(timeout=60)
        assert streamer.prompts == 1 and streamer.ended
        assert streamer.owners == {index}
    assert len({tuple(s.ids) for s in streamers}) == len(streamers)


def test_generation_from_many_threads_matches_one_at_a_time(chaotic_mm):
    asked = [[{"role": "user", "content": q}] for q in QUESTIONS]
    alone = [chaotic_mm.generate(m, max_new_tokens=20).token_ids for m in asked]
    together: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i, m=m: together.__setitem__(
        i, chaotic_mm.generate(m, max_new_tokens=20).token_ids)) for i, m in enumerate(asked)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [together[i] for i in range(len(asked))] == alone
    assert [g.token_ids for g in chaotic_mm.generate_many([(m, {}) for m in asked], max_new_tokens=20)] == alone


def test_lora_is_merged_into_a_decode_copy_that_follows_training(tiny_profile):
    from models.decoding import decode_model
    from models.mmllm import MMLLM

    mm = MMLLM.from_profile(tiny_profile, require_trained=False)
    mm.backbone.enable_lora()
    peft_model = mm.backbone.model
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or p.dim() > 1:
                p.normal_(0, 0.3)  # adapters that change the answer, on a backbone that writes varied text
    query = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merged = decode_model(peft_model)
    assert torch.equal(peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, query)
    assert merged is not peft_model and not hasattr(merged, "peft_config")
    base = peft_model.get_base_model()
    assert merged.model.layers[0].input_layernorm.weight is base.model.layers[0].input_layernorm.weight  # shared
    assert decode_model(peft_model) is merged  # nothing changed: the same copy
    prompt = embeds(mm, QUESTIONS[1])
    span = [SignalSpanProcessor(mm.backbone.signal_ids)]
    before = mm.generate([{"role": "user", "content": QUESTIONS[1]}], max_new_tokens=20).token_ids
    assert before == [t for t in lone(mm, prompt, span, 20) if t not in stops(mm)]  # peft's own generate
    with torch.no_grad():  # a training step writes the adapters in place
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    assert decode_model(peft_model) is not merged
    half = decode_model(peft_model, torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert decode_model(peft_model, torch.bfloat16) is half
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the model itself stays as it was
    after = mm.generate([{"role": "user", "content": QUESTIONS[1]}], max_new_tokens=20).token_ids
    assert after == [t for t in lone(mm, prompt, span, 20) if t not in stops(mm)]
    assert after != before


def test_a_prompt_that_starts_like_a_finished_one_reuses_its_keys_and_values(chaotic_mm):
    from models.decoding import PrefixCache

    prefixes = PrefixCache(min_reuse=8)
    scheduler = DecodeScheduler(chaotic_mm.backbone.model, stop_ids=stops(chaotic_mm), prefix_cache=prefixes)
    backbone = chaotic_mm.backbone
    first_turn = [{"role": "user", "content": QUESTIONS[3]}]
    ids = backbone.chat_ids(first_turn)
    answered = scheduler.submit(DecodeRequest(embeds(chaotic_mm, QUESTIONS[3]), 12, token_ids=ids)).result(timeout=60)
    reply = backbone.tokenizer.decode(answer(answered, stops(chaotic_mm)), skip_special_tokens=True)
    second_turn = [*first_turn, {"role": "assistant", "content": reply}, {"role": "user", "content": QUESTIONS[0]}]
    ids = backbone.chat_ids(second_turn)
    prompt = backbone.splice(ids, {})[0]
    again = scheduler.submit(DecodeRequest(prompt, 16, token_ids=ids)).result(timeout=60)
    scheduler.close()
    assert prefixes.stats["hits"] == 1 and prefixes.stats["reused_tokens"] >= len(backbone.chat_ids(first_turn))
    assert answer(again, stops(chaotic_mm)) == lone(chaotic_mm, prompt, [], 16)
    # spliced features end the key: nothing after the first feature position is reused
    assert prefixes.lookup((*ids[:5], -1, *ids[6:]), limit=len(ids))[0] == 0
    scheduler.use(scheduler.model, weights_version=1)  # trained weights: old keys and values no longer hold
    assert prefixes.lookup(tuple(ids), limit=len(ids))[0] == 0


def test_rows_that_reuse_prefixes_of_any_length_join_in_one_step(chaotic_mm):
    from models.decoding import PrefixCache

    prefixes = PrefixCache(min_reuse=8)
    joined: list[int] = []
    scheduler = DecodeScheduler(chaotic_mm.backbone.model, stop_ids=stops(chaotic_mm), prefix_cache=prefixes,
                                on_join=joined.append)
    backbone = chaotic_mm.backbone
    first_turn = [{"role": "user", "content": QUESTIONS[3]}]
    ids = backbone.chat_ids(first_turn)
    answered = scheduler.submit(DecodeRequest(embeds(chaotic_mm, QUESTIONS[3]), 12, token_ids=ids)).result(timeout=60)
    reply = {"role": "assistant", "content": backbone.tokenizer.decode(answer(answered, stops(chaotic_mm)),
                                                                         skip_special_tokens=True)}
    # two next turns of that session (the same prefix reused, new parts of different lengths), and a new session
    asked = [[*first_turn, reply, {"role": "user", "content": q}] for q in QUESTIONS[:2]]
    asked.append([{"role": "user", "content": QUESTIONS[2]}])
    prompts = [backbone.chat_ids(m) for m in asked]
    joined.clear()
    futures = scheduler.submit_all([DecodeRequest(backbone.splice(p, {})[0], 16, token_ids=p) for p in prompts])
    got = [answer(f.result(timeout=60), stops(chaotic_mm)) for f in futures]
    scheduler.close()
    assert prefixes.stats["hits"] == 2
    assert joined == [3]  # the next turns and the new session, which reuses nothing, in one step
    assert got == [lone(chaotic_mm, backbone.splice(p, {})[0], [], 16) for p in prompts]


@pytest.mark.smoke
def test_smollm2_rows_decoded_together_match_lone_generation():
    from models.decoding import decode_model
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    mm = MMLLM.from_profile(load_profile("local"))
    model = decode_model(mm.backbone.model)
    scheduler = DecodeScheduler(model, stop_ids=stops(mm))
    prompts = [embeds(mm, q) for q in ("What is the capital of France?", "Write a haiku about the sea.",
                                       "List three colours and say why the sky is blue.")]
    futures = [scheduler.submit(DecodeRequest(p, 16, [SignalSpanProcessor(mm.backbone.signal_ids)])) for p in prompts]
    got = [answer(f.result(timeout=300), stops(mm)) for f in futures]
    scheduler.close()
    with torch.no_grad():
        alone = [model.generate(inputs_embeds=p[None], attention_mask=torch.ones(1, p.shape[0], dtype=torch.long),
                                max_new_tokens=16, do_sample=False, pad_token_id=mm.backbone.tokenizer.pad_token_id,
                                logits_processor=LogitsProcessorList([SignalSpanProcessor(mm.backbone.signal_ids)]))
                 for p in prompts]
    assert got == [answer(a[0].tolist(), stops(mm)) for a in alone]
    assert "Paris" in mm.backbone.tokenizer.decode(got[0])

