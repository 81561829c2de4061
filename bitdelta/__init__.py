"""bitdelta: many full-parameter fine-tunes of one LLM as 1-bit deltas over a shared base.

BitDelta (Liu et al. 2024, arXiv 2402.10193): delta = W_ft - W_base ~= scale * sign(delta).
"""

from bitdelta.apply import load, merge
from bitdelta.compress import compress
from bitdelta.delta import BinaryDelta
from bitdelta.distill import DistillConfig, distill
from bitdelta.errors import BitDeltaError
from bitdelta.fileformat import DeltaConfig, DeltaReader

__all__ = ["BinaryDelta", "BitDeltaError", "DeltaConfig", "DeltaReader", "DistillConfig", "compress", "distill", "load", "merge"]
__version__ = "0.1.0"
