"""A disk cache of what frozen models compute, so training epochs never re-run them.

Encoders are frozen in every stage, so an image's features depend only on the encoder and the
image's bytes. They are computed once per (encoder spec, file content hash) and stored as one
safetensors file each, under `cache_dir/<modality>-<encoder key>/<ab>/<sha256>.safetensors`.
The alignment targets (a generator's own text conditioning of a caption) are cached the same
way, per (generator spec, caption). The keys hold the spec and the dtype the model runs in, not
the device; replace a model's weights behind the same source and you should clear the cache.

`precompute(mm, records, cache_dir)` fills the cache with a progress bar; `ExampleDataset` yields
`Example`s from it, or runs the encoder live (batched per DataLoader batch) where there is no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.device import resolve_device, resolve_dtype
from models.errors import MediaError
from models.mmllm import Example
from models.training.data import DatasetError, Record, tokenize


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureCache:
    """Encoder features per (encoder, media content) and generator targets per (generator, caption)."""

    def __init__(self, root: str | Path, profile) -> None:
        self.root = Path(root).expanduser()
        self.profile = profile
        self._hashes: dict[Path, tuple[int, int, str]] = {}
        self.hits = 0
        self.misses = 0

    # --- keys ---------------------------------------------------------------------------------

    def _spec_key(self, spec, extra: dict | None = None) -> str:
        data = spec.model_dump(exclude={"device", "dtype"})
        data["dtype"] = str(resolve_dtype(spec.dtype, resolve_device(spec.device)))
        data |= extra or {}
        return _digest(json.dumps(data, sort_keys=True))[:16]

    def encoder_key(self, modality: str) -> str:
        if modality in ("image", "video"):
            spec = self.profile.image_encoder
            extra = {"frames": self.profile.video.frames} if modality == "video" else None
        else:
            spec = self.profile.audio_encoder
            extra = None
        if spec is None:
            raise DatasetError(f"the profile {self.profile.name!r} has no encoder for {modality}")
        return f"{modality}-{self._spec_key(spec, extra)}"

    def generator_key(self, modality: str) -> str:
        spec = self.profile.image_generator if modality == "image" else self.profile.audio_generator
        if spec is None:
            raise DatasetError(f"the profile {self.profile.name!r} has no {modality} generator for its captions")
        return f"target-{modality}-{self._spec_key(spec)}"

    def content_hash(self, path: Path) -> str:
        stat = path.stat()
        known = self._hashes.get(path)
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        h = hashlib.sha256()
        with open(path, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        self._hashes[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest

    def feature_file(self, modality: str, path: Path) -> Path:
        digest = self.content_hash(path)
        return self.root / self.encoder_key(modality) / digest[:2] / f"{digest}.safetensors"

    def target_file(self, modality: str, caption: str) -> Path:
        digest = _digest(caption)
        return self.root / self.generator_key(modality) / digest[:2] / f"{digest}.safetensors"

    # --- reading and writing ------------------------------------------------------------------

    @staticmethod
    def _save(file: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, file)  # atomic: a reader never sees half a file

    @staticmethod
    def _load(file: Path) -> dict[str, torch.Tensor] | None:
        if not file.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception:  # a damaged cache entry is recomputed, not fatal
            return None

    def get_features(self, modality: str, path: Path) -> torch.Tensor | None:
        found = self._load(self.feature_file(modality, path))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return found["features"]

    def put_features(self, modality: str, path: Path, features: torch.Tensor) -> None:
        self._save(self.feature_file(modality, path), {"features": features})

    def get_target(self, modality: str, caption: str) -> dict[str, torch.Tensor] | None:
        return self._load(self.target_file(modality, caption))

    def put_target(self, modality: str, caption: str, target: dict[str, torch.Tensor]) -> None:
        self._save(self.target_file(modality, caption), target)


# --- live computation -----------------------------------------------------------------------------


def load_media(modality: str, path: Path, profile, where: str = ""):
    """The decoded input an encoder takes, with the profile's limits; errors name the manifest line."""
    from models import media

    try:
        if modality == "image":
            return media.load_image(path, profile.limits)
        if modality == "audio":
            return media.load_audio(path, profile.limits)
        return media.load_video_frames(path, profile.limits, frames=profile.video.frames)
    except MediaError as exc:
        raise DatasetError(f"{where}: {exc}" if where else str(exc)) from None


def encode_files(mm, modality: str, items: list[tuple[Path, str]]) -> list[torch.Tensor]:
    """Encoder features of files ((path, where) pairs), in one encoder batch."""
    decoded = [load_media(modality, path, mm.profile, where) for path, where in items]
    return mm.encode(modality, decoded)


def text_targets(mm, modality: str, captions: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per caption, the generator's own conditioning (only the tensors the output projector predicts)."""
    generator = mm.generator(modality)
    names = generator.conditioning_shapes()
    batch = generator.text_conditioning(captions)
    return [{k: batch[k][i].detach().float().cpu() for k in names} for i in range(len(captions))]


@dataclass
class PrecomputeStats:
    computed: int = 0
    cached: int = 0
    targets_computed: int = 0
    targets_cached: int = 0


def precompute(mm, records: list[Record], cache: FeatureCache | str | Path, *, batch_size: int = 16,
               progress: bool = True) -> PrecomputeStats:
    """Encode every media file and caption target of `records` that the cache lacks, once."""
    from tqdm.auto import tqdm

    if not isinstance(cache, FeatureCache):
        cache = FeatureCache(cache, mm.profile)
    stats = PrecomputeStats()
    media: dict[tuple[str, Path], str] = {}
    captions: dict[tuple[str, str], str] = {}
    for record in records:
        for modality, paths in record.media.items():
            for path in paths:
                media.setdefault((modality, path), record.where)
        for modality, texts in record.captions.items():
            for text in texts:
                captions.setdefault((modality, text), record.where)
    todo: dict[str, list[tuple[Path, str]]] = {}
    for (modality, path), where in media.items():
        try:
            present = cache.feature_file(modality, path).is_file()
        except OSError as exc:
            raise DatasetError(f"{where}: cannot read {path} ({exc})") from None
        if present:
            stats.cached += 1
        else:
            todo.setdefault(modality, []).append((path, where))
    targets: dict[str, list[str]] = {}
    for (modality, text), _ in captions.items():
        if cache.target_file(modality, text).is_file():
            stats.targets_cached += 1
        else:
            targets.setdefault(modality, []).append(text)
    total = sum(map(len, todo.values())) + sum(map(len, targets.values()))
    with tqdm(total=total, desc="caching frozen features", unit="item", disable=not progress or not total) as bar:
        for modality, items in todo.items():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                for (path, _), features in zip(chunk, encode_files(mm, modality, chunk)):
                    cache.put_features(modality, path, features)
                stats.computed += len(chunk)
                bar.update(len(chunk))
        for modality, texts in targets.items():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                for text, target in zip(chunk, text_targets(mm, modality, chunk)):
                    cache.put_target(modality, text, target)
                stats.targets_computed += len(chunk)
                bar.update(len(chunk))
    return stats


class ExampleDataset(torch.utils.data.Dataset):
    """Tokenized `Example`s with encoder features: from the cache, or computed live per batch.

    With a cache, a miss is computed and stored, so a first epoch fills what `precompute` did not.
    Without one (`cache=None`) the encoder runs for every batch: the baseline the cache is
    measured against. `targets=False` leaves out the alignment targets.
    """

    def __init__(self, records: list[Record], mm, cache: FeatureCache | None = None, *, targets: bool = True):
        self.records = records
        self.mm = mm
        self.cache = cache
        self.targets = targets

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Example]:
        records = [self.records[i] for i in indices]
        examples = []
        for record in records:
            ids, labels = tokenize(record, self.mm.backbone)
            examples.append(Example(list(ids), list(labels)))
        # features: cached ones, then one encoder batch per modality for the rest
        missing: dict[str, list[tuple[int, int, Path, str]]] = {}
        for row, record in enumerate(records):
            for modality, paths in record.media.items():
                if not paths:
                    continue
                slots = examples[row].features.setdefault(modality, [None] * len(paths))
                for k, path in enumerate(paths):
                    found = self.cache.get_features(modality, path) if self.cache else None
                    if found is None:
                        missing.setdefault(modality, []).append((row, k, path, record.where))
                    else:
                        slots[k] = found
        for modality, items in missing.items():
            features = encode_files(self.mm, modality, [(path, where) for _, _, path, where in items])
            for (row, k, path, _), feats in zip(items, features):
                examples[row].features[modality][k] = feats
                if self.cache:
                    self.cache.put_features(modality, path, feats)
        if self.targets:
            self._add_targets(records, examples)
        return examples

    def _add_targets(self, records: list[Record], examples: list[Example]) -> None:
        wanted: dict[str, list[tuple[int, int, str]]] = {}
        for row, record in enumerate(records):
            for modality, texts in record.captions.items():
                slots = examples[row].targets.setdefault(modality, [None] * len(texts))
                for k, text in enumerate(texts):
                    found = self.cache.get_target(modality, text) if self.cache else None
                    if found is None:
                        wanted.setdefault(modality, []).append((row, k, text))
                    else:
                        slots[k] = found
        for modality, items in wanted.items():
            computed = text_targets(self.mm, modality, [text for _, _, text in items])
            for (row, k, text), target in zip(items, computed):
                examples[row].targets[modality][k] = target
                if self.cache:
                    self.cache.put_target(modality, text, target)


def collate(examples: list[Example]) -> list[Example]:
    """The model takes a list of Examples; padding happens in `Backbone.collate`."""
    return examples
