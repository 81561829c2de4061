"""Batches of 1-4 rows of one slot: the dispatched path against the fused CUDA-core gemv (v6) at
other tiles and software-pipelining depths, each checked against the reference first, graph-timed
side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_gemv_sweep.py [--out DIR]     (H100; KERNEL_NOTES.md round 7)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.kernels import DECODE_SHAPES, Problem, _sweep_error, measure_ceilings, precompile
from bitdelta.kernels.configs import KernelConfig, choose_config

CASES = [(1, True), (4, False)]  # (rows, distinct): one row; four rows of one shared delta


def variants(rows: int) -> dict:
    """gemv tiles: BLOCK_K = 256 x warps (the kernel's x layout), pipelined 1-3 deep."""
    return {f"bn{bn}w{warps}s{stages}": KernelConfig(rows=rows, block_n=bn, block_k=256 * warps, num_warps=warps,
                                                     num_stages=stages, fuse_base=True, gemv=True)
            for bn, warps in ((8, 2), (16, 4), (32, 4), (4, 2)) for stages in (1, 2, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    precompile([(k, n, cfg) for k, n in DECODE_SHAPES for rows, _ in CASES for cfg in variants(rows).values()])
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    names = ["auto", *variants(1)]
    print("| KxN | rows | floor | base | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 4) + "|")
    out = []
    for k, n in DECODE_SHAPES:
        for rows, distinct in CASES:
            problem = Problem(k, n, rows, distinct)
            floor_us = problem.bytes / bandwidth * 1e6
            times = {}
            for name, cfg in {"auto": choose_config(n, problem.plan, k=k), **variants(rows)}.items():
                try:
                    error = _sweep_error(problem, cfg)
                    times[name] = problem.ours_us(cfg) if error < 6e-3 else float("nan")
                except Exception as exc:  # reported, not fatal: the other variants still run
                    print(f"{name}: {type(exc).__name__}: {exc}"[:200])
                    times[name] = float("nan")
            base_us = problem.base_us()
            out.append({"K": k, "N": n, "rows": rows, "floor_us": floor_us, "base_us": base_us, "times_us": times})
            print(f"| {k}x{n} | {rows} | {floor_us:.1f} | {base_us:.1f} | "
                  + " | ".join(f"{times[m]:.1f}" for m in names) + " |", flush=True)
            del problem
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels_gemv_sweep.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
