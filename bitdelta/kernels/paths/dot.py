"""DOT: several distinct deltas where Triton has no Gluon (a build without triton.experimental): the base product in fp32 (`base_product`),
then the segment kernel adds each tile's delta, its slot's bits expanded to +-1 for tl.dot.

Where Gluon exists BITMMA takes these batches: its expansion costs one instruction a weight or less,
where this one costs several (docs/kernels.md).
"""

from __future__ import annotations

import torch

from bitdelta.kernels.base_product import base_product
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import DOT_MAX_ROWS, Problem, Tiles, next_pow2


def can_run(problem: Problem) -> bool:
    return problem.plan.max_rows <= DOT_MAX_ROWS


def tiles(problem: Problem) -> Tiles:
    return Tiles(rows=next_pow2(problem.plan.max_rows), block_n=64, block_k=128, num_warps=4, num_stages=3)


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: Tiles, y: torch.Tensor) -> torch.Tensor:
    from bitdelta.kernels.paths.segment_triton import segment_product

    ws = base_product(x, base_weight)  # fp32: one rounding
    return segment_product(x, None, ws, bias, signs, scales, plan, tiles, y, merge=False)
