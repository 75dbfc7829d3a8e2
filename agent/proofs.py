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
    test_manifest = _sample(easy_vqa_manifest("test", data), test_questions, seed)
    config = TrainConfig.from_dict({
        "profile": "local", "out_dir": str(out_dir / "run"),
        "stages": [
            {"name": "pt", "data": [str(train_manifest)], "steps": pt_steps, "batch_size": batch_size,
             "lr": 1e-3, "log_every": 5, "checkpoint_every": 50, "seed": seed},
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
