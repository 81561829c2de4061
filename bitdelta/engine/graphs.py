"""CUDA graphs of decode steps: one replay instead of thousands of kernel launches from Python.

A decode step of a 7B model launches well over a thousand kernels (norms, rotary, 224 linears
each a cuBLAS product and a delta kernel, attention, ...). Issued one by one from Python they cost more host
time than the GPU needs to run them at small batches (e2e_profile.txt), so the step is bound by
Python, not by the bytes it reads. A graph replays the whole step with one launch.

What a graph fixes is the batch's *composition*: the number of rows and the slot of each row (the
kernels' grouping plan and tile shapes are built from it on the host). Everything else — token
ids, positions, the rows written in the KV cache, the block tables, sequence lengths — is copied
into static device buffers before each replay, and the kernels read it from there. Decode-only
steps qualify (one row per sequence); steps with prefill chunks run eagerly. A delta that brings
the first per-slot table (a changed norm, embedding, lm_head or bias) changes what the forward
reads, so every graph captured before it is dropped (`layout_version`). A composition is captured the second step in a row it
is seen, so batches in flux do not pay for captures they never replay; the most recent
`capacity` graphs are kept, sharing one memory pool.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from bitdelta.kernels import SlotPlan, build_plan

from .kvcache import PagedKVCache
from .model import MultiTenantModel, StepBatch


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    plan: SlotPlan  # its device tensors are read by the captured kernels: keep them alive
    head_groups: list[tuple[int, torch.Tensor]] | None  # likewise
    logits: torch.Tensor  # written by every replay


class DecodeGraphs:
    def __init__(self, model: MultiTenantModel, kv: PagedKVCache, max_rows: int, capacity: int = 16):
        self.model, self.kv, self.capacity = model, kv, capacity
        device = model.device
        width = kv.blocks_for(model.context)
        self.static = StepBatch(
            token_ids=torch.zeros(max_rows, dtype=torch.long, device=device),
            positions=torch.zeros(max_rows, dtype=torch.long, device=device),
            slots=torch.zeros(max_rows, dtype=torch.int32, device=device),
            row_sequence=torch.zeros(max_rows, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_rows, width, dtype=torch.int32, device=device),
            write_rows=torch.zeros(max_rows, dtype=torch.long, device=device),
            logit_rows=torch.arange(max_rows, device=device),
        )
        self.graphs: OrderedDict[tuple[int, ...], _Graph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self._last_seen: tuple[int, ...] | None = None
        self._layout = model.layout_version

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The model's logits for `batch` (host tensors), from a graph when one applies."""
        if self._layout != self.model.layout_version:
            self.graphs.clear()
            # a private pool is released once no graph holds it; a new capture needs a new one
            self.pool = torch.cuda.graph_pool_handle()
            self._layout = self.model.layout_version
        if not self._eligible(batch):
            return self.model.forward(batch, self.kv)
        key = tuple(batch.slots.tolist())
        graph = self.graphs.get(key)
        if graph is None and key != self._last_seen:
            self._last_seen = key
            return self.model.forward(batch, self.kv)
        rows = self._load(batch)
        if graph is None:
            graph = self._capture(key, rows, self.model.head_groups(batch.slots))
        self.graphs.move_to_end(key)
        graph.graph.replay()
        self.replays += 1
        return graph.logits

    def _eligible(self, batch: StepBatch) -> bool:
        rows = batch.token_ids.numel()
        return (
            0 < rows <= self.static.token_ids.numel()
            and batch.logit_rows.numel() == rows == batch.block_tables.shape[0]  # decode only: a row per sequence
            and batch.block_tables.shape[1] <= self.static.block_tables.shape[1]
        )

    def _load(self, batch: StepBatch) -> int:
        """Copy the step's inputs into the leading rows (and columns) of the static buffers."""
        for field in fields(batch):
            source = getattr(batch, field.name)
            getattr(self.static, field.name)[tuple(map(slice, source.shape))].copy_(source, non_blocking=True)
        return batch.token_ids.numel()

    def _view(self, rows: int) -> StepBatch:
        return StepBatch(**{field.name: getattr(self.static, field.name)[:rows] for field in fields(self.static)})

    def _capture(self, key: tuple[int, ...], rows: int, head_groups) -> _Graph:
        view = self._view(rows)
        plan = build_plan(view.slots)
        self.model.route(view.slots, plan)
        # A first eager pass on a side stream builds what the kernels cache on the host and copies
        # to the device (tile tables), compiles any new kernel, and lets cuBLAS pick its workspace:
        # none of that may happen during capture. It writes the same keys and values the replay will.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.compute(view, self.kv, head_groups)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # the delta loader thread may pin memory meanwhile
            logits = self.model.compute(view, self.kv, head_groups)
        while len(self.graphs) >= self.capacity:
            self.graphs.popitem(last=False)
        self.graphs[key] = captured = _Graph(graph, plan, head_groups, logits)
        return captured
