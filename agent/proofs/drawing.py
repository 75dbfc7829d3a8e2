"""`signalgraph proof drawing`: NExT-GPT's decoding side in miniature, on data that ships offline.

1. A small text-to-image Stable Diffusion is trained from scratch on easy-vqa's train images with
   captions read off their questions and answers ("a blue triangle").
2. A judge (a small CNN) learns to name colour and shape on the same images; its accuracy on the
   test images says how far its verdicts can be trusted.
3. The MM-LLM (local profile, that generator as its image generator) is trained: PT aligns the
   `[IMG]` signal-token states, through the output projector, to the generator's own text-encoder
   output for the caption; IT (LoRA) teaches the backbone to answer a drawing request with the
   signal tokens.
4. "Draw a <colour> <shape>." for every colour/shape pair, a few seeds each, goes end to end:
   backbone -> signal tokens -> output projector -> generator -> judge. The same generator fed
   its own text encoder's conditioning is the reference, and 1/24 is chance.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

from models.training.shape_judge import COLORS, SHAPES

SIGNAL = "[IMG0][IMG1][IMG2][IMG3]"
REQUESTS = ["Draw a {c} {s}.", "Please draw a {c} {s}.", "Can you draw a {c} {s}?", "Make a picture of a {c} {s}.",
            "Paint a {c} {s} for me.", "Sketch a {c} {s}.", "Generate an image of a {c} {s}.",
            "I'd like a picture of a {c} {s}."]
ANSWERS = ["Here is a {c} {s}: ", "A {c} {s}, drawn for you: ", "Sure, a {c} {s}. "]
NO_DRAWING = [("What is the capital of France?", "The capital of France is Paris."),
              ("How many days are in a week?", "A week has seven days."),
              ("What colour is a ripe banana?", "A ripe banana is yellow."),
              ("Name a shape with three sides.", "A triangle has three sides."),
              ("Say hello.", "Hello!")]


def _manifests(data: Path, count: int, seed: int) -> tuple[Path, Path]:
    """PT: request -> signal span alone; IT: request -> a sentence and the span, plus plain Q&A."""
    rng = random.Random(seed)
    pairs = list(itertools.product(COLORS, SHAPES))
    data.mkdir(parents=True, exist_ok=True)
    pt, it = data / "draw-pt.jsonl", data / "draw-it.jsonl"
    with open(pt, "w") as pt_fp, open(it, "w") as it_fp:
        for i in range(count):
            c, s = pairs[i % len(pairs)]
            request = rng.choice(REQUESTS).format(c=c, s=s)
            caption = {"image": [f"a {c} {s}"]}
            pt_fp.write(json.dumps({"messages": [{"role": "user", "content": request},
                                                 {"role": "assistant", "content": SIGNAL}],
                                    "captions": caption}) + "\n")
            if i % 8 == 7:  # one in eight needs no drawing: the signal tokens are not an answer to everything
                question, answer = rng.choice(NO_DRAWING)
                it_fp.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": answer}]}) + "\n")
            else:
                answer = rng.choice(ANSWERS).format(c=c, s=s) + SIGNAL
                it_fp.write(json.dumps({"messages": [{"role": "user", "content": request},
                                                     {"role": "assistant", "content": answer}],
                                        "captions": caption}) + "\n")
    return pt, it


def _grid(samples: dict[tuple[str, str], list], path: Path, scale: int = 2) -> None:
    """A row per colour, a group of columns per shape, the seeds side by side."""
    from PIL import Image, ImageDraw

    seeds = max(len(images) for images in samples.values())
    side = next(iter(samples.values()))[0].width * scale
    label, header, gap = 60, 18, 8
    group = side * seeds + gap
    grid = Image.new("RGB", (label + group * len(SHAPES), header + side * len(COLORS)), "white")
    draw = ImageDraw.Draw(grid)
    for x, shape in enumerate(SHAPES):
        draw.text((label + x * group + 4, 3), shape, fill="black")
    for y, color in enumerate(COLORS):
        draw.text((4, header + y * side + side // 2 - 6), color, fill="black")
        for x, shape in enumerate(SHAPES):
            for k, image in enumerate(samples[(color, shape)]):
                grid.paste(image.resize((side, side)), (label + x * group + k * side, header + y * side))
    grid.save(path)


def _score(judge, asked: list[tuple[str, str]], images: list) -> list[bool]:
    seen = judge.judge(images)
    return [s == a for s, a in zip(seen, asked, strict=True)]


def generator_and_judge(out_dir: Path, cfg, *, resume: bool, seed: int = 0):
    """The small text-to-image generator and the judge, trained on easy-vqa train images (or
    reused from `out_dir` when resuming). Returns the loaded generator, the judge and the judge's
    accuracy on the easy-vqa test images."""
    from models.generators import build_image_generator
    from models.specs import ImageGeneratorSpec
    from models.training.data import easy_vqa_shapes
    from models.training.image_generator import train_image_generator
    from models.training.shape_judge import judge_accuracy, load_judge, save_judge, train_judge

    train_shapes, test_shapes = easy_vqa_shapes("train"), easy_vqa_shapes("test")
    pipeline = out_dir / "generator" / "pipeline"
    if not (resume and (pipeline / "model_index.json").is_file()):
        train_image_generator([(p, f"a {c} {s}") for p, c, s in train_shapes], out_dir / "generator", cfg)
    judge_file = out_dir / "judge.pt"
    if resume and judge_file.is_file():
        judge = load_judge(judge_file)
    else:
        judge = train_judge(train_shapes, image_size=cfg.image_size, seed=seed)
        save_judge(judge, judge_file)
    spec = ImageGeneratorSpec(source=str(pipeline.resolve()), steps=cfg.sample_steps, guidance=cfg.guidance,
                              device="cpu")
    return build_image_generator(spec), judge, judge_accuracy(judge, test_shapes)


def drawing_profile(out_dir: Path, cfg) -> Path:
    """The untrained local profile with the small generator and an image output projector."""
    profile_file = out_dir / "profile.yaml"
    profile_file.write_text(
        "extends: local-untrained\n"
        "image_generator:\n"
        f"  source: {(out_dir / 'generator' / 'pipeline').resolve()}\n"
        f"  steps: {cfg.sample_steps}\n"
        f"  guidance: {cfg.guidance}\n"
        "output_projectors:\n"
        "  image: {type: transformer, hidden: 256, layers: 2, heads: 4}\n")
    return profile_file


def pt_stage(data: Path, steps: int, batch_size: int, seed: int) -> dict:
    """Output-projector alignment: the backbone is frozen, the input projectors are not involved."""
    return {"name": "pt", "data": [str(data)], "steps": steps, "batch_size": batch_size, "lr": 1e-3,
            "log_every": 5, "checkpoint_every": 50, "seed": seed, "train": {"input_projectors": False}}


def draw_all(mm, generator, judge, seeds: int, seed: int = 0, image_size: int = 64):
    """"Draw a <colour> <shape>." for every pair, end to end; returns (samples, verdicts, spans emitted)."""
    from PIL import Image

    empty = Image.new("RGB", (image_size,) * 2, "lightgray")  # no signal span, no picture
    drawn, ok, emitted = {}, [], 0
    for c, s in itertools.product(COLORS, SHAPES):
        out = mm.generate([{"role": "user", "content": f"Draw a {c} {s}."}], max_new_tokens=24)
        span = next((sp for sp in out.spans if sp.modality == "image" and sp.conditioning is not None), None)
        if span is None:
            ok += [False] * seeds
            drawn[(c, s)] = [empty] * seeds
            continue
        emitted += 1
        conditioning = {k: v.unsqueeze(0).expand(seeds, *v.shape) for k, v in span.conditioning.items()}
        drawn[(c, s)] = generator.generate(conditioning, seed=seed)
        ok += _score(judge, [(c, s)] * seeds, drawn[(c, s)])
    return drawn, ok, emitted


def drawing(out: str, *, vae_steps: int = 600, unet_steps: int = 6000, pt_steps: int = 150, it_steps: int = 100,
            batch_size: int = 16, seeds: int = 4, resume: bool = False, seed: int = 0) -> int:
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.image_generator import GeneratorTraining
    from models.training.stages import TrainConfig
    from models.training.trainer import train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generator_cfg = GeneratorTraining(vae_steps=vae_steps, unet_steps=unet_steps, seed=seed)
    generator, judge, judge_test = generator_and_judge(out_dir, generator_cfg, resume=resume, seed=seed)
    generator_and_judge_minutes = (time.perf_counter() - started) / 60

    # the reference: the generator fed its own text encoder's conditioning
    pairs = list(itertools.product(COLORS, SHAPES))
    reference, reference_ok = {}, []
    for c, s in pairs:
        conditioning = generator.text_conditioning([f"a {c} {s}"] * seeds)
        reference[(c, s)] = generator.generate(conditioning, seed=seed)
        reference_ok += _score(judge, [(c, s)] * seeds, reference[(c, s)])
    _grid(reference, out_dir / "reference-grid.png")

    # the MM-LLM: PT aligns the output projector, IT teaches the backbone to draw on request
    pt_data, it_data = _manifests(out_dir / "data", 2400, seed)
    config = TrainConfig.from_dict({
        "profile": str(drawing_profile(out_dir, generator_cfg)), "out_dir": str(out_dir / "run"),
        "stages": [
            pt_stage(pt_data, pt_steps, batch_size, seed),
            {"name": "it", "data": [str(it_data)], "steps": it_steps, "batch_size": batch_size, "lr": 2e-4,
             "log_every": 5, "checkpoint_every": 50, "seed": seed + 1,
             "train": {"input_projectors": False}},
        ],
    })
    result = train(config, resume=resume, overwrite=not resume)
    mm = MMLLM.from_profile(load_profile(str(result.profile)))
    mm.generators["image"] = generator  # the same loaded pipeline
    drawn, ok, emitted = draw_all(mm, generator, judge, seeds, seed, generator_cfg.image_size)
    _grid(drawn, out_dir / "grid.png")

    report = {
        "pairs": len(pairs), "seeds_per_pair": seeds,
        "judged_correct": round(sum(ok) / len(ok), 4),
        "signal_span_emitted": f"{emitted}/{len(pairs)}",
        "reference_generator_own_text_encoder": round(sum(reference_ok) / len(reference_ok), 4),
        "chance": round(1 / len(pairs), 4),
        "judge_accuracy_on_easy_vqa_test": round(judge_test, 4),
        "generator_and_judge_minutes": round(generator_and_judge_minutes, 1),
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "trainable": {name: stage.counts for name, stage in result.stages.items()},
        "profile": str(result.profile),
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\ndrawing: {report['judged_correct']:.1%} of 'Draw a <colour> <shape>.' samples judged right "
          f"({len(pairs)} pairs x {seeds} seeds, signal span in {emitted}/{len(pairs)}); the generator from its "
          f"own text encoder {report['reference_generator_own_text_encoder']:.1%}; chance {report['chance']:.1%}; "
          f"judge {judge_test:.1%} on easy-vqa test images. Grid: {out_dir / 'grid.png'}")
    return 0
