"""PT throughput: training steps with the frozen encoder's features from the cache, against the
same steps running the encoder on every batch, measured in one process on the same batches."""

from __future__ import annotations

import tempfile
from pathlib import Path


def pt_throughput_rows(profile_name: str = "local-untrained", *, batch_size: int = 16, batches: int = 4,
                       examples: int = 256) -> list[dict]:
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.data import easy_vqa_manifest, read_manifest
    from models.training.trainer import pt_throughput

    with tempfile.TemporaryDirectory(prefix="sg-pt-throughput-") as tmp:
        records = read_manifest(easy_vqa_manifest("train", Path(tmp), limit=examples))
        # a model of its own: the few measured steps train its projector
        mm = MMLLM.from_profile(load_profile(profile_name), require_trained=False)
        result = pt_throughput(mm, records, Path(tmp) / "cache", batch_size=batch_size, batches=batches)
    cached, live = round(result.cached, 2), round(result.encoder_in_loop, 2)
    return [{"benchmark": "PT throughput", "setting": f"{profile_name}, easy-vqa, batch {batch_size}",
             "value": cached, "unit": "samples/s, cached features", "baseline": live,
             "baseline_unit": "samples/s, encoder in the loop", "ratio": round(cached / live, 4), "batches": batches}]
