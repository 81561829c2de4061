"""Batches of 1-4 rows of one slot: the dispatched path against the fused CUDA-core gemv (v6) at
other tiles and software-pipelining depths, each checked against the reference first, graph-timed
side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_gemv_sweep.py [--out DIR]     (H100; KERNEL_NOTES.md round 7)
"""

from __future__ import annotations

import argparse

from benchmarks.kernels import compare_configs
from bitdelta.kernels.configs import KernelConfig

CASES = [(1, True), (4, False)]  # (rows, distinct): one row; four rows of one shared delta


def variants(rows: int, auto: KernelConfig) -> dict:
    """gemv tiles: BLOCK_K = 256 x warps (the kernel's x layout), pipelined 1-3 deep."""
    return {f"bn{bn}w{warps}s{stages}": KernelConfig(rows=rows, block_n=bn, block_k=256 * warps, num_warps=warps,
                                                     num_stages=stages, fuse_base=True, gemv=True)
            for bn, warps in ((8, 2), (16, 4), (32, 4), (4, 2)) for stages in (1, 2, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    compare_configs(CASES, variants, parser.parse_args().out, "kernels_gemv_sweep.json")


if __name__ == "__main__":
    main()
