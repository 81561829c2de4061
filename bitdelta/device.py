"""Which torch device a command runs on (`auto`, `cpu`, `cuda` or `cuda:N`), and the dtypes a command
may name: shared by the offline commands and the engine, which must not import each other."""

from __future__ import annotations

import torch

from bitdelta.errors import BitDeltaError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when one is visible, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BitDeltaError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BitDeltaError(f"unknown device {name!r}; use auto, cpu or cuda") from None
