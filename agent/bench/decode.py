"""Decoding speed against its baselines, measured in one process on one prompt set.

- single stream: `transformers`' greedy `generate` on the backbone as loaded (batch 1) against the
  decode scheduler serving the same prompts one at a time (LoRA merged, a lean loop); greedy
  drift is the share of prompts whose answer changed. A second row keeps the merged weights on
  both sides, so it shows what the loop alone gains. Each single-stream row also stands against
  its memory limit (agent/bench/memory_limit.py): the read bandwidth measured in this run over
  the bytes of weights a step reads, in the precision it runs in.
- concurrent sessions: N requests submitted at once, decoded together, against the same N
  requests served one after another by the same scheduler (aggregate tokens/s). Its ceiling is
  what no scheduler passes while a step for all rows costs at least a step for one: the tokens of
  all sessions over the longest session's, since the batch shrinks as sessions finish.
- fixed length: the N requests all at once against one at a time again, but every request decodes
  exactly --tokens tokens (stop tokens do not end it, as serving engines' throughput benchmarks
  run), so the batch stays full to the end and the ceiling is N: what batching alone gains.
- sustained sessions: N sessions that each take the next request from a shared queue of distinct
  requests as soon as they are answered, so the batch stays full until the queue runs dry, against
  the same requests one at a time. Both sides decode as the server does: token ids given, so a
  prompt reuses the keys and values of what it shares with finished ones (the chat template's
  system prompt), each side on a scheduler and prefix cache of its own.

    python -m agent.bench.decode [--profile local] [--sessions 1 2 4 8] [--tokens 48] [--queued 48]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from agent.bench.memory_limit import limit_row, read_bandwidth

# Requests that ask for long answers, so that rows decode for most of the token budget.
PROMPTS = [
    "Tell me a long story about a fox who learns to read the stars.",
    "Explain step by step how a bicycle works.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe a busy market in the morning, in detail.",
    "Give me ten tips for learning to cook at home, with reasons.",
    "Write a short essay on why people keep diaries.",
    "Describe how bread is made, from wheat to loaf.",
    "Tell me about the life of a lighthouse keeper.",
]
# The sustained queue's requests, every one different: each ask about each topic.
ASKS = ["Tell me a story about {}.", "Describe {}, in detail.", "Write a short essay about {}.",
        "Explain to a child what makes {} special.", "Write a letter to a friend about {}.",
        "Give me five facts about {}, with reasons."]
TOPICS = ["a fox who learns to read the stars", "a busy market in the morning", "a lighthouse keeper",
          "a trip to the mountains", "a robot that plants a garden", "a thunderstorm over the sea",
          "a quiet village in winter", "a dragon who is afraid of the dark"]
QUEUED = [ask.format(topic) for ask in ASKS for topic in TOPICS]


def decode_benchmarks(profile_name: str = "local", *, sessions: tuple[int, ...] = (1, 2, 4, 8),
                      new_tokens: int = 48, prompts: list[str] | None = None, quick: bool = False,
                      queued: int = 48) -> list[dict]:
    """Rows {"benchmark", "setting", "value", "unit", "baseline", "ratio", ...} measured now.
    `quick`: 1 and 2 sessions, 8 new tokens, 4 queued requests (a check that it runs, not a measurement)."""
    if quick:
        sessions, new_tokens, queued = (1, 2), 8, 4
    from tqdm import tqdm

    from models.decoding import DecodeRequest, DecodeScheduler, decode_model
    from models.decoding.signal_spans import SignalSpanProcessor
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    prompts = list(prompts or PROMPTS)
    if max(sessions) > len(prompts):
        raise ValueError(f"{max(sessions)} sessions need as many prompts; {len(prompts)} given")
    mm = MMLLM.from_profile(load_profile(profile_name))
    backbone = mm.backbone
    loaded = backbone.model
    fast = decode_model(loaded)
    stops = mm.decoder.stop_ids
    embeds = [backbone.splice(backbone.chat_ids([{"role": "user", "content": p}]), {})[0] for p in prompts]

    def cut(tokens: list[int]) -> list[int]:
        return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]

    def processors() -> list:
        return [SignalSpanProcessor(backbone.signal_ids)]

    def generate(model, prompt) -> list[int]:
        from transformers import LogitsProcessorList

        with torch.no_grad():
            out = model.generate(inputs_embeds=prompt[None],
                                 attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=backbone.tokenizer.pad_token_id,
                                 logits_processor=LogitsProcessorList(processors()))
        return cut(out[0].tolist())

    scheduler = DecodeScheduler(fast, stop_ids=stops, max_batch=max(sessions))

    def scheduled(batch: list[torch.Tensor]) -> list[list[int]]:
        futures = scheduler.submit_all([DecodeRequest(p, new_tokens, processors()) for p in batch])
        return [cut(f.result()) for f in futures]

    # every side runs off the main thread, as the scheduler's loop does: on a busy machine the main
    # thread's OpenMP team was measured stalling (20x slower) where worker threads were not
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-bench")

    def timed(fn, *args):
        def run():
            with torch.no_grad():
                start = time.perf_counter()
                result = fn(*args)
                return result, time.perf_counter() - start
        return worker.submit(run).result()

    steps = ["warm-up", "generate, as loaded", "generate, merged", "scheduler, one at a time",
             *[f"scheduler, {n} at once" for n in sessions], "fixed length", "sustained", "bf16", "second turns"]
    bar = tqdm(steps, desc="decode bench", unit="step")
    bar.set_postfix_str(steps[0])
    for fn in (lambda: generate(loaded, embeds[0][:8]), lambda: generate(fast, embeds[0][:8]),
               lambda: scheduled([embeds[0][:8]])):
        timed(fn)
    bar.update()
    n_single = max(sessions)
    single = embeds[:n_single]
    results = {}
    for name, fn in (("plain", lambda p: generate(loaded, p)), ("merged", lambda p: generate(fast, p)),
                     ("scheduled", lambda p: scheduled([p])[0])):
        bar.set_postfix_str(name)
        outs, times = [], []
        for prompt in single:
            out, seconds = timed(fn, prompt)
            outs.append(out)
            times.append(seconds)
        results[name] = (outs, times)
        bar.update()

    def rate(name: str, n: int) -> float:
        outs, times = results[name]
        return sum(len(o) for o in outs[:n]) / sum(times[:n])

    plain, merged, lone = (rate(k, n_single) for k in ("plain", "merged", "scheduled"))
    bandwidth = timed(read_bandwidth)[0]  # in the decode thread, as the steps read
    drift = sum(a != b for a, b in zip(results["plain"][0], results["scheduled"][0])) / n_single
    rows = [
        {"benchmark": "single-stream decode", "setting": f"{profile_name}, batch 1, {n_single} prompts, "
         f"≤{new_tokens} new tokens", "value": round(lone, 2), "unit": "tokens/s", "baseline": round(plain, 2),
         "baseline_unit": "tokens/s, transformers generate on the backbone as loaded", "ratio": round(lone / plain, 2),
         "greedy_drift": round(drift, 3), "threads": torch.get_num_threads()},
        {"benchmark": "single-stream decode, loop only", "setting": f"{profile_name}, batch 1, same merged weights",
         "value": round(lone, 2), "unit": "tokens/s", "baseline": round(merged, 2),
         "baseline_unit": "tokens/s, transformers generate on the merged weights", "ratio": round(lone / merged, 2),
         "greedy_drift": round(sum(a != b for a, b in zip(results["merged"][0], results["scheduled"][0]))
                               / n_single, 3), "threads": torch.get_num_threads()},
    ]
    for row in rows:
        row.update(limit_row(lone, fast, bandwidth))
    peak = {"rows": 0, "joins": 0}
    scheduler.on_step = lambda n: peak.__setitem__("rows", max(peak["rows"], n))
    scheduler.on_join = lambda n: peak.__setitem__("joins", peak["joins"] + 1)
    for n in sessions:
        bar.set_postfix_str(f"{n} at once")
        peak["rows"] = peak["joins"] = 0
        outs, seconds = timed(scheduled, embeds[:n])
        bar.update()
        together = sum(len(o) for o in outs) / seconds
        one_at_a_time = rate("scheduled", n)
        rows.append({
            "benchmark": "concurrent sessions", "setting": f"{profile_name}, {n} sessions, ≤{new_tokens} new tokens",
            "value": round(together, 2), "unit": "tokens/s (all sessions)", "baseline": round(one_at_a_time, 2),
            "baseline_unit": "tokens/s, the same requests one at a time", "ratio": round(together / one_at_a_time, 2),
            "vs_plain_generate": round(together / plain, 2), "peak_rows": peak["rows"],
            "steps_taking_requests_in": peak["joins"], "tokens": [len(o) for o in outs],
            "ratio_ceiling": round(sum(len(o) for o in outs) / max(1, max(len(o) for o in outs)), 2),
            "same_tokens_as_one_at_a_time": outs == results["scheduled"][0][:n],
            "threads": torch.get_num_threads()})
    bar.set_postfix_str("fixed length")
    rows.append(_fixed_length(fast, embeds[:n_single], new_tokens, timed, processors, profile_name))
    bar.update()
    bar.set_postfix_str("sustained")
    rows.append(_sustained(fast, mm, QUEUED[:queued], n_single, new_tokens, timed, cut,
                           processors, profile_name))
    bar.update()
    bar.set_postfix_str("bf16")
    rows += _bf16_rows(loaded, stops, embeds[:n_single], new_tokens, timed, cut, processors, results, plain,
                       profile_name, bandwidth)
    bar.update()
    bar.set_postfix_str("second turns")
    turns = min(4, n_single)
    rows += _second_turns(mm, fast, prompts[:turns], results["scheduled"][0][:turns], new_tokens, cut, processors)
    bar.update()
    bar.close()
    scheduler.close()
    worker.shutdown()
    return rows


def _alone_then_together(model, stop_ids, embeds, new_tokens, timed, processors, cut):
    """On a scheduler of its own (warmed up first): the requests one at a time, then all at once.
    Returns (answers, seconds) of each way, the answers passed through `cut`."""
    from models.decoding import DecodeRequest, DecodeScheduler

    scheduler = DecodeScheduler(model, stop_ids=stop_ids, max_batch=len(embeds))

    def scheduled(batch):
        futures = scheduler.submit_all([DecodeRequest(p, new_tokens, processors()) for p in batch])
        return [cut(f.result()) for f in futures]

    timed(scheduled, [embeds[0][:8]])  # warm-up
    alone, seconds = [], 0.0
    for prompt in embeds:
        out, spent = timed(scheduled, [prompt])
        alone += out
        seconds += spent
    together, spent = timed(scheduled, embeds)
    scheduler.close()
    return alone, seconds, together, spent


def _fixed_length(model, embeds, new_tokens, timed, processors, profile_name) -> dict:
    """The requests decode `new_tokens` each, no stop token ending one: all at once against one at a time."""
    alone, seconds, together, spent = _alone_then_together(model, [], embeds, new_tokens, timed, processors,
                                                           lambda tokens: tokens)
    one_at_a_time, at_once = sum(map(len, alone)) / seconds, sum(map(len, together)) / spent
    n = len(embeds)
    return {"benchmark": "concurrent sessions, fixed length",
            "setting": f"{profile_name}, {n} sessions, {new_tokens} new tokens each (stop tokens ignored)",
            "value": round(at_once, 2), "unit": "tokens/s (all sessions)", "baseline": round(one_at_a_time, 2),
            "baseline_unit": "tokens/s, the same requests one at a time", "ratio": round(at_once / one_at_a_time, 2),
            "ratio_ceiling": n, "same_tokens_as_one_at_a_time": together == alone,
            "threads": torch.get_num_threads()}


def _sustained(model, mm, prompts, sessions, new_tokens, timed, cut, processors, profile_name) -> dict:
    """`sessions` sessions take the next request from a queue of distinct ones as soon as their
    last is answered, against the same requests one at a time; each side on a scheduler and prefix
    cache of its own, given token ids, as the server decodes."""
    from models.decoding import DecodeRequest, DecodeScheduler, PrefixCache

    backbone = mm.backbone
    ids = [backbone.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    embeds = [backbone.splice(i, {})[0] for i in ids]
    counts = {"steps": 0, "rows": 0, "joins": 0}

    def count(rows: int) -> None:
        counts["steps"] += 1
        counts["rows"] += rows

    def server() -> tuple[DecodeScheduler, PrefixCache]:
        prefixes = PrefixCache()
        return DecodeScheduler(model, stop_ids=mm.decoder.stop_ids, max_batch=sessions, prefix_cache=prefixes,
                               on_step=count, on_join=lambda n: counts.__setitem__("joins",
                                                                                   counts["joins"] + 1)), prefixes

    def ask(scheduler, i: int) -> list[int]:
        return cut(scheduler.submit(DecodeRequest(embeds[i], new_tokens, processors(), token_ids=ids[i])).result())

    lone, lone_prefixes = server()
    alone = [timed(ask, lone, i) for i in range(len(prompts))]
    lone.close()
    one_at_a_time = sum(len(o) for o, _ in alone) / sum(s for _, s in alone)
    shared, prefixes = server()
    counts.update(steps=0, rows=0, joins=0)

    def all_sessions():
        with ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="session") as pool:
            return list(pool.map(lambda i: ask(shared, i), range(len(prompts))))

    answers, seconds = timed(all_sessions)
    shared.close()
    rate = sum(len(o) for o in answers) / seconds
    return {"benchmark": "sustained sessions", "setting": f"{profile_name}, {sessions} sessions, {len(prompts)} queued "
            f"requests (all different), ≤{new_tokens} new tokens, prefixes reused as served", "value": round(rate, 2),
            "unit": "tokens/s (all sessions)", "baseline": round(one_at_a_time, 2),
            "baseline_unit": "tokens/s, the same requests one at a time", "ratio": round(rate / one_at_a_time, 2),
            "mean_rows_a_step": round(counts["rows"] / max(1, counts["steps"]), 2), "steps": counts["steps"],
            "steps_taking_requests_in": counts["joins"], "requests": len(answers),
            "tokens": [len(o) for o in answers],
            "reused_prompt_positions": {"one_at_a_time": lone_prefixes.stats["reused_tokens"],
                                        "sessions": prefixes.stats["reused_tokens"]},
            "prompt_positions": sum(len(i) for i in ids),
            "same_tokens_as_one_at_a_time": answers == [o for o, _ in alone], "threads": torch.get_num_threads()}


def _bf16_rows(loaded, stops, embeds, new_tokens, timed, cut, processors, results, plain, profile_name, bandwidth):
    """The same requests on a bf16 decode copy: one at a time and all at once, and what changed."""
    from models.decoding import decode_model

    bf16 = decode_model(loaded, torch.bfloat16)
    alone, seconds, together, spent = _alone_then_together(bf16, stops, embeds, new_tokens, timed, processors, cut)
    fp32_outs, fp32_times = results["scheduled"]
    fp32_rate = sum(len(o) for o in fp32_outs) / sum(fp32_times)
    lone = sum(len(o) for o in alone) / seconds
    batched = sum(len(o) for o in together) / spent
    drift = round(sum(a != b for a, b in zip(alone, fp32_outs)) / len(embeds), 3)
    n = len(embeds)
    return [
        {"benchmark": "single-stream decode, bf16", "setting": f"{profile_name}, batch 1, {n} prompts",
         "value": round(lone, 2), "unit": "tokens/s", "baseline": round(plain, 2),
         "baseline_unit": "tokens/s, transformers generate on the backbone as loaded (fp32)",
         "ratio": round(lone / plain, 2), "greedy_drift_vs_fp32": drift, "threads": torch.get_num_threads(),
         **limit_row(lone, bf16, bandwidth)},
        {"benchmark": "concurrent sessions, bf16", "setting": f"{profile_name}, {n} sessions, ≤{new_tokens} new tokens",
         "value": round(batched, 2), "unit": "tokens/s (all sessions)", "baseline": round(fp32_rate, 2),
         "baseline_unit": "tokens/s, the same requests one at a time (fp32)", "ratio": round(batched / fp32_rate, 2),
         "vs_bf16_one_at_a_time": round(batched / lone, 2), "vs_plain_generate": round(batched / plain, 2),
         "greedy_drift_vs_fp32": drift, "same_tokens_as_one_at_a_time": together == alone,
         "threads": torch.get_num_threads()},
    ]


class _FirstToken:
    """A streamer that notes when the first token came."""

    def __init__(self):
        self.at: float | None = None

    def put(self, value) -> None:
        if value.numel() and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def _second_turns(mm, model, prompts, answers, new_tokens, cut, processors) -> list[dict]:
    """A session's next turn with and without the keys and values its first turn left behind."""
    from models.decoding import DecodeRequest, DecodeScheduler, PrefixCache

    backbone = mm.backbone
    stops = mm.decoder.stop_ids
    turns = []
    for prompt, answer in zip(prompts, answers):
        first = [{"role": "user", "content": prompt}]
        second = [*first, {"role": "assistant", "content": backbone.tokenizer.decode(answer, skip_special_tokens=True)},
                  {"role": "user", "content": "Go on, and say more about that."}]
        turns.append((backbone.chat_ids(first), backbone.chat_ids(second)))
    measured = {}
    for name, prefixes in (("cold", None), ("reused", PrefixCache())):
        scheduler = DecodeScheduler(model, stop_ids=stops, prefix_cache=prefixes)

        def run(ids, scheduler=scheduler) -> tuple[list[int], float]:
            """The answer, and the seconds from submitting it to its first token."""
            prompt = backbone.splice(ids, {})[0]
            streamer, start = _FirstToken(), time.perf_counter()
            request = DecodeRequest(prompt, new_tokens, processors(), streamer, token_ids=ids)
            return cut(scheduler.submit(request).result()), streamer.at - start

        first_token, answers_2 = 0.0, []
        for first, second in turns:
            if prefixes is not None:
                run(first)  # the first turn, which leaves its keys and values
            answer, seconds = run(second)
            first_token += seconds
            answers_2.append(answer)
        scheduler.close()
        measured[name] = (first_token / len(turns), answers_2)
    cold, reused = measured["cold"][0], measured["reused"][0]
    drift = sum(a != b for a, b in zip(measured["cold"][1], measured["reused"][1])) / len(turns)
    length = sum(len(second) for _, second in turns) / len(turns)
    return [{"benchmark": "second turn, time to first token", "setting": f"{mm.profile.name}, {len(turns)} sessions, "
             f"second prompt ~{length:.0f} tokens", "value": round(reused * 1000, 1), "unit": "ms",
             "baseline": round(cold * 1000, 1), "baseline_unit": "ms without the first turn's keys and values",
             "ratio": round(cold / reused, 2), "ratio_means": "times faster", "greedy_drift": round(drift, 3),
             "threads": torch.get_num_threads()}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request at most")
    parser.add_argument("--queued", type=int, default=len(QUEUED), choices=range(1, len(QUEUED) + 1), metavar="N",
                        help=f"distinct requests queued for the sustained sessions (at most {len(QUEUED)})")
    args = parser.parse_args(argv)
    for row in decode_benchmarks(args.profile, sessions=tuple(args.sessions), new_tokens=args.tokens,
                                 queued=args.queued):
        print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
