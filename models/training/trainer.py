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

Checkpoints are in checkpoints.py, the loss plot in plots.py, evaluation (held-out loss, exact
match) in evaluation.py, the PT throughput measurement in throughput.py.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import ConfigError
from models.training.checkpoints import WEIGHTS, checkpoints, restore_checkpoint, save_checkpoint
from models.training.data import Record, read_manifests
from models.training.evaluation import eval_loss
from models.training.features import ExampleDataset, FeatureCache, collate, precompute
from models.training.plots import LOG, PLOT, plot_losses, read_log
from models.training.stages import StagePlan, StageSpec, TrainConfig, apply_stage

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


class Batches(torch.utils.data.Sampler):
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


def stage_modalities(records: list[Record]) -> tuple[list[str], list[str]]:
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
    inputs, outputs = stage_modalities(records + eval_records)
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
        start = restore_checkpoint(checkpoint, mm, stage, plan, total, optimizer, scheduler, accelerator)
        log_rows = [r for r in read_log(stage_dir) if r["step"] <= start]
        if main:
            (stage_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        say(f"stage {stage.name}: resuming from {checkpoint.name} (step {start} of {total})")
    elif main:
        (stage_dir / LOG).write_text("")

    lengths = [record.approximate_length() for record in records] if stage.group_by_length else None
    sampler = Batches(len(dataset), stage.batch_size, stage.seed, start * ga * processes, total * ga * processes,
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
                save_checkpoint(stage_dir, step, total, mm, stage, plan, optimizer, scheduler, accelerator)
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


