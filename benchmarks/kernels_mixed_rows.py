"""Decode batches whose slots hold different numbers of rows (a Zipf mix, 9..16 rows a slot): the
dispatched delta path against v8 with 8-row tiles, each checked against the reference first.

    PYTHONPATH=. python3 benchmarks/kernels_mixed_rows.py        (H100; KERNEL_NOTES.md round 5b)
"""

from __future__ import annotations

import torch

from benchmarks.kernels import Problem, _sweep_error, measure_ceilings
from bitdelta.kernels.configs import KernelConfig, _bitmma_config, choose_config
from bitdelta.kernels.grouping import build_plan

ZIPF_64 = [14, 5, 5, 4, 4, 3, 3] + [2] * 6 + [1] * 14  # rows a slot of the e2e benchmark's Zipf(64) batch
CASES = {
    "Zipf(64)": torch.repeat_interleave(torch.arange(len(ZIPF_64)), torch.tensor(ZIPF_64)),
    "4 x 16": torch.arange(64) // 16,
    "5 x 12 + 4": torch.arange(64) // 12,
    "7 x 9 + 1": torch.arange(64) // 9,
}


def timed(problem: Problem, config: KernelConfig) -> str:
    error = _sweep_error(problem, config)
    return f"{problem.ours_us(config):.1f}" if error < 6e-3 else f"wrong ({error:.1e})"


def main() -> None:
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    print("| batch of 64 rows | KxN | slots | dispatched us | v8 8-row tiles us | floor us |")
    print("|---|---|---|---|---|---|")
    for name, slots in CASES.items():
        for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
            problem = Problem(k, n, 64, True, 1)
            problem.slot_ids = slots.cuda()
            problem.plan = build_plan(problem.slot_ids)
            problem.num_slots = int(slots.max()) + 1
            floor_us = problem.floor_bytes() / bandwidth * 1e6
            dispatched, v8 = choose_config(n, problem.plan, k=k), _bitmma_config(n, problem.plan, k)
            print(f"| {name} | {k}x{n} | {problem.num_slots} | {timed(problem, dispatched)} | {timed(problem, v8)} | {floor_us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
