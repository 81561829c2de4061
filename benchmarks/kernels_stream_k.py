"""The all-distinct batch: v9 with its K-tiles shared evenly over a fixed number of programs
(stream-K, `KernelConfig.stream_k` programs an SM) against the dispatched v9 (one program a row and
128 columns), each variant checked against the reference first, graph-timed side by side.

    PYTHONPATH=. python3 benchmarks/kernels_stream_k.py [--out DIR] [--shapes 11008x4096,...]

(H100; KERNEL_NOTES.md round 13)
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.kernels import compare_configs_main
from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.grouping import SlotPlan

CASES = [(4, True), (16, True), (32, True), (64, True), (128, True)]  # (rows, distinct)
PROGRAMS_PER_SM = (3, 4, 5)


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    if not (auto.bitmma and auto.rows == 1):
        return {}
    return {f"stream-K {per_sm}/SM": replace(auto, stream_k=per_sm) for per_sm in PROGRAMS_PER_SM}


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_stream_k.json")


if __name__ == "__main__":
    main()
