"""Batches of 1-4 rows (one row; four rows of one slot or of four): the dispatched path against the fused CUDA-core gemv (v6) at
other tiles and software-pipelining depths, each checked against the reference first, graph-timed
side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_gemv_sweep.py [--out DIR] [--shapes KxN,...]     (H100; KERNEL_NOTES.md rounds 7, 8)
"""

from __future__ import annotations

from benchmarks.kernels import compare_configs_main
from bitdelta.kernels.configs import KernelConfig, next_pow2
from bitdelta.kernels.grouping import SlotPlan

CASES = [(1, True), (4, False), (4, True)]  # (rows, distinct): one row; four rows of one delta or of four


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    """gemv tiles (the whole batch a program): BLOCK_K = 256 x warps (the kernel's x layout), pipelined 1-3 deep."""
    rows = next_pow2(plan.num_rows)
    return {f"bn{bn}w{warps}s{stages}": KernelConfig(rows=rows, block_n=bn, block_k=256 * warps, num_warps=warps,
                                                     num_stages=stages, fuse_base=True, gemv=True)
            for bn, warps in ((8, 2), (16, 4), (4, 2)) for stages in (1, 2, 3)}  # BN 32: 2-30x slower (round 7)


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_gemv_sweep.json")


if __name__ == "__main__":
    main()
