"""The experts' delta matmul of a mixture-of-experts block: every (row, expert) pair of a step in
one launch, with no read of the routing on the host.

A pair p is a row routed to expert e_p, served by delta slot t_p (its fine-tune's; -1 = base only):

    y_p = x_p @ W[e_p].T + scale[e_p, t_p] * (x_p @ sign[e_p, t_p].T)

The pairs are sorted by (expert, slot) on the device: a segment is one expert's pairs of one slot.
The Triton kernel (`experts_triton.py`) runs a program per (expert, column block) that walks its
expert's segments, each over all of K with the merged weights W + scale * sign built in registers
(the merged-tiles form, `paths/segment_triton.py`). An expert's base columns are read from DRAM by
its first segment and from L2 by the others, and each segment reads its slot's bits once: one read
of every routed expert's base and of every distinct (expert, delta) pair a step. Experts no pair
routes to exit at once. Nothing depends on the host, so a decode step with MoE blocks replays as a
CUDA graph. The CPU, and a quantized base the kernels do not read as stored, take the per-expert
loop (`bitdelta_matmul` once per routed expert, the rows grouped on the host).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bitdelta.kernels import bitdelta_matmul, on_triton
from bitdelta.kernels.base_product import reads_as_stored


def grouped(x: torch.Tensor, base_weights) -> bool:
    """Whether `expert_matmul` takes these operands in one launch (else the per-expert loop)."""
    return on_triton(x) and (isinstance(base_weights, torch.Tensor) or reads_as_stored(base_weights))


@dataclass(frozen=True)
class ExpertPairs:
    """A step's (row, expert) pairs: each pair's expert and delta slot (-1 = base only), of
    `num_experts` experts and `num_slots` slots. A block's products share one, so the pairs are
    grouped once a step."""

    experts: torch.Tensor  # int [P]
    slots: torch.Tensor  # int [P]
    num_experts: int
    num_slots: int

    @functools.cached_property
    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, starts, sizes), int32, built on the device: the pairs sorted by (expert, slot), and
        each (expert, slot) segment's first position in that order and its pair count, [E * (S + 1)]
        (an expert's slot -1 first)."""
        keys = self.experts.long() * (self.num_slots + 1) + self.slots.long() + 1
        sizes = torch.zeros(self.num_experts * (self.num_slots + 1), dtype=torch.int32, device=keys.device)
        sizes.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
        starts = torch.cumsum(sizes, 0, dtype=torch.int32) - sizes
        return torch.argsort(keys, stable=True).to(torch.int32), starts, sizes


def expert_matmul(x: torch.Tensor, base_weights, signs: torch.Tensor, scales: torch.Tensor, pairs: ExpertPairs) -> torch.Tensor:
    """y [P, N] in x's dtype (`reference.expert_matmul`) for x [P, K]; base_weights [E, N, K], or a
    quantized base (bitdelta.quant.QuantizedWeight) holding the experts' rows as [E * N, K]; signs
    int32 [E, S, N, ceil(K/32)], scales fp32 [E, S, N]."""
    n = signs.shape[2]
    if grouped(x, base_weights):
        from bitdelta.kernels.experts_triton import grouped_expert_matmul

        return grouped_expert_matmul(x, base_weights, signs, scales, *pairs.segments)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    order = torch.sort(pairs.experts, stable=True).indices
    start = 0
    for expert, size in enumerate(torch.bincount(pairs.experts, minlength=pairs.num_experts).tolist()):  # host sync
        if size:
            rows = order[start : start + size]
            start += size
            y[rows] = bitdelta_matmul(x.index_select(0, rows), _expert_base(base_weights, expert, n),
                                      signs[expert], scales[expert], pairs.slots.index_select(0, rows))
    return y


def _expert_base(base_weights, expert: int, n: int):
    if isinstance(base_weights, torch.Tensor):
        return base_weights[expert]
    return base_weights.rows(slice(expert * n, (expert + 1) * n))
