"""The kernel table: the multi-tenant 1-bit delta matmul against its baselines and its floor (CUDA).

    python -m benchmarks.kernels [--out benchmarks/results] [--quick]

Measures, in one run: the two ceilings (device-to-device copy bandwidth, bf16 matmul rate);
decode latency for Llama-2-7B/70B linear shapes at batch 1..128 with all-distinct deltas and with
one shared delta, against (a) base only (cuBLAS), (b) dequantize each delta to a dense matrix with
PyTorch ops then matmul, (c) one dense weight per tenant, batched LoRA at rank 16 and 128 (each row
its own adapter, one per delta slot: the S-LoRA / BGMV baseline, `lora_baseline.py`), the floor
(bytes that must be read or written / copy bandwidth) and a kernel that only reads the case's
weight bytes; the paper's two ablations (hidden size at batch 1, batch size at 4096x4096); prefill
throughput with LoRA r16 beside it. Writes kernels.json and kernels.md to --out and prints the
tables. Timing: `benchmarks/harness.py` (CUDA graphs over rotating buffer sets, cold L2).
Shapes are K x N (in_features x out_features), as in the paper's tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton

from benchmarks.harness import (DECODE_SHAPES, DTYPE, Problem, bench_ms, build_plan, dispatched_choice, graph_us,
                                measure_ceilings, tiles_of)
from benchmarks.lora_baseline import lora_groups, lora_linear
from benchmarks.report import write_report
from bitdelta.kernels import bitdelta_matmul

DECODE_BATCHES = [1, 4, 16, 32, 64, 128]
GOAL_BATCHES = [1, 4, 16, 32, 64]
LORA_RANKS = (16, 128)
PREFILL_CASES = ([(4096, 4096), (4096, 11008)], [512, 1024, 2048, 4096, 8192], [1, 4, 32])  # shapes, tokens, deltas


def decode_suite(bandwidth: float, shapes, batches, modes=(True, False)) -> list[dict]:
    """modes: True = every row its own delta, False = one delta shared by the batch."""
    rows = []
    for k, n in shapes:
        for distinct in modes:
            for batch in batches:
                p = Problem.decode(k, n, batch, distinct)
                choice = p.dispatched_choice()
                row = {"K": k, "N": n, "batch": batch, "deltas": "distinct" if distinct else "shared",
                       "path": choice.path.name, "tiles": tiles_of(choice), "floor_us": p.bytes / bandwidth * 1e6,
                       "ours_us": p.ours_us(), "base_us": p.base_us(), "dequant_us": p.dequant_us(),
                       "dense_us": p.dense_us(), "read_us": p.read_us(),
                       **{f"lora_r{rank}_us": p.lora_us(rank) for rank in LORA_RANKS}}
                row["ours_over_floor"] = row["ours_us"] / row["floor_us"]
                row["read_over_floor"] = row["read_us"] / row["floor_us"]
                row["ours_over_base"] = row["ours_us"] / row["base_us"]
                row["dequant_over_ours"] = row["dequant_us"] / row["ours_us"]
                rows.append(row)
                print(_fmt_decode(row), flush=True)
                del p
                torch.cuda.empty_cache()
    return rows


def prefill_suite(shapes, tokens_list, deltas_list) -> list[dict]:
    """TFLOP/s of ours, of cuBLAS's base product alone and of batched LoRA r16, in a CUDA graph (the
    GPU's throughput, as decode is timed) and, for ours and the base, eagerly, launch by launch from
    Python (what an eager prefill also pays in host time where the GPU work is short)."""
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
                a = (torch.randn(deltas, 16, k, device="cuda") * 0.02).to(DTYPE)
                b = (torch.randn(deltas, n, 16, device="cuda") * 0.02).to(DTYPE)
                groups = lora_groups(slot_ids.tolist(), deltas, "cuda")

                def call():
                    return bitdelta_matmul(x, w, signs, scales, slot_ids, plan=plan)

                ours_graph_us = graph_us([call])
                ms = bench_ms(call)
                lora_graph_us = graph_us([lambda: lora_linear(x, w, a, b, groups)])
                tflop = 2 * tokens * n * k / 1e12
                choice = dispatched_choice(n, k, plan)
                rows.append({"K": k, "N": n, "tokens": tokens, "deltas": deltas, "path": choice.path.name,
                             "tiles": tiles_of(choice), "ours_ms": ms,
                             "ours_TFLOPs": tflop / (ours_graph_us * 1e-6), "base_TFLOPs": tflop / (base_graph_us * 1e-6),
                             "lora_r16_TFLOPs": tflop / (lora_graph_us * 1e-6),
                             "ours_eager_TFLOPs": tflop / (ms * 1e-3), "base_eager_TFLOPs": tflop / (base_ms * 1e-3)})
                r = rows[-1]
                print(f"prefill {k}x{n} tokens={tokens:<5} deltas={deltas:<3} ours={r['ours_TFLOPs']:6.1f} TFLOP/s "
                      f"(eager {r['ours_eager_TFLOPs']:6.1f}) base={r['base_TFLOPs']:6.1f} (eager {r['base_eager_TFLOPs']:6.1f}) "
                      f"LoRA r16={r['lora_r16_TFLOPs']:6.1f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- reports
def _fmt_decode(r: dict) -> str:
    return (f"{r['K']:>5}x{r['N']:<5} {r['deltas']:>8} b={r['batch']:<3} {r['path']:<12} ours={r['ours_us']:7.1f} "
            f"base={r['base_us']:6.1f} LoRA r16={r['lora_r16_us']:7.1f} r128={r['lora_r128_us']:7.1f} "
            f"floor={r['floor_us']:6.1f} ours/floor={r['ours_over_floor']:4.2f} read/floor={r['read_over_floor']:4.2f} "
            f"(b)={r['dequant_us']:9.1f} (c)={r['dense_us']:8.1f}")


def goals(decode: list[dict]) -> dict:
    in_range = [r for r in decode if r["batch"] in GOAL_BATCHES]
    b32 = [r for r in decode if r["batch"] == 32 and r["deltas"] == "distinct"]
    out = {
        "max_ours_over_floor_batch_1_to_64": max(r["ours_over_floor"] for r in in_range),
        "cases_within_1.3x_floor": f"{sum(r['ours_over_floor'] <= 1.3 for r in in_range)}/{len(in_range)}",
        "cases_a_pure_read_of_the_bytes_puts_above_1.3x": [
            f"{r['K']}x{r['N']} {r['deltas']} {r['batch']}: {r['read_over_floor']:.2f}"
            for r in in_range if r["read_over_floor"] > 1.3],
        "min_dequant_over_ours": min(r["dequant_over_ours"] for r in decode),
        "distinct_batch32_ours_over_base": {f"{r['K']}x{r['N']}": r["ours_over_base"] for r in b32},
        "distinct_batch32_floor_over_base": {f"{r['K']}x{r['N']}": r["floor_us"] / r["base_us"] for r in b32},
    }
    for rank in LORA_RANKS:
        key = f"lora_r{rank}_us"
        out[f"cases_faster_than_lora_r{rank}_batch_1_to_64"] = f"{sum(r['ours_us'] < r[key] for r in in_range)}/{len(in_range)}"
        out[f"distinct_batch32_ours_over_lora_r{rank}"] = {f"{r['K']}x{r['N']}": r["ours_us"] / r[key] for r in b32}
    return out


def markdown(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"# Kernel benchmark ({result['device']})", "",
             f"`python -m benchmarks.kernels`. Ceilings: copy {c['copy_bandwidth_GBps']:.0f} GB/s (read + write), "
             f"bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
             "Shapes are K x N. Times in microseconds (median, CUDA graph, cold L2). path: the kernel path the dispatcher"
             " chose (docs/kernels.md). (a) base only, cuBLAS; (b) dequantize with PyTorch ops + matmul; (c) dense weight per"
             " tenant; LoRA rN: the base product plus each row's own rank-N adapter (one per delta slot) as two batched"
             " matmuls over the rows grouped by adapter (benchmarks/lora_baseline.py: what a BGMV kernel reads);"
             " floor = bytes / copy bandwidth; read = a kernel that only reads the base and the distinct deltas' bits"
             " (best of 2-16 programs an SM).", "",
             "## Decode", "",
             "| shape | deltas | batch | path | ours | (a) base | LoRA r16 | LoRA r128 | (b) dequant | (c) dense | floor | read "
             "| ours/floor | read/floor | ours/base | (b)/ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['deltas']} | {r['batch']} | {r['path']} | {r['ours_us']:.1f} | "
                     f"{r['base_us']:.1f} | {r['lora_r16_us']:.1f} | {r['lora_r128_us']:.1f} | {r['dequant_us']:.1f} | "
                     f"{r['dense_us']:.1f} | {r['floor_us']:.1f} | {r['read_us']:.1f} | {r['ours_over_floor']:.2f} | "
                     f"{r['read_over_floor']:.2f} | {r['ours_over_base']:.2f} | {r['dequant_over_ours']:.1f} |")
    lines += ["", "## Ablation: hidden size (d x d) at batch 1", "",
              "| d | ours | (a) base | LoRA r16 | LoRA r128 | (b) dequant | floor | ours/floor |", "|---|---|---|---|---|---|---|---|"]
    for r in result["ablation_hidden"]:
        lines.append(f"| {r['K']} | {r['ours_us']:.1f} | {r['base_us']:.1f} | {r['lora_r16_us']:.1f} | {r['lora_r128_us']:.1f} | "
                     f"{r['dequant_us']:.1f} | {r['floor_us']:.1f} | {r['ours_over_floor']:.2f} |")
    lines += ["", "## Ablation: batch size at 4096x4096 (distinct deltas)", "",
              "| batch | ours | (a) base | LoRA r16 | LoRA r128 | (b) dequant | (c) dense | floor | ours/floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["ablation_batch"]:
        lines.append(f"| {r['batch']} | {r['ours_us']:.1f} | {r['base_us']:.1f} | {r['lora_r16_us']:.1f} | {r['lora_r128_us']:.1f} | "
                     f"{r['dequant_us']:.1f} | {r['dense_us']:.1f} | {r['floor_us']:.1f} | {r['ours_over_floor']:.2f} |")
    lines += ["", "## Prefill (TFLOP/s counted as 2*tokens*N*K; CUDA graph, and eager launches from Python)", "",
              "| shape | tokens | deltas | path | ours | cuBLAS base only | LoRA r16 | ours eager | cuBLAS eager |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {r['deltas']} | {r['path']} | {r['ours_TFLOPs']:.0f} | "
                     f"{r['base_TFLOPs']:.0f} | {r['lora_r16_TFLOPs']:.0f} | {r['ours_eager_TFLOPs']:.0f} | {r['base_eager_TFLOPs']:.0f} |")
    lines += ["", "## Goals", "", "```", json.dumps(result["goals"], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="one shape, no ablations or prefill (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(int(time.time()))
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": str(DTYPE), "shape_convention": "K x N (in x out features)"}
    result["ceilings"] = measure_ceilings()
    bandwidth = result["ceilings"]["copy_bandwidth_GBps"] * 1e9
    print(json.dumps(result), flush=True)
    result["decode"] = decode_suite(bandwidth, DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES, DECODE_BATCHES)
    result["ablation_hidden"] = [] if args.quick else decode_suite(
        bandwidth, [(d, d) for d in (1024, 2048, 4096, 8192, 16384)], [1], modes=(True,))
    result["ablation_batch"] = ([] if args.quick else decode_suite(bandwidth, [(4096, 4096)], [2, 8], modes=(True,))) + \
        [r for r in result["decode"] if (r["K"], r["N"]) == (4096, 4096) and r["deltas"] == "distinct"]
    result["ablation_batch"].sort(key=lambda r: r["batch"])
    result["prefill"] = [] if args.quick else prefill_suite(*PREFILL_CASES)
    result["goals"] = goals(result["decode"])
    result["seconds"] = time.time() - started
    write_report(args.out, "kernels", result, markdown(result))
    print(f"median ours/floor over batch 1..64: "
          f"{statistics.median(r['ours_over_floor'] for r in result['decode'] if r['batch'] in GOAL_BATCHES):.2f}")


if __name__ == "__main__":
    main()
