"""One delta shared by 16..64 rows (a fine-tune under load) and by 512-2048 prompt tokens (prefill):
the dispatched path (one fused tl.dot pass over base and bits) against the same pass on merged
weights, split forms (cuBLAS base product, then the delta alone) and other fused tiles, each checked
against the reference first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_shared_rows.py [--out DIR]     (H100; KERNEL_NOTES.md round 7)
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from benchmarks.kernels import compare_configs
from bitdelta.kernels.configs import KernelConfig

BATCHES = [16, 32, 64, 512, 2048]


def variants(rows: int, auto: KernelConfig) -> dict:
    """The dispatched tile on merged weights; split forms read the bits once per tile of `rows` rows
    after cuBLAS's base product (v8 reads them once per 8 rows); fused forms at other tiles."""
    rows = min(rows, 128)
    return {
        "auto merged": replace(auto, merge=True),
        "split dot": KernelConfig(rows=rows, block_n=64, block_k=128, num_warps=4, num_stages=4, fuse_base=False),
        "split dot bn128": KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=8, num_stages=3, fuse_base=False),
        "split v8": KernelConfig(rows=8, block_n=256, block_k=512, num_warps=4, num_stages=3, fuse_base=False,
                                 bitmma=True),
        "fused bn64 bk64 w4": KernelConfig(rows=rows, block_n=64, block_k=64, num_warps=4, num_stages=4, fuse_base=True),
        "fused bn128 bk64 w8": KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=8, num_stages=3,
                                            fuse_base=True),
        "fused bn32 bk256 w4": KernelConfig(rows=rows, block_n=32, block_k=256, num_warps=4, num_stages=3,
                                            fuse_base=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    compare_configs([(batch, False) for batch in BATCHES], variants, parser.parse_args().out, "kernels_shared_rows.json")


if __name__ == "__main__":
    main()
