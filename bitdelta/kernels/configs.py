"""Tile shapes and variant for the segment kernel, chosen per call from the shape and the plan.

Pure Python (no Triton), so the choice is tested on the CPU. The thresholds come from the H100
measurements recorded in benchmarks/KERNEL_NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitdelta.kernels.grouping import SlotPlan

DECODE_MAX_ROWS = 16  # with several distinct deltas, a slot with more rows than this is prefill
SHARED_DECODE_MAX_ROWS = 128  # with one or two deltas, decode tiles serve up to this many rows a slot
FUSED_MAX_DELTAS = 2  # up to this many distinct slots, one pass also computes the base product
FMA_MAX_ROWS = 4  # the bit-plane path keeps a [rows, block_n, block_k/32] fp32 accumulator
GEMV_MAX_ROWS = 4  # the CUDA-core gemv path takes the whole batch (<= this many rows) in one program
XREG_MIN_K = 8192  # v7 (x in registers, one row a tile) measured faster only on K > this (11008x4096) ...
XREG_MAX_DELTAS = 32  # ... up to this many distinct deltas (b=64: the v4 bit-plane kernel won)


@dataclass(frozen=True)
class KernelConfig:
    """rows: rows per tile (power of two); fuse_base: base product in the kernel rather than cuBLAS;
    use_fma: delta products on the CUDA cores, one bit plane at a time (tiles of few rows), instead
    of expanding the bits for tl.dot; gemv: the fused CUDA-core kernel taking the whole batch (rows = 1, 2
    or 4, at least the batch size) per column block; block_k should be 256 x num_warps; xreg: the
    bit-plane path with x held in registers (`_bitreg_kernel`, one row a tile, v7)."""

    rows: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fuse_base: bool
    use_fma: bool = False
    gemv: bool = False
    xreg: bool = False

    def __post_init__(self) -> None:
        if self.use_fma and self.rows > FMA_MAX_ROWS:
            raise ValueError(f"use_fma holds rows x block_n x block_k/32 accumulators: rows <= {FMA_MAX_ROWS}")
        if self.use_fma and self.fuse_base:
            raise ValueError("use_fma is the split path: the base product comes from cuBLAS")
        if self.gemv and (self.use_fma or not self.fuse_base or self.rows not in (1, 2, 4)):
            raise ValueError("gemv is its own fused CUDA-core path (fuse_base=True, use_fma=False, rows 1, 2 or 4)")
        if self.xreg and not (self.use_fma and self.rows == 1):
            raise ValueError("xreg is the one-row-per-tile variant of the bit-plane path (use_fma=True, rows=1)")
        if self.block_k % 32:
            raise ValueError("block_k must be a multiple of 32 (one packed word)")


def next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def choose_config(n: int, plan: SlotPlan, k: int = 4096) -> KernelConfig:
    """Pick the variant measured fastest on an H100 (benchmarks/KERNEL_NOTES.md, sweeps v2 and v3).

    Few distinct deltas: one fused pass (base + bits), tensor-core products, narrow column
    blocks. Many distinct deltas: cuBLAS for the base once, then the delta kernel; tiles of at
    most FMA_MAX_ROWS rows use the CUDA-core bit-plane path with wide column blocks. Prefill gets
    GEMM-sized tiles that amortise the bit expansion over many rows.
    """
    gemv = _gemv_config(n, plan, k)
    if gemv is not None:
        return gemv
    few_deltas = plan.num_deltas <= FUSED_MAX_DELTAS
    if plan.max_rows > (SHARED_DECODE_MAX_ROWS if few_deltas else DECODE_MAX_ROWS):
        return KernelConfig(rows=128, block_n=128, block_k=64, num_warps=8, num_stages=3, fuse_base=True)
    rows = next_pow2(plan.max_rows)
    if few_deltas:
        if rows > DECODE_MAX_ROWS and n >= 8192:
            # tall tiles on wide layers: 64 columns (still >= 128 programs), shorter K step past 32 rows
            return KernelConfig(rows=rows, block_n=64, block_k=128 if rows <= 32 else 64, num_warps=4,
                                num_stages=4, fuse_base=True)
        # one or two rows per tile: 2 warps (more programs resident); more rows: 4 warps, deeper pipeline
        warps, stages = (2, 3) if rows <= 2 else (4, 4)
        return KernelConfig(rows=rows, block_n=32, block_k=128, num_warps=warps, num_stages=stages, fuse_base=True)
    if rows == 1 and k > XREG_MIN_K and plan.num_deltas <= XREG_MAX_DELTAS:
        return _xreg_config(n, plan, k)
    if rows <= FMA_MAX_ROWS:
        # bit-plane path; past 32 deltas on long rows (K > 8192) wider column blocks measured faster
        block_n, block_k = (256, 128) if plan.num_deltas > 16 and k > 8192 else (128, 256)
        return KernelConfig(rows=rows, block_n=block_n, block_k=block_k, num_warps=4, num_stages=3, fuse_base=False,
                            use_fma=True)
    return KernelConfig(rows=rows, block_n=64, block_k=128, num_warps=4, num_stages=3, fuse_base=False)


def _gemv_config(n: int, plan: SlotPlan, k: int) -> KernelConfig | None:
    """The fused CUDA-core gemv for batches of <= GEMV_MAX_ROWS rows, where it measured faster
    (H100 sweep, benchmarks/KERNEL_NOTES.md v6): always at one row; one shared slot on long rows
    (K > 8192) or wide layers (N > 16384); several slots on N <= 4096. BLOCK_K = 256 x warps keeps
    the x load in the W tile's layout (warps along K)."""
    m = plan.num_rows
    if m == 0 or m > GEMV_MAX_ROWS:
        return None
    single = len(plan.host_slots) == 1
    if m == 1:
        bn, bk, warps = (16, 1024, 4) if k > 8192 else (8, 512, 2)
    elif single and (k > 8192 or n > 16384):
        bn, bk, warps = 4, 512, 2
    elif not single and n <= 4096 and not (k > XREG_MIN_K and plan.max_rows == 1):
        bn, bk, warps = (8, 512, 2) if k > 8192 else (4, 512, 2)
    else:
        return None
    return KernelConfig(rows=next_pow2(m), block_n=bn, block_k=bk, num_warps=warps, num_stages=1, fuse_base=True,
                        gemv=True)


def _xreg_config(n: int, plan: SlotPlan, k: int) -> KernelConfig:
    """One row per delta (all-distinct decode) on long rows: the bit-plane kernel with x held in
    registers (v7, benchmarks/KERNEL_NOTES.md); 128 x 256 tiles, 4 warps: 8 words of one word column
    per thread, reusing its 32 x values for all of them. Measured at 11008x4096 (H100): b=4 86.7 us
    (gemv 99.7), b=16 155.2 (v4 217.3); b=64 484.5 (v4 414.9, so not dispatched there)."""
    return KernelConfig(rows=1, block_n=128, block_k=256, num_warps=4, num_stages=3, fuse_base=False, use_fma=True,
                        xreg=True)
