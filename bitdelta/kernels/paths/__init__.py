"""The kernel paths of the multi-tenant delta matmul, and the choice among them.

Each path is a module here with its tile parameters, `can_run(problem)` (the batches it serves) and
`run` (its launcher; the Triton/Gluon kernel source sits beside it in `<path>_triton.py` or
`<path>_gluon.py`, MERGED_TILES and DOT sharing `segment_triton.py`, and is imported on the first
GPU call). `choose` takes the first path in `_PRIORITY` whose `can_run` holds: a path's rule may
count on the paths above it having taken their batches. Pure Python up to the launchers, so the
choice is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from types import ModuleType
from typing import NamedTuple

import torch

from bitdelta.kernels.base_product import PLAIN
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths import bitmma, dense, dot, gemv, merged_gemm, merged_tiles
from bitdelta.kernels.paths.bitmma import BitmmaTiles
from bitdelta.kernels.paths.gemv import GemvTiles
from bitdelta.kernels.paths.merged_gemm import MergedGemmTiles
from bitdelta.kernels.paths.merged_tiles import MergedTiles
from bitdelta.kernels.paths.problem import BITMMA_MAX_ROWS, H100_SMS, Problem, Tiles

__all__ = ["BitmmaTiles", "Choice", "GemvTiles", "KernelPath", "MergedGemmTiles", "MergedTiles", "Problem", "Tiles",
           "choose", "plan_choice", "run_path", "split_threshold"]


class KernelPath(Enum):
    DENSE = "dense"  # no delta rows: F.linear (cuBLAS)
    GEMV = "gemv"  # at most 4 rows: base and delta fused on the CUDA cores, whole batch per column block
    MERGED_TILES = "merged_tiles"  # one or two deltas (and prefill tiles): one pass on each tile's merged weights
    BITMMA = "bitmma"  # several deltas (or a wide layer over a quantized base), <= 64 rows a slot: base product, then the Gluon delta kernel
    DOT = "dot"  # several deltas without Gluon: cuBLAS base, then the tl.dot delta kernel on expanded bits
    MERGED_GEMM = "merged_gemm"  # long prefill segments: each slot's merged weights written once, then cuBLAS


_PRIORITY: dict[KernelPath, ModuleType] = {
    KernelPath.DENSE: dense,
    KernelPath.GEMV: gemv,
    KernelPath.MERGED_GEMM: merged_gemm,
    KernelPath.MERGED_TILES: merged_tiles,
    KernelPath.BITMMA: bitmma,
    KernelPath.DOT: dot,
}

PathTiles = Tiles | MergedGemmTiles | None


class Choice(NamedTuple):
    path: KernelPath
    tiles: PathTiles


def choose(problem: Problem) -> Choice:
    """The path for `problem`, and its tiles."""
    for path, module in _PRIORITY.items():
        if module.can_run(problem):
            return Choice(path, module.tiles(problem))
    raise AssertionError(f"no kernel path for {problem}")  # DOT takes whatever BITMMA cannot


def plan_choice(plan: SlotPlan, n: int, k: int, gluon: bool = True, sms: int = H100_SMS, base_form: int = PLAIN) -> Choice:
    """`choose`, memoised on the plan: a step's plan serves every layer, which have a handful of
    shapes, and an eager step (prefill) would otherwise pay the choice in host time at every linear."""
    return plan.cached(("path", n, k, gluon, sms, base_form), lambda: choose(Problem(plan, n, k, gluon, sms, base_form)))


def split_threshold(plan: SlotPlan) -> int | None:
    """Segments of more rows than the returned count go apart from the others, each side choosing its
    own path; None keeps the batch whole. A prefill chunk beside decode rows: one path for both would
    put every one-row slot in a prefill tile, and no segment could take MERGED_GEMM while a short one
    is present."""
    if plan.max_rows > BITMMA_MAX_ROWS and min(plan.counts) <= BITMMA_MAX_ROWS:
        return BITMMA_MAX_ROWS
    return None


Launcher = Callable[..., torch.Tensor]


def _on_kernel_operands(run: Launcher) -> Launcher:
    """A kernel path's launcher given the operands as its kernels read them: x and the bits
    row-major, fp32 scales, and y allocated (or `out`); an empty batch launches nothing."""
    def launch(x, base_weight, signs, scales, plan, bias, tiles, out):
        x = x.contiguous()
        signs = signs.contiguous()
        scales = scales.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], base_weight.shape[0], dtype=x.dtype, device=x.device) if out is None else out
        if x.shape[0] == 0:
            return y
        return run(x, base_weight, signs, scales, plan, bias, tiles, y)

    return launch


_LAUNCHERS: dict[KernelPath, Launcher] = {
    KernelPath.DENSE: dense.run,
    **{path: _on_kernel_operands(module.run) for path, module in _PRIORITY.items() if path is not KernelPath.DENSE},
}


def run_path(path: KernelPath, tiles: PathTiles, x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor,
             scales: torch.Tensor, plan: SlotPlan, bias: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] in x's dtype computed by `path` with `tiles` (those `choose` gives, or any valid ones:
    the benchmarks sweep them); the arguments are those of `reference.bitdelta_matmul` (x fp16/bf16
    on CUDA for every path but DENSE). `out`, if given, receives the result (tests pass a NaN-filled one)."""
    return _LAUNCHERS[path](x, base_weight, signs, scales, plan, bias, tiles, out)
