"""How close can one launch get to the floor? Per decode shape, in the graph harness of
`benchmarks/kernels.py` (cold L2, R buffer sets): a kernel that only streams the bytes of a batch-1
call (the base weight and one delta's bits, summed so the loads stay) at several grid sizes,
cuBLAS's batch-1 product, and the dispatched batch-1 path, against the floor.

    PYTHONPATH=. python3 benchmarks/kernels_read_floor.py [--out DIR]     (H100; KERNEL_NOTES.md round 8)
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels import DECODE_SHAPES, STREAM_GRIDS, Problem, measure_ceilings, write_results
from bitdelta.kernels import sm_count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    sms = sm_count(torch.cuda.current_device())
    grids = {f"stream {m}xSM w{w}": (m * sms, w) for m, w in ((1, 8), *STREAM_GRIDS)}
    rows = []
    print("| KxN | floor | " + " | ".join(grids) + " | cuBLAS b=1 | ours b=1 | best stream / floor |")
    print("|---" * (len(grids) + 5) + "|")
    for k, n in DECODE_SHAPES:
        p = Problem(k, n, 1, True)
        floor_us = p.bytes / bandwidth * 1e6
        times = {name: p.stream_us(programs, warps) for name, (programs, warps) in grids.items()}
        times["cuBLAS b=1"] = p.base_us()
        times["ours b=1"] = p.ours_us()
        best = min(times[name] for name in grids)
        rows.append({"K": k, "N": n, "floor_us": floor_us, "times_us": times})
        print(f"| {k}x{n} | {floor_us:.1f} | " + " | ".join(f"{t:.1f}" for t in times.values())
              + f" | {best / floor_us:.2f} |", flush=True)
        del p
        torch.cuda.empty_cache()
    write_results(args.out, "kernels_read_floor.json", rows)


if __name__ == "__main__":
    main()
