"""DENSE: a batch with no delta rows is exactly the base layer, `F.linear` (cuBLAS)."""

from __future__ import annotations

import torch

from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.paths.problem import Problem


def can_run(problem: Problem) -> bool:
    return problem.plan.num_deltas == 0


def tiles(problem: Problem) -> None:
    return None


def run(x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
        bias: torch.Tensor | None, tiles: None, out: torch.Tensor | None) -> torch.Tensor:
    dense = torch.nn.functional.linear(x, base_weight, bias)
    return dense if out is None else out.copy_(dense)
