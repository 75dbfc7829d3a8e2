"""The training loop: stages in order on `accelerate`, the same code on a CPU and on GPUs.

`train(config)` runs each stage of a `TrainConfig` (PT, then IT) and writes, under `out_dir`::

    pt/checkpoint-STEP/   trained.safetensors (only what trains), optimizer.pt, scheduler.pt,
                          rng-RANK.pt, state.json (step, written last), profile.json, stage.json
    pt/log.jsonl          one line per log interval (loss, text, alignment, lr, samples/s) and eval
    pt/loss.png           the loss curves, redrawn at each checkpoint and at the end
    pt/trained.safetensors, pt/done.json      the stage's result
    it/...                the same; IT starts from pt/trained.safetensors
    trained.safetensors   the last stage's result: what a profile's projector_weights points to
    profile.yaml          `extends:` the training profile, with projector_weights set to it

`resume=True` continues each unfinished stage from its latest checkpoint: the same step count,
the optimizer, scheduler and RNG states restored, the data order continued where it stopped.
A finished stage (done.json) is skipped.

`evaluate(mm, manifest)` is VQA-style exact-match accuracy (greedy answers, normalised); with
`blind=True` the media are dropped, the baseline a model that really looks must beat.
`pt_throughput(...)` measures PT steps per second with cached features against the encoder in the loop.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import string
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.errors import ConfigError
from models.training.data import Record, read_manifest, read_manifests
from models.training.features import ExampleDataset, FeatureCache, collate, load_media, precompute
from models.training.stages import StagePlan, StageSpec, TrainConfig, apply_stage

LOG = "log.jsonl"
PLOT = "loss.png"
WEIGHTS = "trained.safetensors"
DONE = "done.json"


@dataclass
class StageResult:
    name: str
    dir: Path
    weights: Path
    steps: int
    resumed_from: int | None
    counts: dict[str, tuple[int, int]]
    log: Path
    plot: Path
    backbone_dir: Path | None = None  # a fully fine-tuned backbone, saved with save_pretrained
    final_loss: float | None = None


@dataclass
class TrainResult:
    stages: dict[str, StageResult]
    weights: Path  # the last stage's trained.safetensors, copied to out_dir
    profile: Path  # out_dir/profile.yaml, a profile that loads the result


# --- small pieces ---------------------------------------------------------------------------------


def resolve_mixed_precision(value: str) -> str:
    cuda = torch.cuda.is_available()
    if value == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if value == "fp16" and not cuda:
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on a CPU")
    return value


def _accelerator(stage: StageSpec):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    precision = resolve_mixed_precision(stage.mixed_precision)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, precision):
        # one process, two stages with different precision: accelerate keeps a singleton state
        AcceleratorState._reset_state()
    # projectors of a modality absent from a batch get no gradient: DDP must not wait for them
    return Accelerator(mixed_precision=precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class _Batches(torch.utils.data.Sampler):
    """Micro-batches [start, stop) of an endless sequence of epochs, each its own seeded shuffle.

    Batch b is the same in every run with the same seed, so a resumed run picks up exactly
    where the interrupted one stopped (no RNG draws, no skipped-batch bookkeeping).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int,
                 lengths: list[int] | None = None):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop = start, stop
        self.lengths = lengths
        self.per_epoch = math.ceil(size / batch_size)
        self._order: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            if self.lengths is None:
                batches = [order[i:i + self.batch_size] for i in range(0, self.size, self.batch_size)]
            else:
                batches = self._grouped(order, g)
            self._order = (epoch, batches)
        return self._order[1]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        """Batches of similar length, so a batch pads to little more than its own examples (a mix of
        short VQA answers and long tool prompts otherwise pads every batch to the longest). Within a
        shuffled window of 32 batches the examples are sorted by length; the batches are shuffled again."""
        window = self.batch_size * 32
        batches = []
        for i in range(0, self.size, window):
            chunk = sorted(order[i:i + window], key=lambda j: self.lengths[j], reverse=True)
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        for b in range(self.start, self.stop):
            epoch, k = divmod(b, self.per_epoch)
            yield self._epoch(epoch)[k]

    def __len__(self) -> int:
        return self.stop - self.start


def _scheduler(optimizer, stage: StageSpec, total: int):
    warmup = stage.warmup(total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if stage.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if stage.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _masked_index(optimizer, plan: StagePlan) -> int | None:
    """The optimizer-state key of the gradient-masked embedding matrix, if there is one."""
    if plan.masked_rows is None:
        return None
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(flat) if p is plan.masked_rows[0])


def _compact_optimizer_state(optimizer, plan: StagePlan) -> dict:
    """The optimizer's state, with the masked embedding's moments cut to its trainable rows
    (the others are exactly zero): a SmolLM2 checkpoint holds kilobytes there, not 226 MB."""
    state = optimizer.state_dict()
    index = _masked_index(optimizer, plan)
    if index is not None and index in state["state"]:
        rows = torch.tensor(plan.masked_rows[1])
        entry = dict(state["state"][index])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry:
                entry[key] = entry[key][rows.to(entry[key].device)].clone()
        entry["compact_rows"] = rows
        state["state"] = {**state["state"], index: entry}
    return state


def _expand_optimizer_state(state: dict, optimizer, plan: StagePlan) -> dict:
    index = _masked_index(optimizer, plan)
    entry = state["state"].get(index) if index is not None else None
    if entry is not None and "compact_rows" in entry:
        entry = dict(entry)
        rows = entry.pop("compact_rows")
        weight = plan.masked_rows[0]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry:
                full = torch.zeros(weight.shape, dtype=entry[key].dtype)
                full[rows] = entry[key].cpu()
                entry[key] = full
        state["state"][index] = entry
    return state


def checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), oldest first."""
    found = [p for p in stage_dir.glob("checkpoint-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def load_trained(mm, path: Path) -> None:
    """Load a trained.safetensors into an MM-LLM whose projectors (and LoRA) are already built."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for kind, modules in (("input_projectors", mm.input_projectors), ("output_projectors", mm.output_projectors)):
        for modality, module in modules.items():
            prefix = f"{kind}.{modality}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                module.load_state_dict(sub)
    backbone = mm.backbone
    rows = state.get("backbone.new_token_embeddings")
    if rows is not None:
        with torch.no_grad():
            weight = backbone.input_embeddings()
            weight = getattr(weight, "base_layer", weight).weight  # under peft's trainable-tokens wrapper
            weight[torch.tensor(backbone.new_token_ids)] = rows.to(weight)
    lora = {k[len("backbone.lora."):]: v for k, v in state.items() if k.startswith("backbone.lora.")}
    if lora:
        if not backbone.has_lora:
            raise ConfigError(f"{path} holds LoRA adapters but this stage's backbone has none")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(backbone.model, lora)


def _stage_modalities(records: list[Record]) -> tuple[list[str], list[str]]:
    inputs = sorted({m for r in records for m in r.modalities()})
    outputs = sorted({m for r in records for m, c in r.captions.items() if c})
    return inputs, outputs


def _carried_modalities(mm) -> tuple[set[str], set[str]]:
    """Modalities whose projectors the MM-LLM's starting weights file holds."""
    path = getattr(mm, "weights_file", None)
    if path is None or not Path(path).is_file():
        return set(), set()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    found = {kind: {k.split(".")[1] for k in keys if k.startswith(kind + ".")}
             for kind in ("input_projectors", "output_projectors")}
    return found["input_projectors"], found["output_projectors"]


def _read_log(stage_dir: Path) -> list[dict]:
    path = stage_dir / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(stage_dir: Path, title: str = "") -> Path:
    """Draw log.jsonl's curves to loss.png (Agg canvas: no display, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _read_log(stage_dir)
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("loss", "train loss"), ("text", "text loss"), ("alignment", "alignment loss"),
                       ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if key == "eval_loss" or len(xs) < 20 else None, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or stage_dir.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out = stage_dir / PLOT
    fig.savefig(out)
    return out


@torch.no_grad()
def eval_loss(mm, dataset: ExampleDataset, batch_size: int = 8, alignment_weight: float = 1.0) -> dict[str, float]:
    """Mean losses over a dataset, no gradients, dropout off."""
    was_training = mm.training
    mm.eval()
    sums = {"eval_loss": 0.0, "eval_text": 0.0, "eval_alignment": 0.0}
    batches, aligned = 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
            out = mm(batch, alignment_weight=alignment_weight)
            sums["eval_loss"] += out.loss.item()
            sums["eval_text"] += out.text.item()
            if out.alignment is not None:
                sums["eval_alignment"] += out.alignment.item()
                aligned += 1
            batches += 1
    finally:
        mm.train(was_training)
    result = {"eval_loss": sums["eval_loss"] / max(batches, 1), "eval_text": sums["eval_text"] / max(batches, 1)}
    result["eval_alignment"] = sums["eval_alignment"] / aligned if aligned else None
    return result


# --- one stage ------------------------------------------------------------------------------------


def run_stage(mm, stage: StageSpec, stage_dir: str | Path, *, records: list[Record] | None = None,
              eval_records: list[Record] | None = None, cache: FeatureCache | None = None,
              resume: bool = False, progress: bool = True, stop_after: int | None = None) -> StageResult:
    """Train `mm` for one stage, writing checkpoints, the log, the plot and the stage's weights.

    `records` default to the stage's `data` manifests. `stop_after` ends the run after that many
    optimizer steps without finishing the stage (as an interruption would; for tests and trials).
    """
    from tqdm.auto import tqdm

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else read_manifests(stage.data)
    if eval_records is None:
        eval_records = read_manifests(stage.eval_data) if stage.eval_data else []
    inputs, outputs = _stage_modalities(records + eval_records)
    carried_in, carried_out = _carried_modalities(mm)
    # projectors trained before (e.g. PT's output projector when IT data has no captions) are
    # rebuilt from the starting weights, so this stage's result still holds them
    inputs, outputs = sorted(set(inputs) | carried_in), sorted(set(outputs) | carried_out)

    accelerator = _accelerator(stage)
    main = accelerator.is_main_process
    say = tqdm.write if progress else (lambda *_: None)
    torch.manual_seed(stage.seed)
    random.seed(stage.seed)
    np.random.seed(stage.seed)
    plan: StagePlan = apply_stage(mm, stage, inputs=inputs, outputs=outputs)
    if main:
        say(plan.summary())
    if cache is not None:
        if main:  # once; the other processes read what it wrote
            precompute(mm, records + eval_records, cache, progress=progress)
        accelerator.wait_for_everyone()
    dataset = ExampleDataset(records, mm, cache)
    eval_set = ExampleDataset(eval_records, mm, cache) if eval_records else None
    processes = accelerator.num_processes
    total = stage.total_steps(len(dataset), processes)
    ga = stage.grad_accumulation

    optimizer = torch.optim.AdamW(plan.param_groups(stage.weight_decay), lr=stage.lr)
    scheduler = _scheduler(optimizer, stage, total)
    model = accelerator.prepare_model(mm, device_placement=mm.backbone.spec.device_map is None)
    optimizer = accelerator.prepare_optimizer(optimizer)
    params = [p for _, p, _ in plan.parameters]

    start, checkpoint = 0, None
    if resume and checkpoints(stage_dir):
        checkpoint = checkpoints(stage_dir)[-1]
        start = _restore(checkpoint, mm, stage, plan, total, optimizer, scheduler, accelerator)
        log_rows = [r for r in _read_log(stage_dir) if r["step"] <= start]
        if main:
            (stage_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        say(f"stage {stage.name}: resuming from {checkpoint.name} (step {start} of {total})")
    elif main:
        (stage_dir / LOG).write_text("")

    lengths = [record.approximate_length() for record in records] if stage.group_by_length else None
    sampler = _Batches(len(dataset), stage.batch_size, stage.seed, start * ga * processes, total * ga * processes,
                       lengths)
    # its own generator: creating the iterator draws a seed, which must not shift the global RNG
    # (dropout) between a resumed run and an uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=stage.loader_workers if cache is not None else 0,
                                         generator=torch.Generator().manual_seed(stage.seed))
    if processes > 1:
        loader = accelerator.prepare_data_loader(loader)
    batches = iter(loader)

    mm.train()
    bar = tqdm(total=total, initial=start, desc=f"stage {stage.name}", unit="step",
               disable=not progress or not main)
    try:
        window: list[tuple[float, float, float | None]] = []
        samples, t0 = 0, time.perf_counter()
        step, last_loss = start, None
        stop = total if stop_after is None else min(total, start + stop_after)
        while step < stop:
            for micro in range(ga):
                batch = next(batches)
                sync = micro == ga - 1
                with nullcontext() if sync or processes == 1 else accelerator.no_sync(model):
                    out = model(batch, alignment_weight=stage.alignment_weight)
                    accelerator.backward(out.loss / ga)
                window.append((out.loss.item(), out.text.item(),
                               None if out.alignment is None else out.alignment.item()))
                samples += len(batch)
            if stage.max_grad_norm:
                accelerator.clip_grad_norm_(params, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % stage.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t0
                aligned = [a for _, _, a in window if a is not None]
                row = {"step": step, "epoch": round(step * ga * processes * stage.batch_size / len(dataset), 4),
                       "loss": sum(w[0] for w in window) / len(window),
                       "text": sum(w[1] for w in window) / len(window),
                       "alignment": sum(aligned) / len(aligned) if aligned else None,
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": samples * processes / max(elapsed, 1e-9)}
                last_loss = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if main:
                    with open(stage_dir / LOG, "a") as fp:
                        fp.write(json.dumps(row) + "\n")
                window, samples, t0 = [], 0, time.perf_counter()
            if eval_set is not None and ((stage.eval_every and step % stage.eval_every == 0) or step == total):
                row = {"step": step, **eval_loss(mm, eval_set, stage.batch_size, stage.alignment_weight)}
                if main:
                    with open(stage_dir / LOG, "a") as fp:
                        fp.write(json.dumps(row) + "\n")
                say(f"stage {stage.name} step {step}: eval loss {row['eval_loss']:.4f}")
            if stage.checkpoint_every and step % stage.checkpoint_every == 0:
                _save_checkpoint(stage_dir, step, total, mm, stage, plan, optimizer, scheduler, accelerator)
                if main:
                    plot_losses(stage_dir, f"{stage.name}: {mm.profile.name}")
    finally:
        bar.close()
        plan.release()
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # give mm its own forward back
        mm.eval()

    weights = stage_dir / WEIGHTS
    backbone_dir = None
    result = StageResult(stage.name, stage_dir, weights, step, start if checkpoint else None, plan.counts,
                         stage_dir / LOG, stage_dir / PLOT, None, last_loss)
    if step < total:  # stopped early on request: no result, the checkpoints are what remains
        accelerator.wait_for_everyone()
        return result
    if main:
        mm.save_trained(weights)
        if stage.train.backbone == "full":
            backbone_dir = stage_dir / "backbone"
            model_ = mm.backbone.model
            model_.save_pretrained(backbone_dir)
            mm.backbone.tokenizer.save_pretrained(backbone_dir)
            result.backbone_dir = backbone_dir
        plot_losses(stage_dir, f"{stage.name}: {mm.profile.name}")
        (stage_dir / DONE).write_text(json.dumps({
            "steps": step, "final_loss": last_loss, "weights": str(weights),
            "backbone": str(backbone_dir) if backbone_dir else None,
            "counts": {k: list(v) for k, v in plan.counts.items()},
            "trainable": plan.trainable, "total": plan.total,
        }, indent=2))
    accelerator.wait_for_everyone()
    return result


def _save_checkpoint(stage_dir: Path, step: int, total: int, mm, stage: StageSpec, plan: StagePlan, optimizer,
                     scheduler, accelerator) -> Path:
    final = stage_dir / f"checkpoint-{step}"
    tmp = stage_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        mm.save_trained(tmp / WEIGHTS)
        if stage.train.backbone == "full":
            from safetensors.torch import save_model

            save_model(mm.backbone.model, str(tmp / "backbone.safetensors"))
        torch.save(_compact_optimizer_state(optimizer, plan), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "profile.json").write_text(mm.profile.model_dump_json(indent=2))
        (tmp / "stage.json").write_text(stage.model_dump_json(indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "total_steps": total, "processes": accelerator.num_processes,
            "micro_batches": step * stage.grad_accumulation * accelerator.num_processes,
        }))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if stage.keep_checkpoints:
            for old in checkpoints(stage_dir)[:-stage.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _restore(checkpoint: Path, mm, stage: StageSpec, plan: StagePlan, total: int, optimizer, scheduler,
             accelerator) -> int:
    state = json.loads((checkpoint / "state.json").read_text())
    saved = StageSpec.model_validate_json((checkpoint / "stage.json").read_text())
    for key in ("batch_size", "grad_accumulation", "steps", "epochs", "seed"):
        if getattr(saved, key) != getattr(stage, key):
            raise ConfigError(
                f"{checkpoint} was written with {key}={getattr(saved, key)!r}, but the stage now has "
                f"{getattr(stage, key)!r}; resuming would not continue the same run. Restore the setting "
                "or start afresh without resume"
            )
    if state["total_steps"] != total or state.get("processes", 1) != accelerator.num_processes:
        raise ConfigError(f"{checkpoint} belongs to a run of {state['total_steps']} steps on "
                          f"{state.get('processes', 1)} process(es); this one has {total} on "
                          f"{accelerator.num_processes}. Start afresh without resume")
    if (checkpoint / "backbone.safetensors").is_file():
        from safetensors.torch import load_model

        load_model(mm.backbone.model, str(checkpoint / "backbone.safetensors"), strict=False)
    load_trained(mm, checkpoint / WEIGHTS)
    saved_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(_expand_optimizer_state(saved_state, optimizer, plan))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rng = checkpoint / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])


# --- the whole run --------------------------------------------------------------------------------


def _stage_profile(profile, weights: Path | None, backbone_dir: Path | None, backbone_dtype: str):
    backbone = profile.backbone.model_copy(update={"dtype": backbone_dtype} if backbone_dtype != "auto" else {})
    if backbone_dir is not None:
        backbone = backbone.model_copy(update={"source": str(backbone_dir)})
    update = {"backbone": backbone}
    if weights is not None:
        update["projector_weights"] = str(weights)
    return profile.model_copy(update=update)


def _extends(profile: str) -> str:
    """A shipped profile's name, or a profile file's absolute path (a relative `extends` is read
    from the folder of the file that writes it)."""
    return str(Path(profile).expanduser().resolve()) if Path(profile).suffix else profile


def train(config: TrainConfig | str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Run the config's stages in order; each starts from the previous one's trained weights."""
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config)
    out = Path(config.out_dir).expanduser()
    profile = load_profile(config.profile)
    cache = FeatureCache(config.cache_dir or out / "feature-cache", profile) if config.cache_features else None
    weights = Path(profile.projector_weights) if profile.projector_weights else None
    weights = weights if weights is not None and weights.is_file() else None
    backbone_dir: Path | None = None
    previous = None
    results: dict[str, StageResult] = {}
    for stage in config.stages:
        stage_dir = out / stage.name
        done = stage_dir / DONE
        if overwrite and stage_dir.exists():
            shutil.rmtree(stage_dir)
        if resume and done.is_file():
            info = json.loads(done.read_text())
            weights = stage_dir / WEIGHTS
            backbone_dir = Path(info["backbone"]) if info.get("backbone") else backbone_dir
            results[stage.name] = StageResult(stage.name, stage_dir, weights, info["steps"], None,
                                              {k: tuple(v) for k, v in info["counts"].items()},
                                              stage_dir / LOG, stage_dir / PLOT, backbone_dir, info.get("final_loss"))
            if progress:
                print(f"stage {stage.name}: already done ({stage_dir}), skipped")
            continue
        if not resume and stage_dir.exists() and (done.is_file() or checkpoints(stage_dir)):
            raise ConfigError(f"{stage_dir} already holds a training run; resume it (resume=True / --resume), "
                              "overwrite it, or choose another out_dir")
        records = read_manifests(stage.data)
        eval_records = read_manifests(stage.eval_data) if stage.eval_data else []
        mm = MMLLM.from_profile(_stage_profile(profile, weights, backbone_dir, config.backbone_dtype),
                                require_trained=False)
        if previous is not None:  # frozen models are the same in every stage: load them once
            mm.encoders.update(previous.encoders)
            mm.generators.update(previous.generators)
        result = run_stage(mm, stage, stage_dir, records=records, eval_records=eval_records, cache=cache,
                           resume=resume, progress=progress)
        results[stage.name] = result
        weights = result.weights
        backbone_dir = result.backbone_dir or backbone_dir
        previous = mm
    final = out / WEIGHTS
    shutil.copyfile(weights, final)
    profile_file = out / "profile.yaml"
    lines = [f"# written by signalgraph train: the {profile.name!r} profile with the trained weights",
             f"extends: {json.dumps(_extends(config.profile))}", f"projector_weights: {WEIGHTS}"]
    if backbone_dir is not None:
        lines.append(f"backbone: {{source: {json.dumps(str(backbone_dir))}}}")
    profile_file.write_text("\n".join(lines) + "\n")
    return TrainResult(results, final, profile_file)


# --- evaluation -----------------------------------------------------------------------------------


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (the usual VQA/SQuAD normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answers_match(answer: str, expected: str, *, last_word: bool = False) -> bool:
    """Normalised exact match, of the whole answers or (`last_word`) of their last words."""
    said, wanted = normalise_answer(answer), normalise_answer(expected)
    return said.split()[-1:] == wanted.split()[-1:] if last_word else said == wanted


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    blind: bool
    predictions: list[dict] = field(default_factory=list)  # question, expected, answer, correct


def evaluate(mm, manifest: str | Path | list[Record], *, blind: bool = False, limit: int | None = None,
             max_new_tokens: int = 16, batch_size: int = 16, last_word: bool = False,
             progress: bool = True) -> EvalResult:
    """Exact-match accuracy of greedy answers to each line's last assistant turn (with `last_word`,
    of the answer's last word: for replies that say what they see before answering).

    The prompt is the conversation before that turn, with its media. `blind=True` drops the media
    and their placeholders: the text-only baseline (how far the questions alone get). Questions
    are answered `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    from models.backbone import PLACEHOLDERS

    records = manifest if isinstance(manifest, list) else read_manifest(manifest)
    records = records[:limit] if limit is not None else records
    was_training = mm.training
    mm.eval()
    correct, predictions = 0, []

    def request(record: Record) -> tuple[list[dict], dict]:
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        prompt = [dict(m) for m in record.messages[:last]]
        media: dict[str, list] = {}
        if blind:
            for m in prompt:
                for placeholder in PLACEHOLDERS.values():
                    m["content"] = m["content"].replace(placeholder + "\n", "").replace(placeholder, "")
        else:
            for modality, paths in record.media.items():
                if paths:
                    media[modality] = [load_media(modality, p, mm.profile, record.where) for p in paths]
        return prompt, media

    try:
        bar = tqdm(total=len(records), desc="evaluating" + (" (blind)" if blind else ""), disable=not progress)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            asked = [request(r) for r in chunk]
            outs = mm.generate_many(asked, max_new_tokens=max_new_tokens)
            for record, (prompt, _), out in zip(chunk, asked, outs, strict=True):
                answer = out.text.split(mm.backbone.tokenizer.eos_token or "\0")[0]
                expected = record.messages[len(prompt)]["content"]
                ok = answers_match(answer, expected, last_word=last_word)
                correct += ok
                question = prompt[-1]["content"] if prompt else ""
                predictions.append({"where": record.where, "question": question, "expected": expected,
                                    "answer": answer, "correct": ok})
            bar.update(len(chunk))
        bar.close()
    finally:
        mm.train(was_training)
    total = len(records)
    return EvalResult(correct / total if total else 0.0, correct, total, blind, predictions)


# --- throughput -----------------------------------------------------------------------------------


@dataclass
class Throughput:
    cached: float  # PT samples/s with features from the cache
    encoder_in_loop: float  # PT samples/s running the frozen encoder on every batch
    batch_size: int
    batches: int

    @property
    def ratio(self) -> float:
        return self.cached / self.encoder_in_loop


def pt_throughput(mm, records: list[Record], cache_dir: str | Path, *, batch_size: int = 8, batches: int = 3,
                  stage: StageSpec | None = None, progress: bool = False) -> Throughput:
    """PT training speed (data, forward, backward, optimizer step) with cached features and with
    the encoder in the loop, measured in one process on the same batches.

    The two ways alternate batch by batch (cached, live, cached, live, ...), so load from other
    processes on a shared machine falls on both alike; the first batch of each warms up. The PT
    projectors of `mm` are trained by these few steps: measure on a model you do not keep.
    """
    stage = stage or StageSpec(name="pt")
    inputs, outputs = _stage_modalities(records)
    plan = apply_stage(mm, stage, inputs=inputs, outputs=outputs)
    cache = FeatureCache(cache_dir, mm.profile)
    precompute(mm, records, cache, progress=progress)
    optimizer = torch.optim.AdamW(plan.param_groups(stage.weight_decay), lr=stage.lr)
    ways = {"cached": ExampleDataset(records, mm, cache), "live": ExampleDataset(records, mm, None)}
    elapsed = {way: 0.0 for way in ways}
    seen = {way: 0 for way in ways}
    mm.train()
    try:
        for k, indices in enumerate(_Batches(len(records), batch_size, stage.seed, 0, batches + 1)):
            for way, dataset in ways.items():
                t = time.perf_counter()
                batch = dataset.__getitems__(indices)
                out = mm(batch, alignment_weight=stage.alignment_weight)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if k:  # the first batch warms up
                    elapsed[way] += time.perf_counter() - t
                    seen[way] += len(batch)
    finally:
        plan.release()
        mm.eval()
    return Throughput(seen["cached"] / elapsed["cached"], seen["live"] / elapsed["live"], batch_size, batches)
