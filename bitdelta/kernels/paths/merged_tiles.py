"""MERGED_TILES: one or two distinct deltas, or prefill tiles: one tensor-core pass on each tile's
merged weights, base + scale * sign built in registers (the segment kernel's merged form).

With few distinct deltas every column block's base and bits are read by few tiles, so building the
merged weights once per tile costs less than cuBLAS's base product plus a separate delta pass.
`transposed` computes the product as merged @ x^T, making the merged tile the tensor cores'
register operand; `split_k` cuts K over programs where the tiles alone would leave SMs idle, the
last program of a tile summing the fp32 partials in split order (so results do not depend on
timing). The rules below keep what measured fastest (benchmarks/results/kernels.md; the reasons in
docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bitdelta.kernels.base_product import ROW_SCALED, stored
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import Problem, Tiles, next_pow2, programs

SPLIT_K_MAX_ROWS = 64  # taller tiles are never split: they already give each program enough work
PREFILL_ROWS = 128  # the tile height of prefill (the tallest tile)


@dataclass(frozen=True)
class MergedTiles(Tiles):
    """transposed: acc[cols, rows] += merged . x^T (tl.dot needs >= 16 rows a side); split_k: K cut into
    this many ranges of whole block_k steps, one program each."""

    transposed: bool = False
    split_k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_k < 1:
            raise ValueError("split_k must be >= 1")
        if self.transposed and not (self.rows >= 16 and self.block_n >= 16 and next_pow2(self.rows) == self.rows):
            raise ValueError("transposed tiles need a power of two >= 16 rows and block_n >= 16")


def can_run(problem: Problem) -> bool:
    return problem.prefill or (problem.few_deltas and not problem.stored_product_first)


def tiles(problem: Problem) -> MergedTiles:
    if problem.prefill:
        return _prefill_tiles(problem)
    rows = next_pow2(problem.plan.max_rows)
    count = problem.plan.tile_count(rows)
    if problem.base_form == ROW_SCALED:
        row_scaled = _row_scaled_tiles(problem, rows, count)
        if row_scaled is not None:
            return row_scaled
    return _with_split_k(_decode_tiles(problem, rows, count), count, problem)


def _prefill_tiles(problem: Problem) -> MergedTiles:
    """Prompt chunks too short for MERGED_GEMM: 128-row tiles (the segment's height below that),
    computed transposed."""
    rows = min(next_pow2(problem.plan.max_rows), PREFILL_ROWS)
    count = problem.plan.tile_count(rows)
    if rows == PREFILL_ROWS and programs(count, problem.n, 128) >= 256:  # enough programs for wide blocks
        return MergedTiles(rows, block_n=128, block_k=64, num_warps=4, num_stages=3, transposed=True)
    if problem.few_deltas:
        return MergedTiles(rows, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True)
    # more deltas' tiles read more bits a column block: a shorter K step, one more stage in flight
    return MergedTiles(rows, block_n=64, block_k=64, num_warps=4, num_stages=4, transposed=True)


def _decode_tiles(problem: Problem, rows: int, count: int) -> MergedTiles:
    """Decode tiles of `rows` (a power of two up to 128): narrow column blocks, as many programs as
    the layer allows, except where taller tiles on wide layers do better with wider blocks."""
    n, k = problem.n, problem.k

    def merged(block_n: int, block_k: int, warps: int = 4, stages: int = 4, transposed: bool = False) -> MergedTiles:
        return MergedTiles(rows, block_n, block_k, warps, stages, transposed=transposed)

    if rows == 64 and n >= 8192:
        # a shallow, very wide layer (a 7B model's stacked gate/up) keeps the untransposed 64 x 64 tile
        return merged(64, 64) if k <= 4096 and n > 16384 else merged(64, 128, stages=3, transposed=True)
    one_wave = programs(count, n, 32) <= 3 * problem.sms  # 3 blocks an SM: the 32-wide tiles fit one wave
    if rows > 16 and n >= 8192 and not (rows == 32 and (k <= 4096 or one_wave)):
        # tall tiles on wide layers: 64 columns wide, a shorter K step past 32 rows
        return merged(64, 128 if rows <= 32 else 64)
    if 4 < rows <= 16 and n > 16384:
        return merged(32, 256, stages=3)  # very wide layers: deeper K steps
    # one or two rows a tile: 2 warps, so more programs are resident; more rows: 4 warps, deeper pipeline
    return merged(32, 128, warps=2, stages=3) if rows <= 2 else merged(32, 128)


def _row_scaled_tiles(problem: Problem, rows: int, count: int) -> MergedTiles | None:
    """Over an int8/fp8 base, the tiles its own sweeps found faster than a plain base's (kernels_sweep
    --base-quant int8 and fp8 on four 7B/70B shapes, H100); None elsewhere. Converting and scaling each
    weight lengthens a K step, and a plain base's tiles leave two programs an SM, half the issue slots
    idle on stalls (ncu), so 3-8 rows take K steps of 256, and 16 or 64 rows on layers of 8192+ columns
    take 64-column tiles with K split in two wherever the column blocks number at most two an SM."""
    n, k = problem.n, problem.k
    if 2 < rows <= 8:
        return _with_split_k(MergedTiles(rows, block_n=32, block_k=256, num_warps=4, num_stages=3), count, problem)
    if rows == 16 and n >= 8192:
        tiles = MergedTiles(rows, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True, split_k=2)
    elif rows == 64 and n >= 8192:
        short = k <= 4096  # short rows: K steps of 64, one more stage
        tiles = MergedTiles(rows, block_n=64, block_k=64 if short else 128, num_warps=4, num_stages=4 if short else 3,
                            split_k=2)
    else:
        return None
    return tiles if programs(count, n, tiles.block_n) <= 2 * problem.sms else None


def _with_split_k(tiles: MergedTiles, count: int, problem: Problem) -> MergedTiles:
    """K split in two (four for the 2-warp tiles of 1-2 rows) where the 32-column or transposed tiles
    of up to SPLIT_K_MAX_ROWS rows make at most one program an SM: each would otherwise stream all of
    K alone while SMs idle. With more programs than SMs, splitting only adds the partials' traffic."""
    if tiles.rows > SPLIT_K_MAX_ROWS or not (tiles.block_n == 32 or tiles.transposed):
        return tiles
    if programs(count, problem.n, tiles.block_n) > problem.sms:
        return tiles
    return replace(tiles, split_k=4 if tiles.rows <= 2 else 2)


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: MergedTiles, y: torch.Tensor) -> torch.Tensor:
    from bitdelta.kernels.paths.segment_triton import segment_product

    return segment_product(x, stored(base_weight), y, bias, signs, scales, plan, tiles, y, merge=True,
                           transposed=tiles.transposed, split_k=tiles.split_k)
