"""Profiles: named sets of component specs, kept as YAML beside this file.

A user's own profile is a YAML file too; `extends: local` starts from a shipped profile and
overrides only what it names (mappings merge, everything else replaces).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from models.config_files import problems, read_mapping
from models.errors import ConfigError
from models.specs import ProfileSpec

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "local"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _paths_from(data: dict, folder: Path) -> dict:
    """Relative paths in a profile are relative to the file that writes them (as `extends` is), so
    a profile that extends another keeps pointing at the other's files: `projector_weights`, and
    component sources written as ./ or ../ paths (a bare `org/name` is a hub id)."""
    weights = data.get("projector_weights")
    if isinstance(weights, str) and not Path(weights).expanduser().is_absolute():
        data["projector_weights"] = os.path.normpath(folder / weights)
    for value in data.values():
        source = value.get("source") if isinstance(value, dict) else None
        if isinstance(source, str) and source.startswith(("./", "../")):
            value["source"] = os.path.normpath(folder / source)
    return data


def _read(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, Path]:
    path = Path(name_or_path).expanduser()
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"no profile is called {name_or_path!r}; shipped profiles: "
                              f"{', '.join(profile_names())}, or give a path to a YAML file")
    if str(path) in seen:
        raise ConfigError(f"profile {path} extends itself through {' -> '.join(seen)}")
    data = _paths_from(read_mapping(path, "profile: component specs"), path.parent)
    parent = data.pop("extends", None)
    if parent:
        if Path(str(parent)).suffix and not Path(str(parent)).expanduser().is_absolute():
            parent = os.path.normpath(path.parent / str(parent))
        base, _ = _read(str(parent), (*seen, str(path)))
        data = _merge(base, data)
    return data, path


def load_profile(name_or_path: str | None = None) -> ProfileSpec:
    """Load a shipped profile by name or a YAML file by path; $SIGNALGRAPH_PROFILE is the default."""
    name_or_path = name_or_path or os.environ.get("SIGNALGRAPH_PROFILE") or DEFAULT_PROFILE
    data, path = _read(name_or_path)
    data.setdefault("name", path.stem)
    try:
        return ProfileSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"profile {str(path)!r} is invalid: {problems(exc)}") from None


def components(profile: ProfileSpec) -> list[tuple[str, str]]:
    """(role, source) for every model the profile names, in the order of the survey's pipeline."""
    roles = [
        ("image encoder", profile.image_encoder),
        ("audio encoder", profile.audio_encoder),
        ("backbone", profile.backbone),
        ("image generator", profile.image_generator),
        ("audio generator", profile.audio_generator),
        ("speech to text", profile.transcriber),
        ("text to speech", profile.speech),
        ("embeddings", profile.embedder),
    ]
    listed = [(role, spec.source) for role, spec in roles if spec is not None]
    listed += [("also prepared", source) for source in profile.also_prepare]
    return listed


def check_ready(profile: ProfileSpec) -> None:
    """Fail at once, naming every missing model, rather than deep inside a library later."""
    from models.assets import status

    missing = []
    for role, source in components(profile):
        if role == "also prepared":
            continue
        state = status(source)
        if not state.ready and state.kind in ("hub", "local"):
            missing.append(f"  {role}: {source} ({state.detail})")
    if missing:
        from models.errors import AssetMissingError

        raise AssetMissingError(f"profile {profile.name!r} needs models that are not here:\n" + "\n".join(missing))
