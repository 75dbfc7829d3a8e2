"""PT steps per second with cached features against the encoder in the loop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.training.data import Record
from models.training.features import ExampleDataset, FeatureCache, precompute
from models.training.stages import StageSpec, apply_stage
from models.training.trainer import Batches, stage_modalities


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
    inputs, outputs = stage_modalities(records)
    plan = apply_stage(mm, stage, inputs=inputs, outputs=outputs)
    cache = FeatureCache(cache_dir, mm.profile)
    precompute(mm, records, cache, progress=progress)
    optimizer = torch.optim.AdamW(plan.param_groups(stage.weight_decay), lr=stage.lr)
    ways = {"cached": ExampleDataset(records, mm, cache), "live": ExampleDataset(records, mm, None)}
    elapsed = {way: 0.0 for way in ways}
    seen = {way: 0 for way in ways}
    mm.train()
    try:
        for k, indices in enumerate(Batches(len(records), batch_size, stage.seed, 0, batches + 1)):
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
