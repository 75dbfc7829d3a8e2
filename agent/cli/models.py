"""`signalgraph models` and `signalgraph models prepare`."""

from __future__ import annotations

from models.assets import resolve, status
from models.errors import AssetError
from models.profiles import components, load_profile


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _projector_lines(profile) -> list[str]:
    from pathlib import Path

    lines = []
    projectors = [("input projector", m) for m in profile.input_projectors]
    projectors += [("output projector", m) for m in profile.output_projectors]
    weights = Path(profile.projector_weights) if profile.projector_weights else None
    trained = weights is not None and weights.exists()
    for role, modality in projectors:
        state = f"trained ({weights})" if trained else "untrained: run `signalgraph train` to make them"
        lines.append(f"  {role + ' (' + modality + ')':<26} {'':>9}  {state}")
    return lines


def list_models(profile_name: str | None) -> int:
    profile = load_profile(profile_name)
    print(f"profile {profile.name}: {profile.description}")
    print(f"  {'role':<16} {'source':<40} {'size':>9}  status")
    for role, source in components(profile):
        state = status(source)
        ready = f"ready ({state.origin})" if state.ready else f"not ready: {state.detail}"
        print(f"  {role:<16} {source:<40} {_size(state.size_bytes):>9}  {ready}")
    for line in _projector_lines(profile):
        print(line)
    return 0


def prepare_models(profile_name: str | None, *, download: bool) -> int:
    profile = load_profile(profile_name)
    failures = []
    for role, source in components(profile):
        try:
            path = resolve(source, allow_download=download)
        except AssetError as exc:
            failures.append(f"{role} ({source}): {exc}")
            print(f"  {role:<16} {source:<36} FAILED")
            continue
        print(f"  {role:<16} {source:<36} ready: {path}")
    if failures:
        print("some models are not ready:\n  " + "\n  ".join(failures))
        return 1
    return 0


def models(args) -> int:
    if args.action == "prepare":
        return prepare_models(args.profile, download=args.download)
    return list_models(args.profile)
