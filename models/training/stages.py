"""Training stages (survey §3): MM pre-training (PT), then MM instruction tuning (IT).

What trains is declared in one place, `StageSpec.train`, and applied in one place,
`apply_stage`: encoders and generators are always frozen; the backbone is frozen, LoRA-adapted
or fully trained; the projectors and the new tokens' embedding rows train or not per stage.

- PT (defaults): input projectors learn to map X features to text on X-text pairs, output
  projectors learn to map signal-token states to the generator's text conditioning; the
  backbone is frozen, only the rows of the added tokens (`<image>`, `[IMG0]`, ...) train.
- IT (defaults): the same, plus LoRA adapters on the backbone, on conversations.

LoRA's shape (rank, targets) comes from the profile (`backbone.lora`), not from the stage, so the
file a profile's `projector_weights` points to always fits the adapters that profile builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from models.config_files import problems, read_mapping
from models.errors import ConfigError
from models.specs import DType

BackboneMode = Literal["frozen", "lora", "full"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainParts(_Spec):
    """Which parts of the MM-LLM a stage trains."""

    input_projectors: bool = True
    output_projectors: bool = True
    backbone: BackboneMode = "frozen"
    # the embedding rows of <image>/<audio>/<video> and the signal tokens [IMG0].. (and nothing else)
    new_token_embeddings: bool = True


_DEFAULTS: dict[str, dict[str, Any]] = {
    # LLaVA's PT uses 1e-3 for the projector; LoRA instruction tuning 2e-4
    "pt": {"train": {"backbone": "frozen"}, "lr": 1e-3},
    "it": {"train": {"backbone": "lora"}, "lr": 2e-4},
}


class StageSpec(_Spec):
    name: Literal["pt", "it"]
    train: TrainParts = TrainParts()
    # JSONL manifests (see models.training.data); relative paths are taken from the config's folder
    data: list[str] = []
    eval_data: list[str] = []
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    # say how long with one of them; epochs may be fractional
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    grad_accumulation: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    alignment_weight: float = Field(1.0, ge=0)
    # auto: bf16 on a CUDA GPU that supports it, else no mixed precision
    mixed_precision: MixedPrecision = "auto"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(500, ge=1)
    keep_checkpoints: int | None = Field(3, ge=1)
    # batches of similar length (data that mixes short and long conversations pads far less)
    group_by_length: bool = False
    # DataLoader workers; only useful with cached features (live encoding stays in the main process)
    loader_workers: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") in _DEFAULTS:
            defaults = _DEFAULTS[data["name"]]
            data = dict(data)
            train = data.get("train") or {}
            if isinstance(train, dict):
                data["train"] = {**defaults["train"], **train}
            data.setdefault("lr", defaults["lr"])
        return data

    @model_validator(mode="after")
    def _length(self) -> StageSpec:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.epochs = 1.0
        return self

    def total_steps(self, dataset_size: int, processes: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accumulation * processes
        return max(1, round(self.epochs * dataset_size / per_step))

    def warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)


class TrainConfig(_Spec):
    """A training run: a profile, its stages in order, and where the results go."""

    profile: str = "local-untrained"  # where training starts: the local models, nothing trained
    stages: list[StageSpec]
    out_dir: str
    # frozen-encoder features and generator text conditioning; default out_dir/feature-cache
    cache_dir: str | None = None
    cache_features: bool = True
    # the backbone's weights while training; float32 keeps master weights exact (mixed precision
    # is autocast on top); `auto` keeps the profile's choice (bf16 on a GPU)
    backbone_dtype: DType = "float32"

    @model_validator(mode="after")
    def _stages(self) -> TrainConfig:
        if not self.stages:
            raise ValueError("a training config needs at least one stage (pt, it)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"each stage may appear once, got {names}")
        for stage in self.stages:
            if not stage.data:
                raise ValueError(f"stage {stage.name!r} has no data: give it a list of JSONL manifests")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a config file; relative data, output and cache paths are taken from its folder."""
        path = Path(path).expanduser()
        data = read_mapping(path, "training config: profile, stages, out_dir")
        return cls.from_dict(data, base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, *, base: Path | None = None, where: str = "the training config") -> TrainConfig:
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where} is invalid: {problems(exc)}") from None
        return config.resolved(base) if base is not None else config

    def resolved(self, base: Path) -> TrainConfig:
        def fix(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else base / q)

        profile = self.profile
        if Path(profile).suffix and not Path(profile).expanduser().is_absolute():
            profile = fix(profile)  # a profile file next to the config, not a shipped name
        stages = [s.model_copy(update={"data": [fix(d) for d in s.data],
                                       "eval_data": [fix(d) for d in s.eval_data]}) for s in self.stages]
        return self.model_copy(update={
            "profile": profile, "stages": stages, "out_dir": fix(self.out_dir),
            "cache_dir": fix(self.cache_dir) if self.cache_dir else None,
        })


# --- applying a stage ---------------------------------------------------------------------------


@dataclass
class StagePlan:
    """What `apply_stage` set up: the parameters to optimise, in a fixed order, and the counts."""

    stage: StageSpec
    # (name, parameter, weight decay applies) in a deterministic order (optimizer state follows it)
    parameters: list[tuple[str, nn.Parameter, bool]]
    counts: dict[str, tuple[int, int]]  # part -> (trainable, total); embeddings count only their new rows
    # the embedding matrix when only its new rows train (gradient-masked): (parameter, row ids)
    masked_rows: tuple[nn.Parameter, list[int]] | None = None
    _hooks: list = field(default_factory=list, repr=False)

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts.values())

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay = [p for _, p, d in self.parameters if d]
        rest = [p for _, p, d in self.parameters if not d]
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return groups

    def summary(self) -> str:
        lines = [f"stage {self.stage.name}: {self.trainable:,} trainable of {self.total:,} parameters "
                 f"({100 * self.trainable / max(self.total, 1):.2f}%)"]
        for part, (t, n) in self.counts.items():
            lines.append(f"  {part:<28} {t:>13,} / {n:>13,}")
        return "\n".join(lines)

    def release(self) -> None:
        """Remove the gradient masks this plan installed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _generator_modules(generator: object) -> list[nn.Module]:
    pipeline = getattr(generator, "pipeline", None)
    components = getattr(pipeline, "components", {}) if pipeline is not None else {}
    return [c for c in components.values() if isinstance(c, nn.Module)]


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices only: not on biases, norms, queries' scales or embedding rows."""
    return p.dim() >= 2 and "trainable_tokens" not in name and "embed" not in name


def apply_stage(mm, stage: StageSpec, *, inputs: Iterable[str] = (), outputs: Iterable[str] = ()) -> StagePlan:
    """Build the projectors a stage needs and set every `requires_grad` for it. The only place that freezes.

    `inputs`/`outputs` name the modalities the stage's data uses (their projectors are built, and
    the output ones load their generator for the alignment target). Projectors built before stay.
    """
    for modality in sorted(set(inputs)):
        mm.input_projector(modality)
    for modality in sorted(set(outputs)):
        mm.output_projector(modality)
    parts = stage.train
    backbone = mm.backbone
    counts: dict[str, tuple[int, int]] = {}

    # frozen, always: encoders and generators
    for modality, encoder in mm.encoders.items():
        encoder.requires_grad_(False)
        encoder.eval()
        if modality != "video":
            counts[f"encoder.{modality}"] = (0, _count(encoder.parameters()))
    for modality, generator in mm.generators.items():
        modules = _generator_modules(generator)
        seen: set[int] = set()
        total = 0
        for module in modules:
            module.requires_grad_(False)
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        counts[f"generator.{modality}"] = (0, total)

    # the backbone
    backbone.freeze()
    if parts.backbone == "lora" and not backbone.has_lora:
        backbone.enable_lora()
    if parts.backbone == "full" and backbone.has_lora:
        # fold the adapters in: a full fine-tune trains the merged weights
        backbone.model = backbone.model.merge_and_unload()
    embedding = backbone.input_embeddings().weight
    new_rows = len(backbone.new_token_ids)
    row_count = new_rows * embedding.shape[1]
    parameters: list[tuple[str, nn.Parameter, bool]] = []
    hooks = []
    masked = None
    base_total, lora_total = 0, 0
    for name, p in backbone.model.named_parameters():
        if "lora_" in name:
            lora_total += p.numel()
            if parts.backbone == "lora":
                p.requires_grad_(True)
                parameters.append((f"backbone.{name}", p, _decays(name, p)))
        elif "trainable_tokens" in name:  # peft's new-token rows (with LoRA)
            if parts.new_token_embeddings:
                p.requires_grad_(True)
                parameters.append((f"backbone.{name}", p, False))
        else:
            base_total += p.numel()
            if parts.backbone == "full":
                p.requires_grad_(True)
                parameters.append((f"backbone.{name}", p, _decays(name, p)))
    if parts.new_token_embeddings and parts.backbone != "full" and not backbone.has_lora:
        # Only the new rows may change: mask the gradient of the others (exactly zero, so Adam
        # leaves them bit-identical), and no weight decay on this matrix.
        import torch

        mask = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
        mask[backbone.new_token_ids] = 1
        embedding.requires_grad_(True)
        hooks.append(embedding.register_hook(lambda grad: grad * mask.to(grad.dtype)))
        parameters.append(("backbone.new_token_embeddings", embedding, False))
        masked = (embedding, list(backbone.new_token_ids))
    if parts.backbone == "full":
        counts["backbone"] = (base_total, base_total)
    else:
        counts["backbone (base weights)"] = (0, base_total - row_count)
        if lora_total:
            counts["backbone.lora"] = (lora_total if parts.backbone == "lora" else 0, lora_total)
        counts["backbone.new_token_embeddings"] = (row_count if parts.new_token_embeddings else 0, row_count)

    # projectors
    for kind, modules, on in (("input_projector", mm.input_projectors, parts.input_projectors),
                              ("output_projector", mm.output_projectors, parts.output_projectors)):
        for modality in sorted(modules):
            module = modules[modality]
            module.requires_grad_(on)
            n = _count(module.parameters())
            counts[f"{kind}.{modality}"] = (n if on else 0, n)
            if on:
                parameters += [(f"{kind}s.{modality}.{name}", p, _decays(name, p))
                               for name, p in module.named_parameters()]
    if not parameters:
        raise ConfigError(f"stage {stage.name!r} trains nothing: every part is frozen in its `train` block")
    return StagePlan(stage, parameters, counts, masked, hooks)
