"""`signalgraph train` and `signalgraph eval`: the survey's PT -> IT pipeline from a YAML config."""

from __future__ import annotations


def train(args) -> int:
    from models.training.trainer import train as run

    result = run(args.config, resume=args.resume, overwrite=args.overwrite)
    for name, stage in result.stages.items():
        print(f"{name}: {stage.steps} steps -> {stage.weights} (loss curve {stage.plot})")
    print(f"trained weights: {result.weights}\nuse them with: signalgraph --profile {result.profile} ...")
    return 0


def evaluate(args) -> int:
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.evaluation import evaluate as run

    mm = MMLLM.from_profile(load_profile(args.profile), require_trained=not args.blind)
    result = run(mm, args.manifest, blind=args.blind, limit=args.limit)
    kind = "blind (no media)" if args.blind else "with media"
    print(f"exact match {kind}: {result.accuracy:.1%} ({result.correct}/{result.total})")
    return 0
