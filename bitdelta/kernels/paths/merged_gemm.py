"""MERGED_GEMM: long prefill segments: each slot's merged weights written once (the merge kernel,
`merged_gemm_triton.py`), then cuBLAS per segment.

Where every delta slot has hundreds of rows (a prompt), writing its merged matrix once and handing it
to cuBLAS beats every fused pass: the merge streams 3 bytes a weight once, while a fused kernel
re-expands the bits for every tile of rows and cannot keep up with cuBLAS's tensor-core schedule
(benchmarks/results/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitdelta.kernels.base_product import base_product
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import Problem, next_pow2

MIN_ROWS = 512  # every delta segment this long: merged weights once, then cuBLAS


@dataclass(frozen=True)
class MergedGemmTiles:
    """The merge kernel's tile, block_n x block_k weights a program (block_k a power of two)."""

    block_n: int
    block_k: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.block_k % 32 or next_pow2(self.block_k) != self.block_k:
            raise ValueError("the merge kernel's block_k must be a power of two >= 32 (whole packed words)")


def can_run(problem: Problem) -> bool:
    # rows of several deltas must first be gathered into slot order and scattered back unless they
    # come grouped (whole prompts in order): twice the rows a slot before that pays
    gathered = not (problem.few_deltas or problem.plan.in_order)
    return problem.plan.min_delta_rows >= MIN_ROWS * (2 if gathered else 1)


def tiles(problem: Problem) -> MergedGemmTiles:
    return MergedGemmTiles(block_n=32, block_k=256, num_warps=4)


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: MergedGemmTiles, y: torch.Tensor) -> torch.Tensor:
    """y = x @ W'[slot].T + bias segment by segment, W' merged once per slot per call (one scratch
    matrix, reused); slot -1 rows take the base weight itself (a quantized one: `base_product`). Each segment's product is written into
    its slice of y; rows not already grouped by slot are gathered into slot order first and
    scattered back at the end."""
    from bitdelta.kernels.paths import merged_gemm_triton

    if isinstance(base_weight, torch.Tensor) and base_weight.stride(1) != 1:  # once, not per slot
        base_weight = base_weight.contiguous()
    order = None if plan.in_order else plan.order.long()
    x_sorted = x if plan.in_order else x.index_select(0, order)
    y_sorted = y if plan.in_order else torch.empty_like(y)
    scratch = None
    start = 0
    for slot, count in zip(plan.host_slots, plan.counts):
        rows = slice(start, start + count)
        start += count
        if slot < 0 and not isinstance(base_weight, torch.Tensor):
            y_sorted[rows] = base_product(x_sorted[rows], base_weight, x.dtype, bias)
            continue
        if slot < 0:
            weight = base_weight
        else:
            scratch = merged_gemm_triton.merge_weight(base_weight, signs, scales, slot, tiles, out=scratch, dtype=x.dtype)
            weight = scratch
        if bias is None:
            torch.mm(x_sorted[rows], weight.t(), out=y_sorted[rows])
        else:
            torch.addmm(bias, x_sorted[rows], weight.t(), out=y_sorted[rows])
    if not plan.in_order:
        y.index_copy_(0, order, y_sorted)
    return y
