"""GPU timing for the kernel benchmarks (`benchmarks.kernels`, `benchmarks.kernels_sweep`).

A case is one linear (K x N: in x out features) and a batch whose rows belong to delta slots
(`counts[s]` rows for slot s). `Problem` holds R >= 2 buffer sets of it (inputs random, never zeros)
and times a call as a CUDA graph cycling the R sets for at least MIN_GRAPH_CALLS calls (launch gaps
vanish, and no call finds the weights it reads in L2), replayed under triton.testing.do_bench
(median; it flushes L2 before each replay by writing a buffer, and a replay has a fixed cost, likely
that buffer's dirty lines written back under the first call: spread over the graph's calls).
Base-only calls and reads rotate their own sets, sized by the base's bytes (`base_sets`): the case's
sets alone, few where its deltas are many, would leave the base in L2 from one call to the next.
Beside our kernels it times the baselines: cuBLAS on the base alone, dequantize-then-matmul,
a dense weight per tenant, batched LoRA (`lora_baseline.py`), and a kernel that only reads the
case's weight bytes; `floor_bytes` is the model docs/kernels.md explains.

This module is the only place the kernel benchmarks reach into `bitdelta.kernels` beyond its public
entry point: a change to the kernels' internals is made here. It imports Triton (CUDA machines).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch
import triton
import triton.language as tl

from benchmarks.lora_baseline import lora_groups, lora_linear
from bitdelta.kernels import bitdelta_matmul, gluon_available, reference, sm_count
from bitdelta.kernels.base_product import FORMS, PLAIN
from bitdelta.kernels.grouping import SlotPlan, build_plan
from bitdelta.kernels.paths import Choice, KernelPath, plan_choice, run_path, split_threshold
from bitdelta.kernels.paths import Problem as PathProblem
from bitdelta.kernels.paths import bitmma, gemv, merged_tiles
from bitdelta.pack import unpack_signs
from bitdelta.quant import quantize

__all__ = ["DECODE_SHAPES", "DTYPE", "MIN_GRAPH_CALLS", "Choice", "Problem", "SlotPlan", "base_call_bytes", "bench_ms",
           "build_plan", "dispatched_choice", "graph_us", "measure_ceilings", "parse_counts", "parse_shapes", "precompile",
           "rotation_count", "run_choice", "slot_ids_for", "sm_count", "split_threshold", "tiles_of", "time_checked",
           "weight_bytes"]

DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 3 * L2_BYTES  # bytes a graph's calls touch, at least: each call sees a cold L2
MIN_GRAPH_CALLS = 8  # calls a timed graph runs at least: a replay's fixed cost (~6-9 us on an H100, fitted) spread over 8
DENSE_POOL_BYTES = 6 * 2**30  # memory for the dense-weight-per-tenant baseline
DECODE_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]
STREAM_WORDS = 4096  # int32 words a pure-read program takes per step: 16 KB
STREAM_GRIDS = ((2, 8), (4, 4), (8, 4), (16, 4))  # (programs an SM, warps) of the pure reads
MAX_RELATIVE_ERROR = 6e-3  # bf16: the output's rounding (RMS ~2e-3) with a 3x margin


def bench_ms(fn, rep: int = 60) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def graph_us(calls: list, min_calls: int = 1) -> float:
    """Median microseconds per call of a CUDA graph running `calls` back to back, cycled to at least
    `min_calls` calls (the caller's rotation must keep a cycled call's bytes out of L2)."""
    calls = [calls[i % len(calls)] for i in range(max(min_calls, len(calls)))]
    for call in calls:  # compile, fill plan caches, settle the allocator outside capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    us = bench_ms(graph.replay) * 1e3 / len(calls)
    del graph
    return us


@triton.jit
def _stream_kernel(a_ptr, a_words, b_ptr, b_words, out_ptr, BLOCK: tl.constexpr):
    """Program p sums words p*BLOCK, (p + P)*BLOCK, ... of a then b (P programs): a pure read stream."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(tl.program_id(0) * BLOCK, a_words, tl.num_programs(0) * BLOCK):
        acc += tl.load(a_ptr + start + offs, mask=start + offs < a_words, other=0)
    for start in range(tl.program_id(0) * BLOCK, b_words, tl.num_programs(0) * BLOCK):
        acc += tl.load(b_ptr + start + offs, mask=start + offs < b_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate, 8192^3."""
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), rep=200)
    copy_bw = 2 * src.numel() * 2 / (copy_ms * 1e-3)
    src = dst = None  # 2 GB back before the matmul's operands
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    mm_ms = bench_ms(lambda: a @ b, rep=300)
    return {"copy_bandwidth_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


def slot_ids_for(counts: list[int], shuffled: bool = False) -> torch.Tensor:
    """Slot ids (CPU) with counts[s] rows of slot s, in slot order or shuffled."""
    slot_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return slot_ids[torch.randperm(slot_ids.numel())] if shuffled else slot_ids


def dispatched_choice(n: int, k: int, plan: SlotPlan, recipe: str | None = None) -> Choice:
    """The path and tiles the entry point runs on this device for a batch it does not split, over a
    bf16 base or one quantized by `recipe`."""
    base_form = PLAIN if recipe is None else FORMS[recipe]
    return plan_choice(plan, n, k, gluon_available(), sm_count(torch.cuda.current_device()), base_form)


def tiles_of(choice: Choice) -> dict | None:
    """A choice's tile parameters, for the result files."""
    return None if choice.tiles is None else dataclasses.asdict(choice.tiles)


def run_choice(choice: Choice, d: dict, plan: SlotPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """One path with given tiles on a buffer set (x, w, signs, scales) of a case."""
    return run_path(choice.path, choice.tiles, d["x"], d["w"], d["signs"], d["scales"], plan, None, out)


def rotation_count(bytes_touched: int) -> int:
    """Buffer sets a graph rotates so that a call's bytes have left L2 before it comes round again:
    together at least ROTATE_BYTES, two at least, eight at most."""
    return max(2, min(8, math.ceil(ROTATE_BYTES / bytes_touched)))


def base_call_bytes(n: int, k: int, rows: int, recipe: str | None) -> int:
    """Bytes a base-only call touches: the base weight as stored, `rows` rows of x read and of y written."""
    return weight_bytes(n, k, recipe) + rows * (k + n) * 2


def weight_bytes(n: int, k: int, recipe: str | None) -> int:
    """Bytes of an [N, K] base weight in bf16, or stored by a `bitdelta.quant` recipe (values and scales)."""
    if recipe is None:
        return n * k * 2
    if recipe == "int4":
        return n * k // 2 + n * -(-k // 128) * 4
    return n * k + n * 4


class Problem:
    """R buffer sets of one case: `counts[s]` rows for delta slot s (in slot order unless
    `shuffled`), the base in bf16 or quantized by `recipe` (bitdelta.quant). `Problem.decode(k, n,
    batch, distinct)`: every row its own delta, or one shared."""

    def __init__(self, k: int, n: int, counts: list[int], shuffled: bool = False, recipe: str | None = None):
        self.k, self.n, self.counts, self.recipe = k, n, list(counts), recipe
        self.batch, self.num_slots = sum(counts), len(counts)
        self.kw = (k + 31) // 32
        slot_ids = slot_ids_for(counts, shuffled)
        self.host_slot_ids = slot_ids.tolist()
        self.slot_ids = slot_ids.cuda()
        self.plan: SlotPlan = build_plan(self.slot_ids)
        self.bytes = self.floor_bytes()
        self.sets = [self._make_set() for _ in range(rotation_count(self.bytes))]
        self.ref = None

    @classmethod
    def decode(cls, k: int, n: int, batch: int, distinct: bool, recipe: str | None = None) -> Problem:
        return cls(k, n, [1] * batch if distinct else [batch], recipe=recipe)

    def _make_set(self) -> dict:
        k, n, s = self.k, self.n, self.num_slots
        w = (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE)
        return {
            "x": torch.randn(self.batch, k, device="cuda", dtype=DTYPE),
            "w": w if self.recipe is None else quantize(w, self.recipe),
            "signs": torch.randint(-(2**31), 2**31 - 1, (s, n, self.kw), dtype=torch.int32, device="cuda"),
            "scales": torch.rand(s, n, device="cuda") * 1e-3,
        }

    def _base_set(self) -> dict:
        w = (torch.randn(self.n, self.k, device="cuda") * 0.02).to(DTYPE)
        return {"x": torch.randn(self.batch, self.k, device="cuda", dtype=DTYPE),
                "w": w if self.recipe is None else quantize(w, self.recipe)}

    @functools.cached_property
    def base_sets(self) -> list[dict]:
        """Sets whose x and base weight a base-only call or read rotates: the case's own, then more of
        x and the base alone, as many as the base's bytes (not the case's) need."""
        count = rotation_count(base_call_bytes(self.n, self.k, self.batch, self.recipe))
        return self.sets[:count] + [self._base_set() for _ in range(count - len(self.sets))]

    def _graph_us(self, call, sets: list) -> float:
        """`call(d)` over the rotating `sets`, in one graph of at least MIN_GRAPH_CALLS calls."""
        return graph_us([lambda d=d: call(d) for d in sets], MIN_GRAPH_CALLS)

    def floor_bytes(self) -> int:
        """Base once + each distinct delta's bits once + scales + x read + y written."""
        n, k, s, b = self.n, self.k, self.num_slots, self.batch
        return weight_bytes(n, k, self.recipe) + s * n * self.kw * 4 + s * n * 4 + b * k * 2 + b * n * 2

    def dispatched_choice(self) -> Choice:
        return dispatched_choice(self.n, self.k, self.plan, self.recipe)

    def candidate_choices(self) -> dict[str, Choice]:
        """Every decode path that serves this batch over a plain base of its shape, whatever the
        dispatcher's priority, on the tiles its rule gives there: what the rules over a quantized base
        (which move cases between these paths) are checked against."""
        plain = PathProblem(self.plan, self.n, self.k, gluon_available(), sm_count(torch.cuda.current_device()))
        modules = {KernelPath.GEMV: gemv, KernelPath.MERGED_TILES: merged_tiles, KernelPath.BITMMA: bitmma}
        return {path.name: Choice(path, module.tiles(plain)) for path, module in modules.items() if module.can_run(plain)}

    # ---- ours
    def ours_us(self, choice: Choice | None = None) -> float:
        """The public entry point (choice None: the dispatcher's, splits included), or one path with
        explicit tiles."""
        if choice is None:
            return self._graph_us(
                lambda d: bitdelta_matmul(d["x"], d["w"], d["signs"], d["scales"], self.slot_ids, plan=self.plan), self.sets)
        return self._graph_us(lambda d: run_choice(choice, d, self.plan), self.sets)

    def relative_error(self, choice: Choice | None = None) -> float:
        """||out - ref|| / ||ref|| on the first buffer set against the fp32 reference (inf if not finite)."""
        d = self.sets[0]
        if self.ref is None:
            w = d["w"] if self.recipe is None else d["w"].dequantize()
            self.ref = reference.bitdelta_matmul(d["x"].float(), w, d["signs"], d["scales"], self.slot_ids, None)
        if choice is None:
            out = bitdelta_matmul(d["x"], d["w"], d["signs"], d["scales"], self.slot_ids, plan=self.plan)
        else:
            out = torch.full((self.batch, self.n), float("nan"), device="cuda", dtype=DTYPE)
            run_choice(choice, d, self.plan, out)
        if not torch.isfinite(out).all():
            return float("inf")
        return ((out.float() - self.ref).norm() / self.ref.norm()).item()

    # ---- what one pass over the bytes can do
    def stream_us(self, programs: int, warps: int, deltas: bool = True) -> float:
        """A kernel that only reads the case's weight bytes, the base's and every distinct delta's bits
        (unless deltas=False), summing them so the loads stay: `programs` programs stream in turn."""
        out = torch.empty(programs, dtype=torch.int32, device="cuda")

        def call(d: dict) -> None:
            w = d["w"] if self.recipe is None else d["w"].data  # a quantized base's values (its scales: N words)
            a = w.view(torch.int32).reshape(-1)
            b = d["signs"].reshape(-1) if deltas else out[:0]
            _stream_kernel[(programs,)](a, a.numel(), b, b.numel(), out, BLOCK=STREAM_WORDS, num_warps=warps)

        return self._graph_us(call, self.sets if deltas else self.base_sets)

    def read_us(self, deltas: bool = True) -> float:
        """The fastest `stream_us` over STREAM_GRIDS: how fast any single pass over the case's
        weight bytes goes in this harness."""
        sms = sm_count(torch.cuda.current_device())
        return min(self.stream_us(per_sm * sms, warps, deltas) for per_sm, warps in STREAM_GRIDS)

    def base_only_us(self) -> float:
        """The public entry point with every row on the base: the DENSE path (cuBLAS over a bf16 base,
        the stored product over a quantized one)."""
        base_rows = torch.full_like(self.slot_ids, -1)
        plan = build_plan(base_rows)
        signs, scales = self.sets[0]["signs"], self.sets[0]["scales"]  # not read: no row has a delta
        return self._graph_us(lambda d: bitdelta_matmul(d["x"], d["w"], signs, scales, base_rows, plan=plan),
                              self.base_sets)

    # ---- baselines
    def base_us(self) -> float:
        """cuBLAS on the base weight alone: no delta at all."""
        return self._graph_us(lambda d: d["x"] @ d["w"].t(), self.base_sets)

    def _groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, its rows) for every slot with rows."""
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(self.host_slot_ids):
            rows.setdefault(slot, []).append(row)
        return [(slot, torch.tensor(members, device="cuda")) for slot, members in sorted(rows.items())]

    def dequant_us(self) -> float:
        """Per distinct slot, W = base + scale * unpack(bits) in PyTorch ops, then a matmul."""
        d, groups = self.sets[0], self._groups()

        def call():
            y = torch.empty(self.batch, self.n, device="cuda", dtype=DTYPE)
            for slot, rows in groups:
                weight = (d["w"].float() + d["scales"][slot][:, None] * unpack_signs(d["signs"][slot], self.k)).to(DTYPE)
                y[rows] = d["x"][rows] @ weight.t()
            return y

        return bench_ms(call, rep=40) * 1e3  # ms-scale per call: no graph needed; do_bench flushes L2

    def dense_us(self) -> float:
        """Every tenant has its own dense weight (what serving separate fine-tunes costs)."""
        weight_bytes = self.n * self.k * 2
        pool_size = max(1, min(self.num_slots * len(self.sets), DENSE_POOL_BYTES // weight_bytes))
        pool = [(torch.randn(self.n, self.k, device="cuda") * 0.02).to(DTYPE) for _ in range(pool_size)]
        groups = [rows for _, rows in self._groups()]

        def call(r: int, d: dict) -> None:
            y = torch.empty(self.batch, self.n, device="cuda", dtype=DTYPE)
            for t, rows in enumerate(groups):
                y[rows] = d["x"][rows] @ pool[(r * len(groups) + t) % pool_size].t()

        return graph_us([lambda r=r, d=d: call(r, d) for r, d in enumerate(self.sets)], MIN_GRAPH_CALLS)

    def lora_us(self, rank: int) -> float:
        """Batched LoRA: the base product, then every row's own rank-`rank` adapter (one adapter a
        delta slot) as two batched matmuls; adapters rotate with the buffer sets like the bits."""
        groups = lora_groups(self.host_slot_ids, self.num_slots, "cuda")
        adapter_bytes = self.num_slots * rank * (self.k + self.n) * 2
        reps = rotation_count(self.n * self.k * 2 + adapter_bytes)
        sets = [(self.sets[r] if r < len(self.sets) else self._base_set(),  # each call its own base weight too
                 (torch.randn(self.num_slots, rank, self.k, device="cuda") * 0.02).to(DTYPE),
                 (torch.randn(self.num_slots, self.n, rank, device="cuda") * 0.02).to(DTYPE)) for r in range(reps)]
        return graph_us([lambda d=d, a=a, b=b: lora_linear(d["x"], d["w"], a, b, groups) for d, a, b in sets],
                        MIN_GRAPH_CALLS)


def time_checked(p: Problem, configs: dict) -> tuple[dict, dict]:
    """Median us of each named choice (None: the entry point) on `p`, each checked against the
    reference first: NaN where the relative error is MAX_RELATIVE_ERROR or more, or where the choice
    fails (its message printed and kept as its error, so the others still run)."""
    times, errors = {}, {}
    for name, cfg in configs.items():
        try:
            errors[name] = p.relative_error(cfg)
            times[name] = p.ours_us(cfg) if errors[name] < MAX_RELATIVE_ERROR else float("nan")
        except Exception as exc:  # reported, not fatal
            errors[name], times[name] = f"{type(exc).__name__}: {exc}"[:200], float("nan")
            print(f"{name}: {errors[name]}", flush=True)
    return times, errors


def _compile_job(job) -> str:
    """Run one (K, N, choice, recipe) once on two distinct rows over a base in bf16 or quantized by
    `recipe`, so Triton's on-disk cache holds its binary."""
    k, n, cfg, recipe = job
    try:
        x = torch.randn(2, k, device="cuda", dtype=DTYPE)
        w = torch.randn(n, k, device="cuda", dtype=DTYPE)
        w = w if recipe is None else quantize(w, recipe)
        signs = torch.randint(-(2**31), 2**31 - 1, (2, n, (k + 31) // 32), dtype=torch.int32, device="cuda")
        scales = torch.rand(2, n, device="cuda")
        run_choice(cfg, dict(x=x, w=w, signs=signs, scales=scales), build_plan(torch.arange(2, device="cuda")))
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # reported by the caller
        return f"{type(exc).__name__}: {exc}"[:200]


def precompile(jobs: list, workers: int = 12) -> None:
    """Compile choices in parallel processes (Triton compiles serially in one process); jobs are
    (K, N, choice, recipe: None for a bf16 base), N only changing the grid."""
    import multiprocessing as mp

    started = time.time()
    seen, unique = set(), []
    for job in jobs:
        if (job[0], job[2], job[3]) not in seen:
            seen.add((job[0], job[2], job[3]))
            unique.append(job)
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_compile_job, unique, chunksize=1)
    bad = [(j[0], j[1], j[2], r) for j, r in zip(unique, results) if r != "ok"]
    print(f"precompiled {len(unique)} kernels in {time.time() - started:.0f} s; failures: {bad}", flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] (K x N)."""
    return [tuple(map(int, shape.split("x"))) for shape in text.split(",")]


def parse_counts(text: str) -> list[int]:
    """Rows a slot: '64x1' (64 slots of one row), '1x32' (one slot of 32 rows), '1x256+63x1'."""
    counts = []
    for part in text.split("+"):
        slots, rows = map(int, part.split("x"))
        counts += [rows] * slots
    return counts
