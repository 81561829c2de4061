"""bitdelta: many full-parameter fine-tunes of one LLM as 1-bit deltas over a shared base.

BitDelta (Liu et al. 2024, arXiv 2402.10193): delta = W_ft - W_base ~= scale * sign(delta).

The public API below loads on first use, so `import bitdelta` (and the `bitdelta` command's help)
does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from bitdelta.errors import BitDeltaError

if TYPE_CHECKING:
    from bitdelta.apply import load, merge
    from bitdelta.compress import compress
    from bitdelta.delta import BinaryDelta
    from bitdelta.distill import DistillConfig, distill
    from bitdelta.fileformat import DeltaConfig, DeltaReader

_API = {
    "load": "bitdelta.apply", "merge": "bitdelta.apply", "compress": "bitdelta.compress", "BinaryDelta": "bitdelta.delta",
    "DistillConfig": "bitdelta.distill", "distill": "bitdelta.distill", "DeltaConfig": "bitdelta.fileformat", "DeltaReader": "bitdelta.fileformat",
}
__all__ = ["BinaryDelta", "BitDeltaError", "DeltaConfig", "DeltaReader", "DistillConfig", "compress", "distill", "load", "merge"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """`bitdelta.compress` and `bitdelta.distill` are functions and submodules at once. Importing a
    submodule binds the package attribute to the module, so a plain module `__getattr__` would hand
    out the module once anything imported `bitdelta.compress`; every API name is resolved here instead."""

    def __getattribute__(self, name: str):
        if name in _API:
            return getattr(importlib.import_module(_API[name]), name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | _API.keys())


sys.modules[__name__].__class__ = _Package
