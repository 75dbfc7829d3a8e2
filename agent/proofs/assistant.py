"""`signalgraph proof assistant`: the `local` weights retrained to answer people, from the shipped ones.

It continues from the joint proof's weights (models/trained/joint: seeing, drawing, choosing), so
its recipe fits CPU sessions (`--resume` carries it across them): no PT, one IT of the shipped
adapter (LoRA rank 8 on attention; projectors and new token rows stay as the joint run left them)
on the assistant mix (agent/proofs/assistant_mix.py), rendered as the controller serves it.
`--install` writes the result to models/trained/local. Measure it with
`python -m agent.proofs.assistant_eval` (through the HTTP API, on held-out phrasings and items).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from agent.proofs.joint import JOINT_DIR, LOCAL_DIR, install

COUNTS = {"seeing": 1200, "tool_sessions": 250, "tool_lines": 250, "drawing": 250, "plans": 100,
          "caller_tools": 200, "general": 250}
GENERAL = 480  # everyday prompts asked of the untrained backbone; those it finishes are kept


def _start(out_dir: Path, general: int, seed: int) -> tuple[Path, list[tuple[str, str]]]:
    """The start (the joint weights, as a profile) and the untrained backbone's own answers to
    everyday prompts; both kept in `out_dir`, so a resumed run reuses them."""
    from agent.proofs.assistant_mix import teacher_answers
    from agent.proofs.general_questions import training_prompts
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    profile, answers = out_dir / "start.yaml", out_dir / "general.jsonl"
    if not answers.exists():
        untrained = MMLLM.from_profile(load_profile("local-untrained"), require_trained=False)
        untrained.eval()
        teacher = teacher_answers(untrained, training_prompts(general, seed))
        answers.write_text("".join(json.dumps(pair) + "\n" for pair in teacher))
        del untrained
    shutil.copytree(JOINT_DIR / "generator", out_dir / "generator", dirs_exist_ok=True)
    shutil.copy(JOINT_DIR / "trained.safetensors", out_dir / "start.safetensors")
    profile.write_text("extends: local-untrained\nprojector_weights: start.safetensors\n"
                       "image_generator: {source: ./generator, steps: 25, guidance: 4.0}\n"
                       "output_projectors:\n  image: {type: transformer, hidden: 256, layers: 2, heads: 4}\n")
    return profile, [tuple(json.loads(x)) for x in answers.read_text().splitlines()]


def served_tools(out_dir: Path) -> list[dict]:
    """The tools a `local` server offers (its runnable ones), as the controller lists them."""
    from models.profiles import load_profile
    from tools.expert_tools import ToolContext, build_tools, runnable_tools, tool_schemas
    from tools.media_store import MediaStore

    profile = load_profile("local")
    return tool_schemas(build_tools(ToolContext("assistant", profile, MediaStore(out_dir / "media")),
                                    allow=runnable_tools(profile, knowledge_base=True)))


def assistant(out: str, *, it_steps: int = 160, batch_size: int = 16, lr: float = 1e-4, resume: bool = False,
              install_weights: bool = False, seed: int = 0) -> int:
    from agent.proofs.assistant_mix import assistant_mix
    from agent.proofs.drawing import _manifests
    from models.training.stages import TrainConfig
    from models.training.trainer import train

    out_dir = Path(out)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start_profile, teacher = _start(out_dir, GENERAL, seed)
    schemas = served_tools(out_dir)
    _, draw_it = _manifests(data, 2400, seed)
    mix = data / "assistant-it.jsonl"
    if not (resume and mix.exists()):
        lines = assistant_mix(data, schemas=schemas, draw_it=draw_it,
                              teacher=teacher[: COUNTS["general"]], counts=COUNTS, seed=seed)
        mix.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tuned = train(TrainConfig.from_dict({"profile": str(start_profile), "out_dir": str(out_dir / "it"), "stages": [{
        # quarter batches, accumulated: 16 controller-format lines at once need more than 24 GB on a CPU
        "name": "it", "data": [str(mix)], "steps": it_steps, "batch_size": batch_size // 4, "grad_accumulation": 4,
        "lr": lr, "train": {"input_projectors": False, "output_projectors": False, "backbone": "lora",
                            "new_token_embeddings": False},
        "group_by_length": True, "log_every": 5, "checkpoint_every": 10, "seed": seed + 1}]}),
        resume=resume, overwrite=not resume)
    report = {"it_data": {**COUNTS, "general": min(len(teacher), COUNTS["general"])}, "it_steps": it_steps,
              "batch_size": batch_size,
              "lr": lr, "started_from": "models/trained/joint",
              "trained_minutes": round((time.perf_counter() - started) / 60, 1), "device": _device(),
              "trainable": {"it": tuned.stages["it"].counts}, "profile": str(tuned.profile)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nassistant: IT {it_steps} x {batch_size} in {report['trained_minutes']} min on {report['device']}; "
          f"profile {tuned.profile}. Measure it: python -m agent.proofs.assistant_eval --profile {tuned.profile}")
    if install_weights:
        where = install(tuned.weights, out_dir / "generator", report, LOCAL_DIR)
        print(f"installed the local profile's weights in {where}")
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
