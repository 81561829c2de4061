"""GEMV: a batch of at most MAX_ROWS rows, base and delta fused on the CUDA cores.

One program per column block takes the whole batch: it streams its base columns and their bits once
and builds w' = w + scale * sign in fp32 for each row (once for all rows when they share a slot).
With so few rows the tensor-core paths leave most of each mma empty, so this path wins on most
shapes; `tiles` keeps it where it measured fastest (benchmarks/results/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitdelta.kernels.base_product import GROUP_SCALED, PLAIN, stored
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import Problem, Tiles, next_pow2

MAX_ROWS = 4
INT4_MAX_N = 8192  # over an int4 base, wider layers go to the tensor-core paths


@dataclass(frozen=True)
class GemvTiles(Tiles):
    """rows: 1, 2 or 4 (the kernel unrolls them by hand), at least the batch's rows. block_k should be
    256 x num_warps: the x load then takes the W tile's layout (warps along K)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rows not in (1, 2, 4):
            raise ValueError("the gemv takes 1, 2 or 4 rows a program")


def can_run(problem: Problem) -> bool:
    return tiles(problem) is not None


def tiles(problem: Problem) -> GemvTiles | None:
    """The gemv's tiles where it is the fastest path, else None."""
    plan, n, k = problem.plan, problem.n, problem.k
    m = plan.num_rows
    if not 1 <= m <= MAX_ROWS or problem.stored_product_first:
        return None
    if problem.base_form == GROUP_SCALED and n > INT4_MAX_N:
        # unpacking nibbles on the CUDA cores costs more than the narrow column blocks gain on wide
        # layers: 268 / 62 us at 1 row where MERGED_TILES takes 172 / 44 (8192x28672 / 4096x11008, H100)
        return None
    one_slot = len(plan.host_slots) == 1
    stages = 1
    if m == 1:
        # a narrow layer's long rows, or its rows over a quantized base: MERGED_TILES with K split fills more
        # SMs (over the base as stored 1.14-1.29x faster on 4096x4096, quantized_base.md "each path")
        if n <= 4096 and (k > 8192 or problem.base_form != PLAIN):
            return None
        if k > 8192:  # long rows: deep K steps
            bn, bk, warps = 16, 1024, 4
        elif n > 8192:  # wide layers: narrow column blocks, the K loop pipelined
            bn, bk, warps, stages = 4, 512, 2, 3
        else:
            bn, bk, warps = 8, 512, 2
    elif one_slot and n > 16384:  # one slot on a wide layer: narrow column blocks, the K loop pipelined
        bn, bk, warps, stages = 4, 512, 2, 3
    elif not one_slot and n <= 4096 and k <= 8192 and m < MAX_ROWS:  # 2-3 rows of several slots, small layers
        bn, bk, warps = 4, 512, 2
    else:  # the tensor-core paths are faster
        return None
    return GemvTiles(rows=next_pow2(m), block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: GemvTiles, y: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > tiles.rows:
        raise ValueError(f"the gemv takes the whole batch in one program: {x.shape[0]} rows > rows={tiles.rows}")
    from bitdelta.kernels.paths.gemv_triton import gemv

    return gemv(x, stored(base_weight), signs, scales, plan, bias, tiles, y)
