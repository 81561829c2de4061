"""Batches of 1-8 rows: the dispatched path (cuBLAS base + v9/v8 delta, or the gemv) against v10, the
whole batch in one launch streaming base and deltas together, at several column blocks and ring
depths; each checked against the reference first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_fused_rows.py [--out DIR]     (H100; KERNEL_NOTES.md round 10)
"""

from __future__ import annotations

import argparse

from benchmarks.kernels import compare_configs
from bitdelta.kernels.configs import KernelConfig, next_pow2
from bitdelta.kernels.grouping import SlotPlan

CASES = [(1, True), (2, True), (4, True), (8, True), (4, False), (8, False)]  # (rows, distinct deltas)


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    """v10 at column blocks of 32, 64 and 128 (2, 4 and 8 warps), rings of 2-4 K-tiles of 256."""
    rows = next_pow2(plan.num_rows)
    return {f"v10_bn{bn}_s{stages}": KernelConfig(rows=rows, block_n=bn, block_k=256, num_warps=bn // 16,
                                                  num_stages=stages, fuse_base=True, fused_rows=True)
            for bn, stages in ((32, 2), (32, 3), (32, 4), (64, 2), (64, 3), (128, 2))}  # the rest > 227 KB shared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    compare_configs(CASES, variants, parser.parse_args().out, "kernels_fused_rows.json")


if __name__ == "__main__":
    main()
