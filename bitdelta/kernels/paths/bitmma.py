"""BITMMA: several distinct deltas, up to BITMMA_MAX_ROWS rows a slot (over a quantized base also few deltas
on wide layers: `Problem.stored_product_first`): the base product in fp32 (`base_product`), then the
Gluon tensor-core delta kernel (`bitmma_gluon.py`) adds each tile's delta, its slot's bits
expanded straight into mma operands; tiles of one row take the int8 variant.

With many distinct deltas a merged pass would re-read the base for every slot; cuBLAS reads it once
and the delta kernel reads each slot's bits once a tile. Its expansion (one instruction a weight,
half that in the int8 variant) makes it faster than the tl.dot kernel (DOT); the tile shapes below
measured fastest (benchmarks/results/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitdelta.kernels.base_product import base_product
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import BITMMA_MAX_ROWS, Problem, Tiles

SHARED_MEMORY_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
ONE_ROW_MAX_K = 1 << 17  # the int8 kernel's int32 accumulator holds up to 64 * 128 * K: < 2^31 for K < 2^18


@dataclass(frozen=True)
class BitmmaTiles(Tiles):
    """rows: 1 (the int8 kernel), 2..8, 16, 32 or 64 (the bf16/fp16 kernel: 8-column mmas);
    block_n a multiple of 16 x num_warps (each warp owns 16-row mma slabs); num_stages: the depth of
    the cp.async ring, whose shared memory must fit a block."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (1 <= self.rows <= 8 or self.rows in (16, 32, 64)):
            raise ValueError("bitmma tiles take <= 8, 16, 32 or 64 rows")
        if self.block_n % (16 * self.num_warps) or self.block_k not in (256, 512, 1024) or self.num_stages < 2:
            raise ValueError("bitmma: block_n a multiple of 16 x num_warps, block_k 256, 512 or 1024, >= 2 stages")
        if self.shared_bytes() > SHARED_MEMORY_BYTES:
            raise ValueError(f"bitmma: {self.shared_bytes()} bytes of shared memory a block (> {SHARED_MEMORY_BYTES}): "
                             "use fewer stages, a shorter block_k or a narrower block_n")

    def shared_bytes(self) -> int:
        """The cp.async ring: per stage the words [BN, BK/32] (int32) and x, as 4 x 8 bf16 rows of
        BK/4 per 8 tile rows, or 16 int8 digit rows of BK/4 for one-row tiles."""
        x_bytes = 16 * self.block_k // 4 if self.rows == 1 else 4 * max(self.rows, 8) * self.block_k // 4 * 2
        return self.num_stages * (self.block_n * self.block_k // 32 * 4 + x_bytes)


def can_run(problem: Problem) -> bool:
    return problem.gluon and problem.plan.max_rows <= BITMMA_MAX_ROWS


def tiles(problem: Problem) -> BitmmaTiles:
    plan, n, k = problem.plan, problem.n, problem.k
    if plan.max_rows == 1 and k <= ONE_ROW_MAX_K:
        # every slot one row (the all-distinct batch): the int8 kernel, small enough for 5 blocks an SM
        return BitmmaTiles(rows=1, block_n=128, block_k=1024, num_warps=4, num_stages=2)
    rows = _tile_rows(plan)
    count = plan.tile_count(rows)
    if rows == 16:
        bn, bk, stages = (256 if count >= 16 else 128), 512, 3
    elif rows > 16:  # 32 and 64 rows: narrower, shallower tiles keep the x ring in shared memory
        bn, bk, stages = 128, 256, (3 if rows == 32 else 2)
    elif k > 8192:  # long rows: shorter K steps, deeper ring
        bn, bk, stages = 128, 256, 4
    elif count <= 4:  # few tiles: narrower column blocks for more programs
        bn, bk, stages = (64, 512, 4) if n <= 4096 else (128, 512, 3)
    else:
        bn, bk, stages = 256, 512, 3
    return BitmmaTiles(rows=rows, block_n=bn, block_k=bk, num_warps=4, num_stages=stages)


def _tile_rows(plan: SlotPlan) -> int:
    """The tile height (8, 16, 32 or 64) with the least modelled work: a tile expands its slot's bits
    once (cost ~ two 8-column mmas) and runs rows/8 mmas per expanded fragment. Slots of 9..16 rows
    take 16-row tiles, of 32 rows 32-row ones; a Zipf batch (most slots 1-5 rows) stays on 8."""
    def work(rows: int) -> int:  # in 8-column mmas: 2 for the expansion + rows / 8, per tile (x 8)
        return plan.tile_count(rows) * (16 + rows)

    return min((8, 16, 32, 64), key=lambda rows: (work(rows), rows))


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: BitmmaTiles, y: torch.Tensor) -> torch.Tensor:
    from bitdelta.kernels.paths.bitmma_gluon import bitmma_delta  # Gluon: imported only on this path

    ws = base_product(x, base_weight)  # fp32: one rounding
    return bitmma_delta(x, ws, bias, signs, scales, plan, tiles, y)
