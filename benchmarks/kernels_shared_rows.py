"""One delta shared by 16..64 rows (a fine-tune under load) and by 512-2048 prompt tokens (prefill):
the dispatched path (one fused tl.dot pass over base and bits) against the same pass on merged
weights, split forms (cuBLAS base product, then the delta alone) and other fused tiles, each checked
against the reference first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_shared_rows.py [--out DIR]     (H100; KERNEL_NOTES.md round 7)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.kernels import DECODE_SHAPES, Problem, _sweep_error, measure_ceilings
from dataclasses import replace

from bitdelta.kernels.configs import KernelConfig, choose_config

BATCHES = [16, 32, 64, 512, 2048]


def variants(rows: int, auto: KernelConfig) -> dict:
    """The dispatched tile on merged weights; split forms read the bits once per tile of `rows` rows
    after cuBLAS's base product (v8 reads them once per 8 rows); fused forms at other tiles."""
    rows = min(rows, 128)
    return {
        "auto merged": replace(auto, merge=True),
        "split dot": KernelConfig(rows=rows, block_n=64, block_k=128, num_warps=4, num_stages=4, fuse_base=False),
        "split dot bn128": KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=8, num_stages=3, fuse_base=False),
        "split v8": KernelConfig(rows=8, block_n=256, block_k=512, num_warps=4, num_stages=3, fuse_base=False,
                                 bitmma=True),
        "fused bn64 bk64 w4": KernelConfig(rows=rows, block_n=64, block_k=64, num_warps=4, num_stages=4, fuse_base=True),
        "fused bn128 bk64 w8": KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=8, num_stages=3,
                                            fuse_base=True),
        "fused bn32 bk256 w4": KernelConfig(rows=rows, block_n=32, block_k=256, num_warps=4, num_stages=3,
                                            fuse_base=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    names = ["auto", *variants(16, KernelConfig(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=4,
                                                fuse_base=True))]
    print("| KxN | rows | floor | base | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 4) + "|")
    rows = []
    for k, n in DECODE_SHAPES:
        for batch in BATCHES:
            problem = Problem(k, n, batch, False)
            floor_us = problem.bytes / bandwidth * 1e6
            times = {}
            auto = choose_config(n, problem.plan, k=k)
            for name, cfg in {"auto": auto, **variants(batch, auto)}.items():
                try:
                    error = _sweep_error(problem, cfg)
                    times[name] = problem.ours_us(cfg) if error < 6e-3 else float("nan")
                except Exception as exc:  # reported, not fatal: the other variants still run
                    print(f"{name}: {type(exc).__name__}: {exc}"[:200])
                    times[name] = float("nan")
            base_us = problem.base_us()
            rows.append({"K": k, "N": n, "batch": batch, "floor_us": floor_us, "base_us": base_us, "times_us": times})
            print(f"| {k}x{n} | {batch} | {floor_us:.1f} | {base_us:.1f} | "
                  + " | ".join(f"{times[m]:.1f}" for m in names) + " |", flush=True)
            del problem
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels_shared_rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
