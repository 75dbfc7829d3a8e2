"""`signalgraph proof joint`: one set of trained weights that sees, draws and picks tools.

These are the `local` profile's weights. PT runs twice from the untrained local profile, as in
the proofs: the image input projector on easy-vqa (seeing), and the image output projector aligned
to the small generator's text conditioning (drawing). Their weights are merged, and one IT (LoRA,
both projectors and the new tokens) runs on a mix of the three proofs' instruction data, part of
it in the controller's own prompt format (tool list, attachments), so the demo's turns look like
training. The three proofs' measures are then taken on the one model. `--install` writes the
weights (fp16) and the generator to models/trained/joint, where `signalgraph proof assistant`
starts the `local` profile's weights from.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from agent.proofs.choosing import choose_rates, tool_use_lines
from agent.proofs.drawing import _grid, _manifests, draw_all, drawing_profile, generator_and_judge, pt_stage
from agent.proofs.seeing import seeing_pt_stage, test_sample
from agent.proofs.tool_requests import own_drawing

TRAINED = Path(__file__).resolve().parents[2] / "models" / "trained"
JOINT_DIR = TRAINED / "joint"  # what `--install` writes; `proof assistant` starts from it
LOCAL_DIR = TRAINED / "local"  # the `local` profile's weights (`proof assistant --install`)
ONE_WORD = " Answer with one word."


def merge_pt(seeing: Path, drawing: Path, out: Path, new_token_ids: list[int], signal_ids: list[int]) -> Path:
    """Seeing PT's input projector and drawing PT's output projector in one file; the new tokens'
    embedding rows from seeing, except the image signal tokens' rows, which drawing PT trained."""
    from safetensors.torch import load_file, save_file

    a, b = load_file(str(seeing)), load_file(str(drawing))
    merged = {k: v for k, v in a.items() if k.startswith("input_projectors.")}
    merged |= {k: v for k, v in b.items() if k.startswith("output_projectors.")}
    rows = a["backbone.new_token_embeddings"].clone()
    for i, token in enumerate(new_token_ids):
        if token in signal_ids:
            rows[i] = b["backbone.new_token_embeddings"][i]
    merged["backbone.new_token_embeddings"] = rows
    save_file(merged, str(out))
    return out


def mixed_lines(vqa: Path, draw_it: Path, schemas: list[dict], counts: dict[str, int], seed: int) -> list[dict]:
    """The joint IT data: easy-vqa questions, drawing requests and tool requests; a quarter of the
    first two in the controller's prompt format, where the tool list is shown."""
    from agent.proofs.tool_requests import requests
    from graphs.thinker import system_prompt

    rng = random.Random(seed)
    vqa_lines = [json.loads(x) for x in rng.sample(vqa.read_text().splitlines(), counts["seeing"])]
    for line in vqa_lines[: len(vqa_lines) // 4]:
        line["messages"][0]["content"] = line["messages"][0]["content"].replace(ONE_WORD, "")
        line["messages"].insert(0, {"role": "system",
                                    "content": system_prompt(schemas, [{"id": "image-1", "kind": "image"}])})
    draw_lines = [json.loads(x) for x in draw_it.read_text().splitlines()[: counts["drawing"]]]
    for line in draw_lines[: len(draw_lines) // 4]:
        line["messages"].insert(0, {"role": "system", "content": system_prompt(schemas, [])})
    tools = [item for item in requests(counts["tools"] * 2, split="train", seed=seed)
             if not own_drawing(item["request"])][: counts["tools"]]
    lines = vqa_lines + draw_lines + tool_use_lines(system_prompt(schemas, []), tools)
    rng.shuffle(lines)
    return lines


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def install(weights: Path, pipeline: Path, report: dict, dest: Path) -> Path:
    """The trained weights in fp16 (half the size; loading casts them back) and the generator."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(state, str(dest / "trained.safetensors"))
    StableDiffusionPipeline.from_pretrained(str(pipeline),
                                            torch_dtype=torch.float16).save_pretrained(dest / "generator")
    (dest / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return dest


def joint(out: str, *, seeing_pt_steps: int = 300, drawing_pt_steps: int = 150, it_steps: int = 900,
          batch_size: int = 16, seeds: int = 4, test_questions: int = 1000, resume: bool = False,
          install_weights: bool = False, seed: int = 0) -> int:
    from agent.proofs.tool_requests import requests
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.data import easy_vqa_manifest
    from models.training.evaluation import evaluate
    from models.training.image_generator import GeneratorTraining
    from models.training.stages import TrainConfig
    from models.training.trainer import train
    from tools.expert_tools import ToolContext, build_tools, tool_schemas
    from tools.media_store import MediaStore

    out_dir = Path(out)
    data = out_dir / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    overwrite = not resume

    def run(profile: str, where: Path, stage: dict):
        return train(TrainConfig.from_dict({"profile": profile, "out_dir": str(where), "stages": [stage]}),
                     resume=resume, overwrite=overwrite)

    cfg = GeneratorTraining(seed=seed)
    generator, judge, judge_test = generator_and_judge(out_dir / "drawing", cfg, resume=resume, seed=seed)
    vqa = easy_vqa_manifest("train", data)
    seeing_pt = run("local-untrained", out_dir / "seeing", seeing_pt_stage(vqa, seeing_pt_steps, batch_size, seed))
    draw_pt, draw_it = _manifests(data, 2400, seed)
    drawing_file = drawing_profile(out_dir / "drawing", cfg)
    drawing_pt = run(str(drawing_file), out_dir / "drawing" / "run", pt_stage(draw_pt, drawing_pt_steps, batch_size,
                                                                              seed))

    base = MMLLM.from_profile(load_profile(str(drawing_file)), require_trained=False)
    merge_pt(seeing_pt.weights, drawing_pt.weights, out_dir / "start.safetensors",
                     base.backbone.new_token_ids, base.backbone.signal_ids["image"])
    del base
    start_profile = out_dir / "start.yaml"
    start_profile.write_text(f"extends: {json.dumps(str(drawing_file.resolve()))}\n"
                             "projector_weights: start.safetensors\n")
    schemas = tool_schemas(build_tools(ToolContext("joint", load_profile("local-untrained"),
                                                   MediaStore(out_dir / "media"))))
    mix = data / "joint-it.jsonl"
    counts = {"seeing": 3000, "drawing": 900, "tools": 900}
    mix.write_text("".join(json.dumps(x) + "\n" for x in mixed_lines(vqa, draw_it, schemas, counts, seed)))
    tuned = run(str(start_profile), out_dir / "it", {
        "name": "it", "data": [str(mix)], "steps": it_steps, "batch_size": batch_size, "lr": 2e-4,
        "group_by_length": True, "log_every": 5, "checkpoint_every": 25, "seed": seed + 1})
    trained_minutes = (time.perf_counter() - started) / 60

    mm = MMLLM.from_profile(load_profile(str(tuned.profile)))
    mm.generators["image"] = generator  # the same loaded pipeline
    seeing = evaluate(mm, test_sample(data, test_questions, seed), max_new_tokens=4)
    drawn, ok, emitted = draw_all(mm, generator, judge, seeds, seed, cfg.image_size)
    _grid(drawn, out_dir / "grid.png")
    heldout = [item for item in requests(60, split="heldout") if not own_drawing(item["request"])]
    choosing = choose_rates(mm, schemas, heldout)

    report = {
        "seeing": {"test_questions": seeing.total, "accuracy": round(seeing.accuracy, 4)},
        "drawing": {"judged_correct": round(sum(ok) / len(ok), 4), "signal_span_emitted": f"{emitted}/{len(drawn)}",
                    "judge_accuracy_on_easy_vqa_test": round(judge_test, 4)},
        "choosing": {"heldout_requests": len(heldout), "right_tool": choosing["right_tool"],
                     "right_arguments": choosing["right_arguments"]},
        "it_data": counts, "it_steps": it_steps, "batch_size": batch_size,
        "trained_minutes": round(trained_minutes, 1), "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "trainable": {"it": tuned.stages["it"].counts}, "profile": str(tuned.profile), "device": _device_name(),
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "choosing.json").write_text(json.dumps(choosing["rows"], indent=1))
    print(f"\njoint: seeing {seeing.accuracy:.1%} exact match on {seeing.total} easy-vqa test questions; drawing "
          f"{report['drawing']['judged_correct']:.1%} judged right (signal span in {emitted}/{len(drawn)}); choosing "
          f"right tool {choosing['right_tool']:.1%} on {len(heldout)} held-out requests. Grid: {out_dir / 'grid.png'}")
    if install_weights:
        where = install(tuned.weights, out_dir / "drawing" / "generator" / "pipeline", report, JOINT_DIR)
        print(f"installed the joint weights in {where}; `signalgraph proof assistant --install` continues from them")
    return 0
