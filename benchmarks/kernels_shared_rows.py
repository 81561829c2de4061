"""Deltas shared by many rows: one delta under load (16..128 decode rows), prefill of 512/2048 prompt
tokens over 1, 4 or 32 deltas. The dispatched path against the segment kernel computing its product
transposed (`swap_ab`: merged weights as the tensor cores' register A operand, rows as N) and against
merged weights written once per slot then cuBLAS (`merged_gemm`), each checked against the reference
first, graph-timed side by side in one process.

    PYTHONPATH=. python3 benchmarks/kernels_shared_rows.py [--out DIR] [--shapes 4096x4096,...]

(H100; KERNEL_NOTES.md rounds 7 and 8)
"""

from __future__ import annotations

from benchmarks.kernels import DECODE_SHAPES, compare_configs_main
from bitdelta.kernels.configs import KernelConfig, next_pow2
from bitdelta.kernels.grouping import SlotPlan

# (batch, distinct, rows per delta)
CASES = [(32, False), (64, False), (128, False), (256, False), (512, False), (2048, False),
         (512, True, 128), (1024, True, 256), (2048, True, 512), (512, True, 16), (1024, True, 32), (2048, True, 64),
         (4096, True, 128)]
SWAP_TILES = ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3))  # (BN, BK, warps, stages)
MERGE_TILES = ((32, 256, 4), (16, 512, 4))  # the merge kernel's (BN, BK, warps)


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    """Transposed products on merged weights at several tiles; merged weights written once, then cuBLAS."""
    rows = min(next_pow2(plan.max_rows), 128)
    out = {f"swap {bn}x{bk}w{w}s{s}": KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=w, num_stages=s,
                                                    fuse_base=True, merge=True, swap_ab=True)
           for bn, bk, w, s in SWAP_TILES}
    out["round 7 prefill"] = KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=8, num_stages=3, fuse_base=True,
                                          merge=True)
    for bn, bk, w in MERGE_TILES:
        out[f"merged gemm {bn}x{bk}"] = KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=w, num_stages=1,
                                                     fuse_base=True, merged_gemm=True)
    return out


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_shared_rows.json", DECODE_SHAPES)


if __name__ == "__main__":
    main()
