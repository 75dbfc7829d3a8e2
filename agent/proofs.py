"""`signalgraph proof seeing`: the LLaVA recipe in miniature, on data that ships offline.

Frozen EfficientNet-lite0 + frozen SmolLM2-135M + a trained input projector (PT), then LoRA and
the projector (IT), on easy-vqa's train split; exact match on a fixed random sample of its test
split, against the same trained model with the image taken away (the blind baseline).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path


def _sample(manifest: Path, count: int, seed: int) -> Path:
    lines = manifest.read_text().splitlines()
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(count, len(lines))))
    out = manifest.with_name(f"{manifest.stem}-sample{len(chosen)}.jsonl")
    out.write_text("\n".join(lines[i] for i in chosen) + "\n")
    return out


def seeing_pt_stage(manifest: Path, steps: int, batch_size: int, seed: int) -> dict:
    """The input projector learns to map image features to the answers; the backbone is frozen."""
    return {"name": "pt", "data": [str(manifest)], "steps": steps, "batch_size": batch_size, "lr": 1e-3,
            "log_every": 5, "checkpoint_every": 50, "seed": seed}


def test_sample(data: Path, count: int, seed: int) -> Path:
    """The fixed random sample of easy-vqa test questions every seeing score is measured on."""
    from models.training.data import easy_vqa_manifest

    return _sample(easy_vqa_manifest("test", data), count, seed)


def seeing(out: str, *, pt_steps: int = 150, it_steps: int = 150, batch_size: int = 16,
           test_questions: int = 1000, resume: bool = False, seed: int = 0) -> int:
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.data import easy_vqa_manifest
    from models.training.stages import TrainConfig
    from models.training.trainer import evaluate, train

    out_dir = Path(out)
    data = out_dir / "data"
    started = time.perf_counter()
    train_manifest = easy_vqa_manifest("train", data)
    test_manifest = test_sample(data, test_questions, seed)
    config = TrainConfig.from_dict({
        "profile": "local-untrained", "out_dir": str(out_dir / "run"),
        "stages": [
            seeing_pt_stage(train_manifest, pt_steps, batch_size, seed),
            {"name": "it", "data": [str(train_manifest)], "steps": it_steps, "batch_size": batch_size,
             "lr": 2e-4, "log_every": 5, "checkpoint_every": 50, "seed": seed + 1},
        ],
    })
    result = train(config, resume=resume, overwrite=not resume)
    trained = time.perf_counter() - started
    mm = MMLLM.from_profile(load_profile(str(result.profile)))
    with_image = evaluate(mm, test_manifest, max_new_tokens=4)
    blind = evaluate(mm, test_manifest, blind=True, max_new_tokens=4)
    report = {
        "train_questions_seen": {"pt": pt_steps * batch_size, "it": it_steps * batch_size},
        "test_questions": with_image.total, "accuracy": round(with_image.accuracy, 4),
        "blind_accuracy": round(blind.accuracy, 4), "train_minutes": round(trained / 60, 1),
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "trainable": {name: stage.counts for name, stage in result.stages.items()},
        "weights": str(result.weights), "profile": str(result.profile),
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    examples = [p for p in with_image.predictions[:12]]
    (out_dir / "predictions.json").write_text(json.dumps(with_image.predictions, indent=1, default=str))
    print(f"\nseeing: exact match {with_image.accuracy:.1%} on {with_image.total} easy-vqa test questions; "
          f"blind baseline {blind.accuracy:.1%}; trained in {report['train_minutes']} min")
    for p in examples[:5]:
        print("  ", p)
    return 0


def _choose(thinker, schemas: list[dict], items: list[dict]) -> dict:
    """Right-tool and right-arguments rates of the controller's own think step on `items`."""
    from langchain_core.messages import HumanMessage
    from tqdm.auto import tqdm

    defaults = {t["name"]: {k: v.get("default") for k, v in t["parameters"].get("properties", {}).items()
                            if "default" in v} for t in schemas}

    def explicit(call: dict) -> dict:  # arguments minus those left at their default
        return {k: v for k, v in call["arguments"].items() if defaults.get(call["name"], {}).get(k, object()) != v}

    right_tool = right_args = 0
    rows = []
    for item in tqdm(items, desc="choosing"):
        result = thinker.think([HumanMessage(item["request"])], tools=schemas, passages=[], media=[])
        made = [{"name": c["name"], "arguments": c["args"]} for c in result.tool_calls]
        tool_ok = sorted(c["name"] for c in made) == sorted(c["name"] for c in item["calls"])
        args_ok = tool_ok and sorted(map(json.dumps, map(explicit, made))) == \
            sorted(map(json.dumps, map(explicit, item["calls"])))
        right_tool += tool_ok
        right_args += args_ok
        rows.append({"request": item["request"], "expected": item["calls"], "made": made, "text": result.text[:120]})
    return {"right_tool": round(right_tool / len(items), 4), "right_arguments": round(right_args / len(items), 4),
            "rows": rows}


def tool_use_lines(system: str, items: list[dict]) -> list[dict]:
    """Manifest lines that answer each request with its tool calls (or its plain answer)."""
    from graphs.chat_model import render_tool_calls
    from langchain_core.messages import AIMessage

    lines = []
    for item in items:
        calls = [{"id": f"c{i}", "name": c["name"], "args": c["arguments"]} for i, c in enumerate(item["calls"])]
        answer = item["answer"] or render_tool_calls(AIMessage(content="", tool_calls=calls))
        lines.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": item["request"]},
                                   {"role": "assistant", "content": answer}]})
    return lines


def choose_rates(mm, schemas: list[dict], items: list[dict]) -> dict:
    """The controller's own think step (constrained decoding on) over held-out requests."""
    from graphs.thinker import BackboneThinker, ConditioningCache

    return _choose(BackboneThinker(mm, ConditioningCache(), max_new_tokens=96), schemas, items)


def choosing(out: str, *, train_count: int = 1200, test_count: int = 60, steps: int = 150, batch_size: int = 8,
             lr: float = 5e-4, resume: bool = False) -> int:
    """LoRA-tune SmolLM2 to call the project's tools; right tool / arguments before and after."""
    from agent.tool_requests import requests
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
        fp.writelines(json.dumps(line) + "\n" for line in tool_use_lines(system, requests(train_count, split="train")))
    heldout = requests(test_count, split="heldout")
    before = choose_rates(MMLLM.from_profile(profile), schemas, heldout)
    config = TrainConfig.from_dict({
        "profile": "local-untrained", "out_dir": str(out_dir / "run"),
        "stages": [{"name": "it", "data": [str(manifest)], "steps": steps, "batch_size": batch_size, "lr": lr,
                    "log_every": 5, "checkpoint_every": 40,
                    "train": {"input_projectors": False, "output_projectors": False, "backbone": "lora",
                              "new_token_embeddings": False}}],
    })
    result = train(config, resume=resume, overwrite=not resume)
    tuned = MMLLM.from_profile(load_profile(str(result.profile)))
    after = choose_rates(tuned, schemas, heldout)
    report = {"train_requests": train_count, "heldout_requests": test_count, "steps": steps, "batch_size": batch_size,
              "before": {k: v for k, v in before.items() if k != "rows"},
              "after": {k: v for k, v in after.items() if k != "rows"},
              "minutes": round((time.perf_counter() - started) / 60, 1), "profile": str(result.profile)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "heldout.json").write_text(json.dumps({"before": before["rows"], "after": after["rows"]}, indent=1))
    print(f"\nchoosing, {test_count} held-out requests (constrained decoding on): right tool "
          f"{before['right_tool']:.1%} -> {after['right_tool']:.1%}; right arguments "
          f"{before['right_arguments']:.1%} -> {after['right_arguments']:.1%}")
    return 0
