"""All-distinct decode (every row its own delta slot): the dispatched delta path against v8
variants, each checked against the reference first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_decode_sweep.py [--out DIR]     (H100; KERNEL_NOTES.md rounds 6, 7)

--auto-only times the dispatched path alone (run it with an older tree's `bitdelta` first on
PYTHONPATH for a before/after in one device call); --precompile-only fills Triton's cache and exits
(run it for both trees, beside the GPU tests, before timing anything).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels import DECODE_SHAPES, Problem, measure_ceilings, precompile, time_checked, write_results
from bitdelta.kernels.configs import KernelConfig, choose_config
from bitdelta.kernels.grouping import build_plan

BATCHES = [4, 16, 32, 64]


def variants() -> dict:
    """v9 (one-row tiles on the int8 tensor cores; KERNEL_NOTES.md round 7) at several tile shapes,
    besides the dispatched path."""
    return {f"{bn}x{bk}s{stages}": KernelConfig(rows=1, block_n=bn, block_k=bk, num_warps=4, num_stages=stages,
                                                fuse_base=False, bitmma=True)
            for bn, bk, stages in ((256, 512, 3), (128, 1024, 3), (128, 1024, 2), (128, 1024, 4), (256, 1024, 2),
                                   (64, 1024, 3))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--auto-only", action="store_true")
    parser.add_argument("--precompile-only", action="store_true")
    args = parser.parse_args()
    extra = {} if args.auto_only else variants()

    def configs_for(n: int, k: int, plan) -> dict:
        return {"auto": choose_config(n, plan, k=k), **extra}

    jobs = [(k, n, cfg) for k, n in DECODE_SHAPES for b in BATCHES
            for cfg in configs_for(n, k, build_plan(torch.arange(b))).values()]
    precompile(jobs)
    if args.precompile_only:
        return
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    names = list(configs_for(4096, 4096, build_plan(torch.arange(4))))
    rows = []
    print("| KxN | b | floor | " + " | ".join(names) + " | best/floor (auto/floor) |")
    print("|---" * (len(names) + 4) + "|")
    for k, n in DECODE_SHAPES:
        for batch in BATCHES:
            problem = Problem(k, n, batch, True)
            floor_us = problem.bytes / bandwidth * 1e6
            times, errors = time_checked(problem, configs_for(n, k, problem.plan))
            best = min((t for t in times.values() if t == t), default=float("nan"))
            rows.append({"K": k, "N": n, "batch": batch, "floor_us": floor_us, "times_us": times, "errors": errors})
            print(f"| {k}x{n} | {batch} | {floor_us:.1f} | " + " | ".join(f"{times[m]:.1f}" for m in names)
                  + f" | {best / floor_us:.2f} ({times['auto'] / floor_us:.2f}) |", flush=True)
            del problem
            torch.cuda.empty_cache()
    write_results(args.out, f"kernels_decode_sweep{'_auto' if args.auto_only else ''}.json", rows)


if __name__ == "__main__":
    main()
