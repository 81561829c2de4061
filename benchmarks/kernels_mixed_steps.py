"""A prefill chunk beside decode rows (a serving step with chunked prefill): the whole batch on one
dispatched config, as before round 8, against the public entry point, which splits long segments
from short ones and dispatches each side on its own (`configs.split_threshold`). Both checked
against the reference first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_mixed_steps.py [--out DIR]     (H100; KERNEL_NOTES.md round 8)
"""

from __future__ import annotations

import argparse

import torch

import bitdelta.kernels as kernels
from benchmarks.kernels import graph_us, measure_ceilings, relative_error, write_results
from benchmarks.kernels_mixed_rows import problem_for
from bitdelta.kernels.configs import choose_config
from bitdelta.kernels.triton_segments import segment_matmul

CASES = {  # name: rows a slot (slot 0 the prefill chunk)
    "256 + 63 x 1": [256] + [1] * 63,
    "256 + 16 x 4": [256] + [4] * 16,
    "512 + 63 x 1": [512] + [1] * 63,
    "1024 + 31 x 1": [1024] + [1] * 31,
}
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]


def time_case(k: int, n: int, counts: list[int]) -> tuple[float, dict, dict]:
    """(floor bytes, times, errors) of the two ways to run one step."""
    p = problem_for(k, n, counts)
    whole = choose_config(n, p.plan, k=k)
    calls = {
        "one config": lambda d: segment_matmul(d["x"], d["w"], d["signs"], d["scales"], p.plan, None, whole),
        "split": lambda d: kernels.bitdelta_matmul(d["x"], d["w"], d["signs"], d["scales"], p.slot_ids, plan=p.plan),
    }
    times, errors = {}, {}
    for label, call in calls.items():
        errors[label] = relative_error(p, call(p.sets[0]))
        checked = errors[label] < 6e-3
        times[label] = graph_us([lambda d=d, call=call: call(d) for d in p.sets]) if checked else float("nan")
    return p.bytes, times, errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    rows = []
    print("| step | KxN | floor | one config | split (entry point) | one / split |")
    print("|---|---|---|---|---|---|")
    for name, counts in CASES.items():
        for k, n in SHAPES:
            floor_bytes, times, errors = time_case(k, n, counts)
            floor_us = floor_bytes / bandwidth * 1e6
            rows.append({"case": name, "K": k, "N": n, "floor_us": floor_us, "times_us": times, "errors": errors})
            print(f"| {name} | {k}x{n} | {floor_us:.1f} | {times['one config']:.1f} | {times['split']:.1f} | "
                  f"{times['one config'] / times['split']:.2f} |", flush=True)
            torch.cuda.empty_cache()
    write_results(args.out, "kernels_mixed_steps.json", rows)


if __name__ == "__main__":
    main()
