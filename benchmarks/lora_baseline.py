"""Batched LoRA, the S-LoRA / Punica baseline: every row of a batch with its own rank-r adapter.

    y_i = x_i @ W.T + bias + (x_i @ A[t_i].T) @ B[t_i].T      (no adapter term where t_i = -1)

The adapters of S slots are pre-stacked, A [S, r, K] and B [S, N, r] (any alpha / r scaling folded
into B), and applied with two batched matmuls over the rows grouped by slot: group g is slot g's
rows as one [L, K] matrix (padded to the longest group), so each slot's A and B are read once a
call. For the all-distinct batch (one row a slot) that is exactly what a BGMV kernel reads, each
row's A and B once; where rows share a slot, what an SGMV kernel reads. Rows that come in S equal
runs in slot order (the benchmarks' batches) are viewed as [S, L, K]: nothing is gathered and the
second product adds onto y in place (cuBLAS beta = 1).

The grouping is host data built once per step (`lora_groups`), like the kernels' slot plan, so a
CUDA graph can capture the products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoraGroups:
    """Rows grouped by adapter slot for `lora_shrink` / `lora_expand_`.

    groups, length: G groups of L rows. adapters: the slot of each group (None: the groups are
    slots 0..S-1, A and B are used as stacked). rows: x's row at each group position, padding
    repeating the group's first row (None: the rows are G equal runs in slot order, so x is viewed).
    targets, positions: each row with an adapter and its flat position in the [G * L] products."""

    groups: int
    length: int
    adapters: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def lora_groups(slot_ids: Sequence[int], num_slots: int, device: torch.device | str = "cpu") -> LoraGroups:
    """The grouping of a batch whose row i uses slot slot_ids[i] (-1: no adapter), from host ints."""
    slot_ids = [int(s) for s in slot_ids]
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(slot_ids):
        if slot >= 0:
            members.setdefault(slot, []).append(row)
    if not members:
        return LoraGroups(0, 0)
    used = sorted(members)
    length = max(len(rows) for rows in members.values())
    if used == list(range(num_slots)) and slot_ids == [s for s in used for _ in range(length)]:
        return LoraGroups(num_slots, length)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    rows = [[members[s][j] if j < len(members[s]) else members[s][0] for j in range(length)] for s in used]
    return LoraGroups(
        groups=len(used), length=length,
        adapters=None if used == list(range(num_slots)) else tensor(used),
        rows=tensor(rows),
        targets=tensor([row for s in used for row in members[s]]),
        positions=tensor([g * length + j for g, s in enumerate(used) for j in range(len(members[s]))]),
    )


def _adapters(t: torch.Tensor, groups: LoraGroups) -> torch.Tensor:
    return t if groups.adapters is None else t.index_select(0, groups.adapters)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, groups: LoraGroups) -> torch.Tensor:
    """h [G, L, r] = each group's rows of x [M, K] times its slot's A [r, K], transposed."""
    xs = x.reshape(groups.groups, groups.length, x.shape[-1]) if groups.rows is None else x[groups.rows]
    return torch.bmm(xs, _adapters(a, groups).transpose(1, 2))


def lora_expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, groups: LoraGroups) -> torch.Tensor:
    """y [M, N] += h @ B[slot].T for every row with an adapter, in place (y may be a column slice)."""
    b = _adapters(b, groups).transpose(1, 2)
    if groups.rows is None:
        y.view(groups.groups, groups.length, y.shape[-1]).baddbmm_(h, b)
        return y
    delta = torch.bmm(h, b).view(-1, y.shape[-1])
    return y.index_add_(0, groups.targets, delta.index_select(0, groups.positions))


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: LoraGroups) -> torch.Tensor:
    """y += each row's (x A[t].T) B[t].T, in place; y [M, N], x [M, K], a [S, r, K], b [S, N, r]."""
    if groups.groups == 0:
        return y
    return lora_expand_(y, lora_shrink(x, a, groups), b, groups)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: LoraGroups,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The base product (cuBLAS on a GPU) plus every row's own LoRA product: y [M, N] in x's dtype."""
    return apply_lora(F.linear(x, weight, bias), x, a, b, groups)
