"""What constrained tool-call decoding costs on the local backbone (SmolLM2-135M, CPU).

    python examples/bench_constrained_decoding.py [--profile local] [--tokens 48] [--repeats 2]

Prints the grammar's compile time (cold: tokenizer info + compile; warm: the cache), and time
per generated token for the same prompts decoded three ways, in this process, as ratios against
the unconstrained baseline: free (the constraint attached, no call written: the constraint only
watches), and forced (tool_choice "any": every token is masked by the grammar). It also prints
the time spent inside the logits processor per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

from graphs.prompting import describe_tools
from models.decoding.constrained import ToolCallConstraint

TOOLS = [
    {"name": "transcribe", "description": "Transcribe speech in an audio file to text. audio_id is like audio-1.",
     "parameters": {"type": "object", "properties": {"audio_id": {"type": "string"}}, "required": ["audio_id"]}},
    {"name": "generate_image", "description": "Generate an image from a text description.",
     "parameters": {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"]}},
    {"name": "search_notes", "description": "Search the user's notes for passages about a query.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                    "required": ["query"]}},
]
PROMPTS = ["Please transcribe audio-1.", "Generate an image of a red bicycle on a beach.",
           "Search my notes for the meeting with Anna.", "Tell me a short story about a fox.",
           "What is the capital of France?"]


class Timed:
    """Wraps a logits processor and adds up the time spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--profile", default="local")
    args.add_argument("--tokens", type=int, default=48)
    args.add_argument("--repeats", type=int, default=2)
    opts = args.parse_args()

    from models.mmllm import MMLLM
    from models.profiles import load_profile

    mm = MMLLM.from_profile(load_profile(opts.profile))
    tok = mm.backbone.tokenizer
    vocab = mm.backbone.model.get_output_embeddings().weight.shape[0]

    start = time.perf_counter()
    ToolCallConstraint(tok, TOOLS, vocab_size=vocab)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    ToolCallConstraint(tok, TOOLS, vocab_size=vocab)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    ToolCallConstraint(tok, TOOLS, vocab_size=vocab, force_tool_call=True)
    second = time.perf_counter() - start
    print(f"grammar ({len(tok)}-token vocabulary, {len(TOOLS)} tools): cold {cold * 1000:.0f} ms "
          f"(tokenizer info + compile), another grammar {second * 1000:.0f} ms, cached {warm * 1000:.2f} ms")

    modes = {"baseline": None, "free": False, "forced": True}
    per_token: dict[str, list[float]] = {m: [] for m in modes}
    in_processor: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(opts.repeats):
        for prompt in PROMPTS:
            chat = [{"role": "system", "content": describe_tools(TOOLS, "auto")}, {"role": "user", "content": prompt}]
            for mode, force in modes.items():
                processors = []
                if force is not None:
                    timed = Timed(ToolCallConstraint(tok, TOOLS, vocab_size=vocab, force_tool_call=force,
                                                     parallel_tool_calls=False,
                                                     banned_token_ids=mm.backbone.new_token_ids))
                    processors = [timed]
                start = time.perf_counter()
                out = mm.generate(chat, max_new_tokens=opts.tokens, logits_processors=processors)
                seconds = time.perf_counter() - start
                n = max(len(out.token_ids), 1)
                per_token[mode].append(seconds / n)
                if processors:
                    in_processor[mode].append(timed.seconds / max(timed.calls, 1))
    base = statistics.median(per_token["baseline"])
    for mode in modes:
        ms = statistics.median(per_token[mode]) * 1000
        inside = f", in the processor {statistics.median(in_processor[mode]) * 1e6:.0f} µs/call" \
            if in_processor[mode] else ""
        print(f"{mode:9s} {ms:6.1f} ms/token  x{ms / (base * 1000):.3f} of baseline{inside}")


if __name__ == "__main__":
    main()
