"""Rows of a batch grouped by delta slot: the plan every kernel launch shares.

A multi-tenant batch tags each row (token) with the delta slot of its fine-tune, -1 meaning "base
only". Kernels want the rows of one slot side by side, so that a slot's packed bits are read once
however many rows use it. The plan holds that grouping; it depends only on `slot_ids`, so a model
builds it once per forward step (`build_plan`) and passes it to every linear layer.

Pure PyTorch on purpose: it runs (and is tested) on the CPU, and costs one host sync per step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class SlotPlan:
    """Rows sorted by slot, and the segment each slot occupies in that order.

    order:   int32 [M]    row indices, stable-sorted by slot (slot -1 first when present)
    slots:   int32 [G]    the distinct slots, ascending; may start with -1
    offsets: int32 [G+1]  segment g is order[offsets[g]:offsets[g+1]]
    counts:  host copy of the G segment sizes (kernels pick their tile shapes from these)
    host_slots: host copy of `slots`, so that tiling needs no device sync
    in_order: the rows are already grouped (slot ids non-decreasing, so `order` is the identity), as
             in a prefill batch of whole requests: paths that would gather rows can use slices

    What is derived from the plan (tile tables, split sides, the kernel path of each layer shape) is
    built once and kept on it (`cached`): a step's plan serves every layer, and a cached device table
    also keeps host-to-device copies out of CUDA-graph capture (build them once before capturing).
    """

    order: torch.Tensor
    slots: torch.Tensor
    offsets: torch.Tensor
    counts: tuple[int, ...]
    host_slots: tuple[int, ...]
    in_order: bool = False
    _derived: dict[Hashable, object] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """`build()`, computed on the first call with `key` and returned again on later ones."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @property
    def num_rows(self) -> int:
        return int(self.order.numel())

    @property
    def max_rows(self) -> int:
        """Rows of the largest segment (0 for an empty batch)."""
        return max(self.counts, default=0)

    def tile_count(self, rows_per_tile: int) -> int:
        """Tiles of at most `rows_per_tile` rows that cover every segment (what `segment_tiles` builds)."""
        return sum(-(-count // rows_per_tile) for count in self.counts)

    @property
    def min_delta_rows(self) -> int:
        """Rows of the smallest segment with a delta (slot -1 excluded; 0 when there is none)."""
        return min((count for slot, count in zip(self.host_slots, self.counts) if slot >= 0), default=0)

    @property
    def num_deltas(self) -> int:
        """Distinct delta slots present (slot -1 excluded): how many bit matrices a step must read."""
        return sum(1 for slot in self.host_slots if slot >= 0)


def build_plan(slot_ids: torch.Tensor) -> SlotPlan:
    """Group the rows of a batch by slot. slot_ids: int [M], -1 = base only."""
    if slot_ids.ndim != 1:
        raise ValueError(f"slot_ids must be 1-D, got shape {tuple(slot_ids.shape)}")
    if slot_ids.numel() and int(slot_ids.min()) < -1:
        raise ValueError("slot ids must be >= -1 (-1 means base only)")
    slots, counts = torch.unique(slot_ids, sorted=True, return_counts=True)
    order = torch.sort(slot_ids, stable=True).indices
    offsets = torch.zeros(slots.numel() + 1, dtype=torch.int64, device=slot_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    in_order = (slot_ids[1:] >= slot_ids[:-1]).all().view(1)
    host = torch.cat([slots.long(), counts.long(), in_order.long()]).tolist()  # one host sync for all three
    groups = slots.numel()
    return SlotPlan(
        order=order.to(torch.int32),
        slots=slots.to(torch.int32),
        offsets=offsets.to(torch.int32),
        counts=tuple(host[groups:2 * groups]),
        host_slots=tuple(host[:groups]),
        in_order=bool(host[-1]),
    )


def segment_tiles(plan: SlotPlan, rows_per_tile: int) -> torch.Tensor:
    """Cut every segment into tiles of at most `rows_per_tile` rows, never mixing slots.

    Returns int32 [T, 3] on the plan's device: (slot, first, end) with first/end indexing
    `plan.order`. A kernel program takes one tile, so each tile reads its slot's bits once.
    """
    if rows_per_tile < 1:
        raise ValueError("rows_per_tile must be >= 1")
    return plan.cached(("tiles", rows_per_tile), lambda: _tile_table(plan, rows_per_tile))


def _tile_table(plan: SlotPlan, rows_per_tile: int) -> torch.Tensor:
    tiles = []
    start = 0
    for slot, count in zip(plan.host_slots, plan.counts):
        for first in range(start, start + count, rows_per_tile):
            tiles.append((slot, first, min(first + rows_per_tile, start + count)))
        start += count
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(plan.order.device)


def row_slots(plan: SlotPlan) -> torch.Tensor:
    """int32 [M] on the plan's device: the slot of each position of `plan.order` (cached, built from
    the host copies, so no device sync; kernels that take every row of the batch in one program
    read each row's slot from it)."""
    def build() -> torch.Tensor:
        values = [slot for slot, count in zip(plan.host_slots, plan.counts) for _ in range(count)]
        return torch.tensor(values, dtype=torch.int32).to(plan.order.device)

    return plan.cached("row_slots", build)


@dataclass(frozen=True)
class SplitSide:
    """One side of a split batch. rows: int64 indices into the batch, in slot order; plan: a plan over
    the side. When the rows are exactly the batch's rows start..start+n-1 (in whatever order), `start`
    is set and the plan's order indexes that slice, so the side runs on views of x and y; otherwise
    (start None) the rows are gathered in slot order and the plan is over the gathered rows."""

    rows: torch.Tensor
    plan: SlotPlan
    start: int | None


def split_plan(plan: SlotPlan, long_rows: int) -> list[SplitSide]:
    """The segments of more than `long_rows` rows apart from the others (a prefill chunk beside
    decode rows): one SplitSide for each side that has segments. Cached per threshold, like the tile
    tables, so that a step's plan serves every layer; building it costs one host sync a step (the row
    order, to find sides that are contiguous in the batch: the engine packs decode rows first and
    prefill chunks after them)."""
    return plan.cached(("split", long_rows), lambda: _split_sides(plan, long_rows))


def _split_sides(plan: SlotPlan, long_rows: int) -> list[SplitSide]:
    starts = list(accumulate(plan.counts, initial=0))
    order = plan.order.tolist()
    parts = []
    for want_long in (True, False):
        segments = [g for g, count in enumerate(plan.counts) if (count > long_rows) == want_long]
        if segments:
            parts.append(_side(plan, segments, [order[starts[g]:starts[g + 1]] for g in segments]))
    return parts


def _side(plan: SlotPlan, segments: list[int], segment_rows: list[list[int]]) -> SplitSide:
    device = plan.order.device
    rows = [row for part in segment_rows for row in part]  # batch rows, in slot order
    first = min(rows)
    contiguous = max(rows) - first + 1 == len(rows)
    order = [row - first for row in rows] if contiguous else list(range(len(rows)))
    counts = tuple(plan.counts[g] for g in segments)
    slots = tuple(plan.host_slots[g] for g in segments)
    sub = SlotPlan(
        order=torch.tensor(order, dtype=torch.int32).to(device),
        slots=torch.tensor(slots, dtype=torch.int32).to(device),
        offsets=torch.tensor(list(accumulate(counts, initial=0)), dtype=torch.int32).to(device),
        counts=counts,
        host_slots=slots,
        in_order=order == sorted(order),
    )
    return SplitSide(torch.tensor(rows, dtype=torch.int64).to(device), sub, first if contiguous else None)
