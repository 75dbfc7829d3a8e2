"""`signalgraph proof choosing`: the backbone learns to pick the right tool and fill its arguments.

IT on tool-use lines (requests answered by the right call) and, with `sessions`, whole tool
conversations with the turn after each result; right-tool and right-arguments rates of the
controller's own think step on held-out requests, before and after.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path


def _choose(thinker, schemas: list[dict], items: list[dict]) -> dict:
    """Right-tool and right-arguments rates of the controller's own think step on `items`, and how
    often, given the results of the right calls, it then replies in words instead of calling again."""
    from langchain_core.messages import HumanMessage
    from tqdm.auto import tqdm

    defaults = {t["name"]: {k: v.get("default") for k, v in t["parameters"].get("properties", {}).items()
                            if "default" in v} for t in schemas}

    def explicit(call: dict) -> dict:  # arguments minus those left at their default
        return {k: v for k, v in call["arguments"].items() if defaults.get(call["name"], {}).get(k, object()) != v}

    right_tool = right_args = replied = 0
    rows = []
    rng = random.Random(0)
    for item in tqdm(items, desc="choosing"):
        result = thinker.think([HumanMessage(item["request"])], tools=schemas, passages=[], media=[])
        made = [{"name": c["name"], "arguments": c["args"]} for c in result.tool_calls]
        tool_ok = sorted(c["name"] for c in made) == sorted(c["name"] for c in item["calls"])
        args_ok = tool_ok and sorted(map(json.dumps, map(explicit, made))) == \
            sorted(map(json.dumps, map(explicit, item["calls"])))
        right_tool += tool_ok
        right_args += args_ok
        row = {"request": item["request"], "expected": item["calls"], "made": made, "text": result.text[:120]}
        if item["calls"]:
            after = thinker.think(_episode(item, rng, 0)[:-1], tools=schemas, passages=[], media=[])
            row["after_result"] = {"made": [c["name"] for c in after.tool_calls], "text": after.text[:120]}
            replied += not after.tool_calls and bool(after.text.strip())
        rows.append(row)
    with_calls = sum(1 for item in items if item["calls"])
    return {"right_tool": round(right_tool / len(items), 4), "right_arguments": round(right_args / len(items), 4),
            "replies_after_result": round(replied / max(with_calls, 1), 4), "rows": rows}


def tool_use_lines(system: str, items: list[dict]) -> list[dict]:
    """Manifest lines that answer each request with its tool calls (or its plain answer)."""
    from langchain_core.messages import AIMessage

    from graphs.prompting import render_tool_calls

    lines = []
    for item in items:
        calls = [{"id": f"c{i}", "name": c["name"], "args": c["arguments"]} for i, c in enumerate(item["calls"])]
        answer = item["answer"] or render_tool_calls(AIMessage(content="", tool_calls=calls))
        lines.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": item["request"]},
                                   {"role": "assistant", "content": answer}]})
    return lines


def _episode(item: dict, rng: random.Random, start: int) -> list:
    """One request as the controller's messages: the request, the calls, their results and the
    reply after them (or the plain answer)."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from agent.proofs.tool_requests import tool_result

    if not item["calls"]:
        return [HumanMessage(item["request"]), AIMessage(item["answer"])]
    calls = [{"id": f"c{start + i}", "name": c["name"], "args": c["arguments"]} for i, c in enumerate(item["calls"])]
    results = [tool_result(c, rng) for c in item["calls"]]
    return [HumanMessage(item["request"]), AIMessage(content="", tool_calls=calls),
            *[ToolMessage(sentence, artifact=result, tool_call_id=call["id"], name=call["name"])
              for call, (result, sentence) in zip(calls, results)],
            AIMessage(" ".join(sentence for _, sentence in results))]


def tool_conversation_lines(system: str, items: list[dict], per_conversation: int, seed: int = 0) -> list[dict]:
    """Manifest lines of `per_conversation` requests each, rendered as the controller renders a
    session: every tool call is followed by its result and a short reply, so the model learns to
    stop once it has what it asked for, and the long tool list is paid for once per conversation."""
    from graphs.prompting import to_chat

    rng = random.Random(seed)
    lines = []
    for first in range(0, len(items), per_conversation):
        messages = []
        for item in items[first: first + per_conversation]:
            messages += _episode(item, rng, len(messages))
        chat, _ = to_chat(messages, system_prefix=system, plain_tool_results=True)
        lines.append({"messages": chat})
    return lines


def choose_rates(mm, schemas: list[dict], items: list[dict]) -> dict:
    """The controller's own think step (constrained decoding on) over held-out requests."""
    from graphs.thinker import BackboneThinker, ConditioningCache

    return _choose(BackboneThinker(mm, ConditioningCache(), max_new_tokens=96), schemas, items)


def choosing(out: str, *, train_count: int = 1200, sessions: int = 0, mix: tuple[int, int, int] = (45, 40, 15),
             test_count: int = 60, steps: int = 150, batch_size: int = 8, lr: float = 5e-4,
             resume: bool = False) -> int:
    """LoRA-tune SmolLM2 to call the project's tools; right tool / arguments before and after.

    `sessions=0` trains on one request a line, answered with its calls. `sessions=N` trains on
    sessions of N requests, each call followed by its result and a reply: README gives both,
    measured (the second teaches the turn after a result). `mix` weighs the training requests'
    kinds (one call, two calls, no tool); two calls weigh more than in the held-out set (25%),
    as their second call is what a model gets wrong."""
    from agent.proofs.tool_requests import requests
    from graphs.thinker import system_prompt
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.stages import TrainConfig
    from models.training.trainer import train
    from tools.expert_tools import ToolContext, build_tools, tool_schemas
    from tools.media_store import MediaStore

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    profile = load_profile("local-untrained")
    schemas = tool_schemas(build_tools(ToolContext("proof", profile, MediaStore(out_dir / "media"))))
    system = system_prompt(schemas, [])  # exactly what the controller shows the backbone
    manifest = out_dir / "tool-use-train.jsonl"
    with open(manifest, "w") as fp:
        train_requests = requests(train_count, split="train", mix=mix)
        if sessions:
            lines = tool_conversation_lines(system, train_requests, sessions)
        else:
            lines = tool_use_lines(system, train_requests)
        fp.writelines(json.dumps(line) + "\n" for line in lines)
    heldout = requests(test_count, split="heldout")
    before = choose_rates(MMLLM.from_profile(profile), schemas, heldout)
    config = TrainConfig.from_dict({
        "profile": "local-untrained", "out_dir": str(out_dir / "run"),
        "stages": [{"name": "it", "data": [str(manifest)], "steps": steps, "batch_size": batch_size, "lr": lr,
                    "log_every": 5, "checkpoint_every": 40, "group_by_length": bool(sessions),
                    "train": {"input_projectors": False, "output_projectors": False, "backbone": "lora",
                              "new_token_embeddings": False}}],
    })
    result = train(config, resume=resume, overwrite=not resume)
    tuned = MMLLM.from_profile(load_profile(str(result.profile)))
    after = choose_rates(tuned, schemas, heldout)
    report = {"train_requests": train_count, "requests_per_session": sessions, "mix": list(mix),
              "heldout_requests": test_count, "steps": steps, "batch_size": batch_size,
              "before": {k: v for k, v in before.items() if k != "rows"},
              "after": {k: v for k, v in after.items() if k != "rows"},
              "minutes": round((time.perf_counter() - started) / 60, 1), "profile": str(result.profile)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "heldout.json").write_text(json.dumps({"before": before["rows"], "after": after["rows"]}, indent=1))
    print(f"\nchoosing, {test_count} held-out requests (constrained decoding on): right tool "
          f"{before['right_tool']:.1%} -> {after['right_tool']:.1%}; right arguments "
          f"{before['right_arguments']:.1%} -> {after['right_arguments']:.1%}; replies in words after the "
          f"results {before['replies_after_result']:.1%} -> {after['replies_after_result']:.1%}")
    return 0
