"""DENSE: a batch with no delta rows is exactly the base layer: `F.linear` (cuBLAS), or the stored
product over a quantized base (`base_product`)."""

from __future__ import annotations

import torch

from bitdelta.kernels.base_product import base_product
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import Problem


def can_run(problem: Problem) -> bool:
    return problem.plan.num_deltas == 0


def tiles(problem: Problem) -> None:
    return None


def run(x: torch.Tensor, base_weight, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: None, out: torch.Tensor | None) -> torch.Tensor:
    dense = base_product(x, base_weight, x.dtype, bias)
    return dense if out is None else out.copy_(dense)
