"""Benchmark the multi-tenant 1-bit delta matmul on a CUDA GPU (H100 in the recorded results).

    PYTHONPATH=. python3 benchmarks/kernels.py [--out DIR] [--sweep] [--quick]

Measures, in one run: the two ceilings (device-to-device copy bandwidth, bf16 matmul rate);
decode latency for Llama-2-7B/70B linear shapes at batch 1..128 with all-distinct deltas and
with one shared delta, against (a) base only (cuBLAS), (b) dequantize each delta to a dense
matrix with PyTorch ops then matmul, (c) one dense weight per tenant, and (d) the floor (bytes
that must be read or written / measured copy bandwidth), beside the time of a kernel that only
reads the case's weight bytes (what any single pass needs in this harness); the paper's two ablations (hidden size
at batch 1, batch size at 4096x4096); prefill throughput. Writes kernels.json and kernels.md to
--out (default benchmarks/results) and prints the tables. --sweep also times kernel variants
(fused/split base, dot/FMA, column block) to back the dispatcher's choices.

Timing: decode calls are captured in a CUDA graph of R calls over R distinct buffer sets (so
launch gaps vanish and no call reads another's weights from L2), replayed under
triton.testing.do_bench (median; it flushes L2 before each replay). Inputs are random, never zeros.
Shapes are written K x N (in_features x out_features), as in the paper's tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.report import write_report
from bitdelta.kernels import sm_count
from bitdelta.kernels.configs import KernelConfig, choose_config
from bitdelta.kernels.grouping import SlotPlan, build_plan
from bitdelta.kernels.triton_segments import segment_matmul
from bitdelta.pack import unpack_signs

DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 3 * L2_BYTES  # bytes a graph's calls touch, at least: each call sees a cold L2
DENSE_POOL_BYTES = 6 * 2**30  # memory for baseline (c)'s per-tenant weights
DECODE_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]
DECODE_BATCHES = [1, 4, 16, 32, 64, 128]
GOAL_BATCHES = [1, 4, 16, 32, 64]
STREAM_WORDS = 4096  # int32 words a pure-read program takes per step: 16 KB
STREAM_GRIDS = ((2, 8), (4, 4), (8, 4), (16, 4))  # (programs an SM, warps) of the pure reads
PREFILL_CASES = ([(4096, 4096), (4096, 11008)], [512, 1024, 2048, 4096, 8192], [1, 4, 32])  # shapes, tokens, deltas


def bench_ms(fn, rep: int = 60) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def graph_us(calls: list) -> float:
    """Median microseconds per call of a CUDA graph running `calls` back to back."""
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


# ----------------------------------------------------------------------------------------- ceilings
def measure_ceilings() -> dict:
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), rep=200)
    copy_bw = 2 * src.numel() * 2 / (copy_ms * 1e-3)  # bytes read + bytes written
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    mm_ms = bench_ms(lambda: a @ b, rep=300)
    return {"copy_bandwidth_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


# --------------------------------------------------------------------------------------- problems
def _slot_ids(batch: int, distinct: bool, rows_per_slot: int = 1) -> torch.Tensor:
    return torch.arange(batch) // rows_per_slot if distinct else torch.zeros(batch, dtype=torch.long)


class Problem:
    """R buffer sets for one (K, N, batch, distinct deltas) decode case; with rows_per_slot > 1 the
    distinct case gives each delta that many rows (batch / rows_per_slot deltas)."""

    def __init__(self, k: int, n: int, batch: int, distinct: bool, rows_per_slot: int = 1):
        self.k, self.n, self.batch = k, n, batch
        self.num_slots = batch // rows_per_slot if distinct else 1
        self.kw = (k + 31) // 32
        self.slot_ids = _slot_ids(batch, distinct, rows_per_slot).cuda()
        self.plan: SlotPlan = build_plan(self.slot_ids)
        self.bytes = self.floor_bytes()
        reps = max(1, min(8, math.ceil(ROTATE_BYTES / self.bytes)))
        self.sets = [self._make_set() for _ in range(reps)]

    def _make_set(self) -> dict:
        k, n, s = self.k, self.n, self.num_slots
        return {
            "x": torch.randn(self.batch, k, device="cuda", dtype=DTYPE),
            "w": (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE),
            "signs": torch.randint(-(2**31), 2**31 - 1, (s, n, self.kw), dtype=torch.int32, device="cuda"),
            "scales": torch.rand(s, n, device="cuda") * 1e-3,
        }

    def floor_bytes(self) -> int:
        """Base once + each distinct delta's bits once + scales + x read + y written."""
        n, k, s, b = self.n, self.k, self.num_slots, self.batch
        return n * k * 2 + s * n * self.kw * 4 + s * n * 4 + b * k * 2 + b * n * 2

    def ours_us(self, config: KernelConfig | None = None) -> float:
        config = config or choose_config(self.n, self.plan, k=self.k)
        return graph_us([lambda d=d: segment_matmul(d["x"], d["w"], d["signs"], d["scales"], self.plan, None, config)
                         for d in self.sets])

    def stream_us(self, programs: int, warps: int, base: bool = True) -> float:
        """A kernel that only reads the case's weight bytes, the base's (unless base=False) and every
        distinct delta's bits, summing them so the loads stay: `programs` programs stream in turn."""
        out = torch.empty(programs, dtype=torch.int32, device="cuda")

        def call(d: dict) -> None:
            a = d["w"].view(torch.int32).reshape(-1) if base else out[:0]
            b = d["signs"].reshape(-1)
            _stream_kernel[(programs,)](a, a.numel(), b, b.numel(), out, BLOCK=STREAM_WORDS, num_warps=warps)

        return graph_us([lambda d=d: call(d) for d in self.sets])

    def read_us(self, base: bool = True) -> float:
        """The fastest of `stream_us` over STREAM_GRIDS: how fast any single pass over the case's weight
        bytes can go in this harness (KERNEL_NOTES 8d, 13c)."""
        sms = sm_count(torch.cuda.current_device())
        return min(self.stream_us(per_sm * sms, warps, base) for per_sm, warps in STREAM_GRIDS)

    def base_us(self) -> float:
        return graph_us([lambda d=d: d["x"] @ d["w"].t() for d in self.sets])

    def dequant_us(self) -> float:
        """(b): per distinct slot, W = base + scale * unpack(bits) in PyTorch ops, then a matmul."""
        d = self.sets[0]
        groups = [(slot, self.plan.order[start:start + count].long())
                  for slot, start, count in zip(self.plan.host_slots, self.plan.offsets.tolist(), self.plan.counts)]

        def call():
            y = torch.empty(self.batch, self.n, device="cuda", dtype=DTYPE)
            for slot, rows in groups:
                weight = (d["w"].float() + d["scales"][slot][:, None] * unpack_signs(d["signs"][slot], self.k)).to(DTYPE)
                y[rows] = d["x"][rows] @ weight.t()
            return y

        return bench_ms(call, rep=40) * 1e3  # ms-scale per call: no graph needed; do_bench flushes L2

    def dense_us(self) -> float:
        """(c): every tenant has its own dense weight (what serving separate fine-tunes costs)."""
        weight_bytes = self.n * self.k * 2
        pool_size = max(1, min(self.num_slots * len(self.sets), DENSE_POOL_BYTES // weight_bytes))
        pool = [(torch.randn(self.n, self.k, device="cuda") * 0.02).to(DTYPE) for _ in range(pool_size)]
        groups = [self.plan.order[start:start + count].long()
                  for start, count in zip(self.plan.offsets.tolist(), self.plan.counts)]

        def call(r: int, d: dict) -> None:
            y = torch.empty(self.batch, self.n, device="cuda", dtype=DTYPE)
            for t, rows in enumerate(groups):
                y[rows] = d["x"][rows] @ pool[(r * len(groups) + t) % pool_size].t()

        us = graph_us([lambda r=r, d=d: call(r, d) for r, d in enumerate(self.sets)])
        del pool
        return us


# ----------------------------------------------------------------------------------------- suites
def decode_suite(bandwidth: float, shapes, batches, modes=(True, False)) -> list[dict]:
    """modes: True = every row its own delta, False = one delta shared by the batch."""
    rows = []
    for k, n in shapes:
        for distinct in modes:
            for batch in batches:
                p = Problem(k, n, batch, distinct)
                row = {"K": k, "N": n, "batch": batch, "deltas": "distinct" if distinct else "shared",
                       "config": choose_config(n, p.plan, k=k).__dict__, "floor_us": p.bytes / bandwidth * 1e6,
                       "ours_us": p.ours_us(), "base_us": p.base_us(), "dequant_us": p.dequant_us(),
                       "dense_us": p.dense_us(), "read_us": p.read_us()}
                row["ours_over_floor"] = row["ours_us"] / row["floor_us"]
                row["read_over_floor"] = row["read_us"] / row["floor_us"]
                row["ours_over_base"] = row["ours_us"] / row["base_us"]
                row["dequant_over_ours"] = row["dequant_us"] / row["ours_us"]
                rows.append(row)
                print(_fmt_decode(row), flush=True)
                del p
                torch.cuda.empty_cache()
    return rows


BITMMA_SHAPES = ((128, 256, 4, 4), (64, 512, 4, 4), (128, 512, 4, 3), (256, 512, 4, 3), (128, 1024, 4, 2),
                 (256, 1024, 8, 2))  # (BN, BK, warps, stages)


def _sweep_variants() -> dict:
    """Kernel variants timed per case by --sweep (round 5: the tensor-core delta kernel, v8 `bitmma`,
    against whatever the dispatcher picks, "auto")."""
    return {f"bitmma_bn{bn}_bk{bk}_w{warps}_s{stages}": KernelConfig(
                rows=8, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, fuse_base=False, bitmma=True)
            for bn, bk, warps, stages in BITMMA_SHAPES}


# (kind, batch, rows per delta): all-distinct decode and a few rows per delta
SWEEP_CASES = [("distinct4", 4, 1), ("distinct16", 16, 1), ("distinct32", 32, 1), ("distinct64", 64, 1),
               ("rows4x16", 64, 4), ("rows8x8", 64, 8)]


def _compile_job(job) -> str:
    """Run one (K, N, config) once on two distinct rows, so Triton's on-disk cache holds its binary."""
    k, n, cfg = job
    try:
        x = torch.randn(2, k, device="cuda", dtype=DTYPE)
        w = torch.randn(n, k, device="cuda", dtype=DTYPE)
        signs = torch.randint(-(2**31), 2**31 - 1, (2, n, (k + 31) // 32), dtype=torch.int32, device="cuda")
        scales = torch.rand(2, n, device="cuda")
        segment_matmul(x, w, signs, scales, build_plan(torch.arange(2, device="cuda")), None, cfg)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # reported by the sweep itself
        return f"{type(exc).__name__}: {exc}"[:200]


def precompile(jobs: list, workers: int = 12) -> None:
    """Compile the sweep's kernels in parallel processes (Triton compiles serially in one process)."""
    import multiprocessing as mp
    started = time.time()
    seen, unique = set(), []
    for job in jobs:
        key = (job[0], job[2])  # N only changes the launch grid (every N here is a multiple of 16)
        if key not in seen:
            seen.add(key)
            unique.append(job)
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_compile_job, unique, chunksize=1)
    bad = [(j[0], j[1], j[2], r) for j, r in zip(unique, results) if r != "ok"]
    print(f"precompiled {len(unique)} kernels in {time.time() - started:.0f} s; failures: {bad}", flush=True)


def _sweep_error(p: "Problem", cfg: KernelConfig) -> float:
    d = p.sets[0]
    out = torch.full((p.batch, p.n), float("nan"), device="cuda", dtype=DTYPE)
    segment_matmul(d["x"], d["w"], d["signs"], d["scales"], p.plan, None, cfg, out=out)
    return relative_error(p, out)


def relative_error(p: "Problem", out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| for an output computed on p's first buffer set (inf if not finite)."""
    from bitdelta.kernels import reference

    d = p.sets[0]
    if getattr(p, "ref", None) is None:
        p.ref = reference.bitdelta_matmul(d["x"].float(), d["w"], d["signs"], d["scales"], p.slot_ids, None)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - p.ref).norm() / p.ref.norm()).item()


def time_checked(p: "Problem", configs: dict) -> tuple[dict, dict]:
    """Median us of each named config on `p`, each checked against the reference first: NaN where the
    relative error is 6e-3 or more, or where the config fails (its message printed and kept as its
    error, so the other configs still run). Returns (times, errors)."""
    times, errors = {}, {}
    for name, cfg in configs.items():
        try:
            errors[name] = _sweep_error(p, cfg)
            times[name] = p.ours_us(cfg) if errors[name] < 6e-3 else float("nan")
        except Exception as exc:  # reported, not fatal
            errors[name], times[name] = f"{type(exc).__name__}: {exc}"[:200], float("nan")
            print(f"{name}: {errors[name]}")
    return times, errors


def write_results(out: str, name: str, rows: list | dict) -> None:
    """rows as JSON to out/name (nothing when out is empty)."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(rows, indent=1))


def compare_configs(cases: list, variants, out: str, name: str, shapes=DECODE_SHAPES) -> None:
    """For every shape and case (batch, distinct deltas[, rows per delta]): the floor, cuBLAS's base
    product, the dispatched config ("auto") and variants(plan, auto), timed side by side
    (`time_checked`) after compiling them all in parallel; a markdown table on stdout, the rows as
    JSON to out/name."""
    cases = [(case + (1,))[:3] for case in cases]

    def configs_for(k: int, n: int, batch: int, distinct: bool, per_slot: int) -> dict:
        plan = build_plan(_slot_ids(batch, distinct, per_slot))
        auto = choose_config(n, plan, k=k)
        return {"auto": auto, **variants(plan, auto)}

    precompile([(k, n, cfg) for k, n in shapes for case in cases for cfg in configs_for(k, n, *case).values()])
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    rows = []
    for k, n in shapes:
        for batch, distinct, per_slot in cases:
            p = Problem(k, n, batch, distinct, per_slot)
            times, _ = time_checked(p, configs_for(k, n, batch, distinct, per_slot))
            floor_us, base_us = p.bytes / bandwidth * 1e6, p.base_us()
            if not rows:
                print("| KxN | rows | deltas | floor | base | " + " | ".join(times) + " |")
                print("|---" * (len(times) + 5) + "|")
            rows.append({"K": k, "N": n, "batch": batch, "deltas": p.num_slots, "floor_us": floor_us,
                         "base_us": base_us, "times_us": times})
            print(f"| {k}x{n} | {batch} | {p.num_slots} | {floor_us:.1f} | {base_us:.1f} | "
                  + " | ".join(f"{t:.1f}" for t in times.values()) + " |", flush=True)
            del p
            torch.cuda.empty_cache()
    write_results(out, name, rows)


def compare_configs_main(cases: list, variants, name: str, shapes=DECODE_SHAPES) -> None:
    """A sweep script's command line: `--out DIR` (JSON to DIR/name; none without it) and
    `--shapes KxN,...` (default `shapes`), then `compare_configs`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--shapes", default="",
                        help="KxN,KxN,... (default: " + ",".join(f"{k}x{n}" for k, n in shapes) + ")")
    args = parser.parse_args()
    compare_configs(cases, variants, args.out, name, parse_shapes(args.shapes) if args.shapes else shapes)


def sweep_suite(bandwidth: float, shapes) -> list[dict]:
    """Time kernel variants per case (each checked against the reference first), to pick the
    dispatcher's thresholds."""
    out = []
    jobs = []
    for k, n in shapes:
        for kind, batch, per_slot in SWEEP_CASES:
            plan = build_plan(_slot_ids(batch, True, per_slot))
            for cfg in [choose_config(n, plan, k=k), *_sweep_variants().values()]:
                if not cfg.gemv:
                    jobs.append((k, n, cfg))
    precompile(jobs)
    for k, n in shapes:
        for kind, batch, per_slot in SWEEP_CASES:
            p = Problem(k, n, batch, True, per_slot)
            variants = {"auto": choose_config(n, p.plan, k=k), **_sweep_variants()}
            times, errors = {}, {}
            for name, cfg in variants.items():
                try:
                    errors[name] = _sweep_error(p, cfg)
                    if errors[name] > 6e-3:
                        times[name] = f"wrong: rel err {errors[name]:.2e}"
                        continue
                    times[name] = p.ours_us(cfg)
                except Exception as exc:  # a variant that fails to compile is reported, not fatal
                    times[name] = f"error: {type(exc).__name__}: {exc}"[:200]
            numeric = {name: t for name, t in times.items() if isinstance(t, float)}
            bad = {name: t for name, t in times.items() if not isinstance(t, float)}
            best = min(numeric, key=numeric.get) if numeric else None
            out.append({"K": k, "N": n, "batch": batch, "deltas": p.num_slots, "kind": kind,
                        "floor_us": p.bytes / bandwidth * 1e6, "base_us": p.base_us(), "times_us": times,
                        "errors": errors, "best": best})
            print(f"sweep {k}x{n} {kind:<10} floor={out[-1]['floor_us']:7.1f} "
                  f"base={out[-1]['base_us']:7.1f} best={best} {numeric.get(best, float('nan')):7.1f} | "
                  + " ".join(f"{name}={t:.1f}" for name, t in numeric.items()) + (f" BAD {bad}" if bad else ""),
                  flush=True)
            del p
            torch.cuda.empty_cache()
    return out


def launch_variants(case: str) -> None:
    """Run each sweep variant twice on one case, untimed: the workload for a profiler
    (`ncu --kernel-name regex:bitmma ... python3 benchmarks/kernels.py --launch-only 4096x4096x64`)."""
    k, n, batch = map(int, case.split("x"))
    p = Problem(k, n, batch, True)
    d = p.sets[0]
    for cfg in _sweep_variants().values():
        for _ in range(2):
            segment_matmul(d["x"], d["w"], d["signs"], d["scales"], p.plan, None, cfg)
    torch.cuda.synchronize()


def prefill_suite(shapes, tokens_list, deltas_list) -> list[dict]:
    """TFLOP/s of ours and of cuBLAS's base product alone, timed two ways: in a CUDA graph (the GPU's
    throughput, as decode is timed) and eagerly, launch by launch from Python (what an eager
    prefill also pays in host overhead where the GPU work is short)."""
    rows = []
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE)
        for tokens in tokens_list:
            x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
            base_graph_us = graph_us([lambda: x @ w.t()])  # first: its warm-up calls keep compiles out of do_bench
            base_ms = bench_ms(lambda: x @ w.t())
            for deltas in deltas_list:
                signs = torch.randint(-(2**31), 2**31 - 1, (deltas, n, (k + 31) // 32), dtype=torch.int32, device="cuda")
                scales = torch.rand(deltas, n, device="cuda") * 1e-3
                # each request's tokens are contiguous, as in a prefill batch
                slot_ids = torch.arange(tokens, device="cuda") * deltas // tokens
                plan = build_plan(slot_ids)

                def call():
                    return segment_matmul(x, w, signs, scales, plan, None, choose_config(n, plan, k=k))

                ours_graph_us = graph_us([call])
                ms = bench_ms(call)
                tflop = 2 * tokens * n * k / 1e12
                rows.append({"K": k, "N": n, "tokens": tokens, "deltas": deltas,
                             "config": choose_config(n, plan, k=k).__dict__, "ours_ms": ms,
                             "ours_TFLOPs": tflop / (ours_graph_us * 1e-6), "base_TFLOPs": tflop / (base_graph_us * 1e-6),
                             "ours_eager_TFLOPs": tflop / (ms * 1e-3), "base_eager_TFLOPs": tflop / (base_ms * 1e-3)})
                r = rows[-1]
                print(f"prefill {k}x{n} tokens={tokens:<5} deltas={deltas:<3} ours={r['ours_TFLOPs']:6.1f} TFLOP/s "
                      f"(eager {r['ours_eager_TFLOPs']:6.1f}) base(cuBLAS, no delta)={r['base_TFLOPs']:6.1f} "
                      f"(eager {r['base_eager_TFLOPs']:6.1f})", flush=True)
        del w
    return rows


# ---------------------------------------------------------------------------------------- reports
def _fmt_decode(r: dict) -> str:
    extra = f" (b)={r['dequant_us']:9.1f} (c)={r['dense_us']:8.1f} (b)/ours={r['dequant_over_ours']:6.1f}"
    return (f"{r['K']:>5}x{r['N']:<5} {r['deltas']:>8} b={r['batch']:<3} ours={r['ours_us']:7.1f} "
            f"base={r['base_us']:6.1f} floor={r['floor_us']:6.1f} ours/floor={r['ours_over_floor']:4.2f} "
            f"ours/base={r['ours_over_base']:4.2f} read/floor={r['read_over_floor']:4.2f}" + extra)


def goals(decode: list[dict]) -> dict:
    in_range = [r for r in decode if r["batch"] in GOAL_BATCHES]
    b32 = [r for r in decode if r["batch"] == 32 and r["deltas"] == "distinct"]
    return {
        "max_ours_over_floor_batch_1_to_64": max(r["ours_over_floor"] for r in in_range),
        "cases_within_1.3x_floor": f"{sum(r['ours_over_floor'] <= 1.3 for r in in_range)}/{len(in_range)}",
        "cases_a_pure_read_of_the_bytes_puts_above_1.3x": [
            f"{r['K']}x{r['N']} {r['deltas']} {r['batch']}: {r['read_over_floor']:.2f}"
            for r in in_range if r["read_over_floor"] > 1.3],
        "min_dequant_over_ours": min(r["dequant_over_ours"] for r in decode),
        "distinct_batch32_ours_over_base": {f"{r['K']}x{r['N']}": r["ours_over_base"] for r in b32},
        "distinct_batch32_floor_over_base": {f"{r['K']}x{r['N']}": r["floor_us"] / r["base_us"] for r in b32},
    }


def markdown(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"# Kernel benchmark ({result['device']})", "",
             f"Ceilings: copy {c['copy_bandwidth_GBps']:.0f} GB/s (read + write), bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
             "Shapes are K x N. Times in microseconds (median, CUDA graph, cold L2). (a) base only, cuBLAS;"
             " (b) dequantize with PyTorch ops + matmul; (c) dense weight per tenant; floor = bytes / copy bandwidth;"
             " read = a kernel that only reads the base and the distinct deltas' bits (best of 2-16 programs an SM).", "",
             "## Decode", "",
             "| shape | deltas | batch | ours | (a) base | (b) dequant | (c) dense | floor | read | ours/floor | read/floor "
             "| ours/base | (b)/ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['deltas']} | {r['batch']} | {r['ours_us']:.1f} | {r['base_us']:.1f} | "
                     f"{r['dequant_us']:.1f} | {r['dense_us']:.1f} | {r['floor_us']:.1f} | {r['read_us']:.1f} | "
                     f"{r['ours_over_floor']:.2f} | {r['read_over_floor']:.2f} | {r['ours_over_base']:.2f} | "
                     f"{r['dequant_over_ours']:.1f} |")
    lines += ["", "## Ablation: hidden size (d x d) at batch 1", "",
              "| d | ours | (a) base | (b) dequant | floor | ours/floor |", "|---|---|---|---|---|---|"]
    for r in result["ablation_hidden"]:
        lines.append(f"| {r['K']} | {r['ours_us']:.1f} | {r['base_us']:.1f} | {r['dequant_us']:.1f} | {r['floor_us']:.1f} | {r['ours_over_floor']:.2f} |")
    lines += ["", "## Ablation: batch size at 4096x4096 (distinct deltas)", "",
              "| batch | ours | (a) base | (b) dequant | (c) dense | floor | ours/floor |", "|---|---|---|---|---|---|---|"]
    for r in result["ablation_batch"]:
        lines.append(f"| {r['batch']} | {r['ours_us']:.1f} | {r['base_us']:.1f} | {r['dequant_us']:.1f} | {r['dense_us']:.1f} | "
                     f"{r['floor_us']:.1f} | {r['ours_over_floor']:.2f} |")
    lines += ["", "## Prefill (TFLOP/s counted as 2*tokens*N*K; CUDA graph, and eager launches from Python)", "",
              "| shape | tokens | deltas | ours TFLOP/s | cuBLAS base only TFLOP/s | ours eager | cuBLAS eager |",
              "|---|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {r['deltas']} | {r['ours_TFLOPs']:.0f} | {r['base_TFLOPs']:.0f} | "
                     f"{r['ours_eager_TFLOPs']:.0f} | {r['base_eager_TFLOPs']:.0f} |")
    lines += ["", "## Goals", "", "```", json.dumps(result["goals"], indent=2), "```", ""]
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] (K x N)."""
    return [tuple(map(int, shape.split("x"))) for shape in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true", help="also time kernel variants")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    parser.add_argument("--sweep-only", action="store_true", help="ceilings and the variant sweep only")
    parser.add_argument("--sweep-shapes", default="", help="KxN,KxN,... (default: every decode shape)")
    parser.add_argument("--launch-only", default="", help="KxNxB: run the sweep variants once each (for ncu)")
    parser.add_argument("--prefill-only", action="store_true", help="the prefill suite alone, to out/kernels_prefill.json")
    parser.add_argument("--decode-shapes", default="",
                        help="KxN,...: the decode suite alone at batches 1..64 on these shapes, to out/kernels_decode_shapes.json "
                             "(e.g. the engine's stacked q/k/v and gate/up of a 7B model: 4096x12288,4096x22016)")
    args = parser.parse_args()
    if args.launch_only:
        launch_variants(args.launch_only)
        return
    torch.manual_seed(int(time.time()))
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": str(DTYPE), "shape_convention": "K x N (in x out features)"}
    result["ceilings"] = measure_ceilings()
    bandwidth = result["ceilings"]["copy_bandwidth_GBps"] * 1e9
    print(json.dumps(result), flush=True)
    if args.prefill_only:
        write_results(args.out, "kernels_prefill.json", prefill_suite(*PREFILL_CASES))
        return
    if args.decode_shapes:
        write_results(args.out, "kernels_decode_shapes.json",
                      [result, *decode_suite(bandwidth, parse_shapes(args.decode_shapes), GOAL_BATCHES)])
        return
    shapes = DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES
    if args.sweep or args.sweep_only:
        sweep_shapes = parse_shapes(args.sweep_shapes) if args.sweep_shapes else shapes
        result["sweep"] = sweep_suite(bandwidth, sweep_shapes)
    if args.sweep_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels_sweep.json").write_text(json.dumps(result, indent=1))
        return
    result["decode"] = decode_suite(bandwidth, shapes, DECODE_BATCHES)
    result["ablation_hidden"] = decode_suite(bandwidth, [(d, d) for d in (1024, 2048, 4096, 8192, 16384)], [1], modes=(True,))
    result["ablation_batch"] = decode_suite(bandwidth, [(4096, 4096)], [2, 8], modes=(True,)) + \
        [r for r in result["decode"] if (r["K"], r["N"]) == (4096, 4096) and r["deltas"] == "distinct"]
    result["ablation_batch"].sort(key=lambda r: r["batch"])
    result["prefill"] = prefill_suite(*PREFILL_CASES)
    result["goals"] = goals(result["decode"])
    result["seconds"] = time.time() - started
    write_report(Path(args.out), "kernels", result, markdown(result))
    print(f"median ours/floor over batch 1..64: "
          f"{statistics.median(r['ours_over_floor'] for r in result['decode'] if r['batch'] in GOAL_BATCHES):.2f}")


if __name__ == "__main__":
    main()
