"""Tiny, randomly initialised models of the real classes, built in code in seconds.

Each builder writes a folder through the real `save_pretrained` (or the library's own file
format), so loading it exercises the same `from_pretrained` path as real weights, the way
transformers and diffusers test themselves. Seeds are fixed: the same name gives the same weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_BUILDERS = {
    "llama": "models.tiny.text:build_llama",
    "qwen2": "models.tiny.text:build_qwen2",
    "clip-vision": "models.tiny.vision:build_clip_vision",
    "whisper-pt": "models.tiny.speech:build_openai_whisper",
    "whisper-hf": "models.tiny.speech:build_hf_whisper",
    "stable-diffusion": "models.tiny.diffusion:build_stable_diffusion",
    "audioldm2": "models.tiny.diffusion:build_audioldm2",
}


def tiny_names() -> list[str]:
    return sorted(_BUILDERS)


def build_tiny(name: str, dest: Path) -> None:
    module, function = _BUILDERS[name].split(":")
    getattr(importlib.import_module(module), function)(Path(dest))
