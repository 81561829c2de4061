"""One delta shared by 1-64 decode rows (a busy fine-tune): the dispatched path against the fused
CUDA-core gemv and the fused pass on merged weights (plain and transposed) at several tiles, each
checked against the reference first, graph-timed side by side in one process. The default shapes are
the engine's stacked projections (q/k/v and gate/up as one product) of a 7B and a 70B Llama, beside
two shapes of the goal table.

    PYTHONPATH=. python3 benchmarks/kernels_shared_decode.py [--out DIR] [--shapes 4096x12288,...]

(H100; KERNEL_NOTES.md round 11)
"""

from __future__ import annotations

from benchmarks.kernels import compare_configs_main, parse_shapes
from bitdelta.kernels.configs import GEMV_MAX_ROWS, KernelConfig, next_pow2
from bitdelta.kernels.grouping import SlotPlan

SHAPES = "4096x12288,4096x22016,8192x10240,8192x57344,4096x11008,8192x28672"
CASES = [(1, False), (4, False), (8, False), (16, False), (32, False), (64, False)]  # (rows, distinct)
GEMV_TILES = ((4, 2, 1), (4, 2, 3), (8, 2, 1), (8, 2, 3), (16, 4, 1), (16, 4, 3))  # (BN, warps, stages)
MERGED_TILES = ((16, 128, 4, 4), (32, 128, 2, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 4),
                (64, 128, 4, 4))  # (BN, BK, warps, stages)
SWAP_TILES = ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3))


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    rows = next_pow2(plan.max_rows)
    out = {}
    if plan.num_rows <= GEMV_MAX_ROWS:
        out.update({f"gemv {bn}w{w}s{s}": KernelConfig(rows=rows, block_n=bn, block_k=256 * w, num_warps=w,
                                                        num_stages=s, fuse_base=True, gemv=True)
                    for bn, w, s in GEMV_TILES})
    out.update({f"merged {bn}x{bk}w{w}s{s}": KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=w, num_stages=s,
                                                           fuse_base=True, merge=True)
                for bn, bk, w, s in MERGED_TILES})
    if rows >= 16:
        out.update({f"swap {bn}x{bk}w{w}s{s}": KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=w,
                                                             num_stages=s, fuse_base=True, merge=True, swap_ab=True)
                    for bn, bk, w, s in SWAP_TILES})
    return out


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_shared_decode.json", parse_shapes(SHAPES))


if __name__ == "__main__":
    main()
