"""BinaryDelta: one matrix's fine-tuning delta as packed signs and scale(s) (BitDelta, eq. 1-2).

    W_ft - W_base  ~=  scale * sign(W_ft - W_base)

For a fixed sign matrix the L2-optimal scale is mean(|delta|): over the whole matrix (the paper),
or over each output row (`granularity="row"`, N scales instead of one, still negligible storage).

A stacked tensor [E, N, K] (a mixture-of-experts layer's experts in one tensor) is E matrices: each
gets its own scale(s), so the scale is [E, 1] or [E, N] and the signs [E, N, ceil(K/32)].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bitdelta.pack import pack_signs, packed_words, unpack_signs

Granularity = Literal["matrix", "row"]
GRANULARITIES = ("matrix", "row")
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class BinaryDelta:
    signs: torch.Tensor  # int32 [..., N, ceil(K/32)], layout in bitdelta.pack
    scale: torch.Tensor  # fp32 [..., 1] (matrix) or [..., N] (row); a 2-D delta's is [1] or [N]
    shape: tuple[int, ...]  # (..., N, K)

    @classmethod
    def from_weights(cls, base: torch.Tensor, finetuned: torch.Tensor, granularity: Granularity = "matrix") -> BinaryDelta:
        *stack, n, k = finetuned.shape
        rows, base_rows = finetuned.flatten(0, -2), base.flatten(0, -2)  # the matrices' rows, one after another
        signs = torch.empty(rows.shape[0], packed_words(k), dtype=torch.int32)
        row_means = torch.empty(rows.shape[0], dtype=torch.float64)
        # A few MB of rows at a time: a whole fp32 delta of a 28672 x 8192 matrix would be 0.9 GB,
        # and large temporaries freed between small kept tensors fragment the heap.
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, rows.shape[0], step):
            delta = rows[start : start + step].float() - base_rows[start : start + step].float()
            row_means[start : start + step] = delta.abs().sum(dim=1, dtype=torch.float64) / k
            signs[start : start + step] = pack_signs(delta)
        row_means = row_means.reshape(*stack, n)
        scale = row_means.mean(dim=-1, keepdim=True) if granularity == "matrix" else row_means
        return cls(signs.reshape(*stack, n, -1), scale.float(), tuple(finetuned.shape))

    def to_dense(self) -> torch.Tensor:
        """The approximated delta, fp32 [..., N, K]."""
        signs = unpack_signs(self.signs, self.shape[-1], torch.float32)
        return signs * self.scale.float().unsqueeze(-1)

    def apply(self, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_base + scale * sign, computed in fp32 and returned in `dtype` (default: base's)."""
        return (base.float() + self.to_dense()).to(dtype or base.dtype)

    def matrices(self) -> list[BinaryDelta]:
        """The 2-D deltas of a stacked one, in order (a 2-D delta: itself)."""
        if len(self.shape) == 2:
            return [self]
        return [BinaryDelta(signs, scale, self.shape[-2:]) for signs, scale in zip(self.signs.flatten(0, -3), self.scale.flatten(0, -2))]

    def row_scales(self) -> torch.Tensor:
        """The scale of every output row, fp32 [..., N]: what the kernels take."""
        return self.scale.float().expand(*self.shape[:-1]).contiguous()
