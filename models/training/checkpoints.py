"""Checkpoints of a training stage: what trains, the optimizer (only the parameters that train),
the scheduler and every RNG, so `--resume` continues exactly; and loading trained weights back."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from models.errors import ConfigError
from models.training.stages import StagePlan, StageSpec

WEIGHTS = "trained.safetensors"  # what a stage or a checkpoint trained


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


def save_checkpoint(stage_dir: Path, step: int, total: int, mm, stage: StageSpec, plan: StagePlan, optimizer,
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


def restore_checkpoint(checkpoint: Path, mm, stage: StageSpec, plan: StagePlan, total: int, optimizer, scheduler,
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
