"""Batches whose slots hold several rows each: decode mixes (a Zipf batch, 9..16 rows a slot) and
prefill over many deltas (32 deltas x 16..64 tokens). The dispatched path against v8 with tiles of
8, 16, 32 and 64 rows (bits expanded once per tile: taller tiles expand each weight for more rows)
at several (BN, BK, warps, stages), each checked against the reference first, graph-timed side by
side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_mixed_rows.py [--out DIR]     (H100; KERNEL_NOTES.md rounds 5b, 8)
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels import Problem, measure_ceilings, precompile, time_checked, write_results
from bitdelta.kernels.configs import KernelConfig, choose_config
from bitdelta.kernels.grouping import build_plan

ZIPF_64 = [14, 5, 5, 4, 4, 3, 3] + [2] * 6 + [1] * 14  # rows a slot of the e2e benchmark's Zipf(64) batch
CASES = {  # name: (rows a slot, as a list)
    "Zipf(64)": ZIPF_64,
    "4 x 16": [16] * 4,
    "7 x 9 + 1": [9] * 7 + [1],
    "32 x 16": [16] * 32,
    "32 x 32": [32] * 32,
    "32 x 64": [64] * 32,
}
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
V8_TILES = {8: [(256, 512, 4, 3)], 16: [(256, 512, 4, 3), (128, 512, 4, 3), (256, 256, 8, 3)],
            32: [(128, 256, 4, 3), (256, 256, 8, 3), (256, 512, 8, 2)],
            64: [(128, 256, 4, 2), (256, 256, 8, 2), (128, 256, 8, 3)]}  # rows: (BN, BK, warps, stages)


def variants(max_rows: int) -> dict:
    """v8 at every tile height up to the largest slot's (taller tiles only waste mma columns)."""
    return {f"v8 r{rows} {bn}x{bk}w{w}s{s}": KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=w,
                                                            num_stages=s, fuse_base=False, bitmma=True)
            for rows, tiles in V8_TILES.items() if rows // 2 < max_rows for bn, bk, w, s in tiles}


def case_slot_ids(counts: list[int]) -> torch.Tensor:
    """Slot ids with counts[s] rows of slot s, shuffled (a decode batch's rows come in any order)."""
    slot_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return slot_ids[torch.randperm(slot_ids.numel())]


def problem_for(k: int, n: int, counts: list[int]) -> Problem:
    batch = sum(counts)
    per_slot = max(1, batch // len(counts))
    p = Problem(k, n, batch, True, per_slot)  # enough slots' bits for the case (batch // per_slot >= its slots)
    p.slot_ids = case_slot_ids(counts).cuda()
    p.plan = build_plan(p.slot_ids)
    p.num_slots = len(counts)
    p.bytes = p.floor_bytes()
    return p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    def configs_for(k: int, n: int, plan) -> dict:
        return {"auto": choose_config(n, plan, k=k), **variants(plan.max_rows)}

    precompile([(k, n, cfg) for k, n in SHAPES for counts in CASES.values()
                for cfg in configs_for(k, n, build_plan(case_slot_ids(counts))).values()])
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    rows = []
    for name, counts in CASES.items():
        for k, n in SHAPES:
            p = problem_for(k, n, counts)
            times, errors = time_checked(p, configs_for(k, n, p.plan))
            floor_us, base_us = p.bytes / bandwidth * 1e6, p.base_us()
            best = min(times, key=lambda m: times[m] if times[m] == times[m] else float("inf"))
            rows.append({"case": name, "K": k, "N": n, "floor_us": floor_us, "base_us": base_us, "times_us": times,
                         "errors": errors})
            print(f"{name:10} {k}x{n:<6} floor {floor_us:7.1f} base {base_us:7.1f} auto {times['auto']:8.1f} "
                  f"best {times[best]:8.1f} ({best})  " + " ".join(f"{t:.1f}" for t in times.values()), flush=True)
            del p
            torch.cuda.empty_cache()
    write_results(args.out, "kernels_mixed_rows.json", rows)


if __name__ == "__main__":
    main()
