"""The server's settings and the rule for which folders it serves deltas from (no FastAPI, no
torch: the serve command's defaults and the Ray deployments read them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bitdelta.errors import BitDeltaError, UnknownModelError

DELTA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_MAX_BODY_MB = 4.0
@dataclass(frozen=True)
class ServerSettings:
    deltas_dir: Path | None = None  # where POST /v1/deltas may load from (by folder name only)
    api_key: str | None = None  # guards every endpoint but /health
    admin_key: str | None = None  # guards /v1/deltas; defaults to api_key
    max_body_mb: float = DEFAULT_MAX_BODY_MB  # larger request bodies get 413 before they are read


def valid_delta_name(name: str) -> bool:
    return bool(DELTA_NAME.fullmatch(name)) and ".." not in name


def delta_folder(deltas_dir: Path, name: str) -> Path:
    """The folder `name` of the deltas directory, by the one rule both startup and POST /v1/deltas
    apply: a valid name, a directory, and (symlinks resolved) inside the deltas directory. A delta
    kept elsewhere is served only when the operator names its path (`--delta NAME=PATH`)."""
    if not valid_delta_name(name):
        raise BitDeltaError(f"{name!r} is not a valid model name (letters, digits, . _ -; not a path)")
    root = Path(deltas_dir).resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise BitDeltaError(f"{name!r} leads outside the deltas directory (a symlink?); serve it with --delta {name}=PATH")
    if not folder.is_dir():
        raise UnknownModelError(f"the deltas directory has no delta named {name!r}")
    return folder
