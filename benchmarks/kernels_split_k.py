"""One or two deltas on narrow or deep layers: the fused pass on merged weights with K split over
several programs (`KernelConfig.split_k`) against the dispatched path, each variant checked against
the reference first, graph-timed side by side in one process. At N = 4096 a 32-column tile makes 128
programs, fewer than the H100's 132 SMs, each streaming the whole K alone.

    PYTHONPATH=. python3 benchmarks/kernels_split_k.py [--out DIR] [--shapes 11008x4096,...]

(H100; KERNEL_NOTES.md round 12)
"""

from __future__ import annotations

from benchmarks.kernels import compare_configs_main, parse_shapes
from bitdelta.kernels.configs import KernelConfig, next_pow2
from bitdelta.kernels.grouping import SlotPlan

# the goal table's narrow and square layers, and a 70B down projection (K = 28672, N = 8192)
SHAPES = "4096x4096,11008x4096,4096x11008,8192x8192,28672x8192"
CASES = [(1, False), (4, False), (16, False), (32, False), (64, False)]  # (rows, distinct): one shared delta
MERGED_TILES = ((32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3))  # (BN, BK, warps, stages)
SWAP_TILES = ((64, 128, 4, 3), (128, 64, 4, 3))
SPLITS = (2, 4, 8)


def variants(plan: SlotPlan, auto: KernelConfig) -> dict:
    rows = next_pow2(plan.max_rows)

    def merged(bn: int, bk: int, warps: int, stages: int, split: int, swap: bool = False) -> KernelConfig:
        return KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, fuse_base=True,
                            merge=True, swap_ab=swap, split_k=split)

    tiles = MERGED_TILES + (((32, 128, 2, 3),) if rows <= 2 else ())
    out = {f"merged {bn}x{bk}w{w}s{s} k/{split}": merged(bn, bk, w, s, split)
           for bn, bk, w, s in tiles for split in SPLITS}
    if rows >= 16:
        out.update({f"swap {bn}x{bk}w{w}s{s} k/{split}": merged(bn, bk, w, s, split, swap=True)
                    for bn, bk, w, s in SWAP_TILES for split in SPLITS[:2]})
    return out


def main() -> None:
    compare_configs_main(CASES, variants, "kernels_split_k.json", parse_shapes(SHAPES))


if __name__ == "__main__":
    main()
