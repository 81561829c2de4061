"""The all-distinct decode batch: v11 (one-row tiles on the 1-bit tensor cores, `decode_binary.py`)
against the dispatched path, each variant checked against the reference first, graph-timed side by
side in one process; cuBLAS's base product in every variant.

    PYTHONPATH=. python3 benchmarks/kernels_binary.py [--out DIR] [--shapes 4096x4096,...]

(H100; KERNEL_NOTES.md round 13)
"""

from __future__ import annotations

from benchmarks.kernels import compare_configs_main
from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.grouping import SlotPlan

CASES = [(1, True), (4, True), (16, True), (32, True), (64, True), (128, True)]  # (rows, distinct)
TILES = ((4, 2), (4, 3), (4, 4), (8, 3), (2, 3))  # (warps, ring stages): block_n = 32 x warps


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    return {f"v11 w{warps}s{stages}": KernelConfig(rows=1, block_n=32 * warps, block_k=1024, num_warps=warps,
                                                   num_stages=stages, fuse_base=False, bitmma=True, binary=True)
            for warps, stages in TILES}


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_binary.json")


if __name__ == "__main__":
    main()
