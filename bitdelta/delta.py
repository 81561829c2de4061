"""BinaryDelta: one matrix's fine-tuning delta as packed signs and scale(s) (BitDelta, eq. 1-2).

    W_ft - W_base  ~=  scale * sign(W_ft - W_base)

For a fixed sign matrix the L2-optimal scale is mean(|delta|): over the whole matrix (the paper),
or over each output row (`granularity="row"`, N scales instead of one, still negligible storage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bitdelta.pack import pack_signs, unpack_signs

Granularity = Literal["matrix", "row"]
GRANULARITIES = ("matrix", "row")


@dataclass(frozen=True)
class BinaryDelta:
    signs: torch.Tensor  # int32 [N, ceil(K/32)], layout in bitdelta.pack
    scale: torch.Tensor  # fp32 [1] (matrix) or [N] (row)
    shape: tuple[int, int]  # (N, K)

    @classmethod
    def from_weights(cls, base: torch.Tensor, finetuned: torch.Tensor, granularity: Granularity = "matrix") -> BinaryDelta:
        delta = finetuned.float() - base.float()
        magnitude = delta.abs()
        scale = magnitude.mean().reshape(1) if granularity == "matrix" else magnitude.mean(dim=1)
        return cls(pack_signs(delta), scale, tuple(delta.shape))

    def to_dense(self) -> torch.Tensor:
        """The approximated delta, fp32 [N, K]."""
        signs = unpack_signs(self.signs, self.shape[1], torch.float32)
        return signs * self.scale.float().reshape(-1, 1)

    def apply(self, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_base + scale * sign, computed in fp32 and returned in `dtype` (default: base's)."""
        return (base.float() + self.to_dense()).to(dtype or base.dtype)

    def row_scales(self) -> torch.Tensor:
        """The scale of every output row, fp32 [N]: what the kernels take."""
        return self.scale.float().expand(self.shape[0]).contiguous()
