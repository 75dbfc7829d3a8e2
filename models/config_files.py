"""Reading YAML config files: one mapping per file, and pydantic errors as one readable line."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from models.errors import ConfigError


def read_mapping(path: Path, what: str) -> dict:
    """The YAML mapping in `path`; `what` names its expected contents for the error message."""
    if not path.is_file():
        raise ConfigError(f"the {what} file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping ({what})")
    return data


def problems(exc: ValidationError) -> str:
    """`field.path: message; ...` for every problem pydantic found."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
