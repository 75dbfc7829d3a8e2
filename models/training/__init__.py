"""Training (survey §3): MM pre-training (PT), then MM instruction tuning (IT).

- `stages`   what each stage trains (`StageSpec`, `TrainConfig`) and `apply_stage`, the one place that freezes
- `data`     JSONL manifests (format in its docstring), validation, assistant-only labels, easy-vqa
- `features` the frozen-encoder feature cache and the dataset of `Example`s
- `trainer`  `train(config)` on accelerate, checkpoints and resume, `evaluate`, `pt_throughput`
- `image_generator`  a small text-to-image Stable Diffusion trained from scratch (the drawing proof's generator)
- `shape_judge`      a CNN that names colour and shape in easy-vqa style images (the drawing proof's judge)

"""

from models.training.data import DatasetError, Record, easy_vqa_manifest, read_manifest, read_manifests, tokenize
from models.training.stages import StagePlan, StageSpec, TrainConfig, TrainParts, apply_stage

__all__ = [
    "DatasetError", "Record", "StagePlan", "StageSpec", "TrainConfig", "TrainParts", "apply_stage",
    "easy_vqa_manifest", "read_manifest", "read_manifests", "tokenize",
    "train", "run_stage", "evaluate", "pt_throughput", "EvalResult", "Throughput", "TrainResult",
    "precompute", "FeatureCache", "ExampleDataset",
]


def __getattr__(name: str):
    if name in ("train", "evaluate", "pt_throughput", "run_stage", "EvalResult", "Throughput", "TrainResult"):
        from models.training import trainer

        return getattr(trainer, name)
    if name in ("precompute", "FeatureCache", "ExampleDataset"):
        from models.training import features

        return getattr(features, name)
    raise AttributeError(f"module 'models.training' has no attribute {name!r}")
