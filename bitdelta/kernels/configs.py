"""Tile shapes and variant for the segment kernel, chosen per call from the shape and the plan.

Pure Python (no Triton), so the choice is tested on the CPU. The thresholds come from the H100
measurements recorded in benchmarks/KERNEL_NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitdelta.kernels.grouping import SlotPlan

DECODE_MAX_ROWS = 16  # several deltas without Gluon: a slot with more rows is prefill; one or two deltas:
# past this many rows a slot, tiles on wide layers turn tall
SHARED_DECODE_MAX_ROWS = 128  # with one or two deltas, decode tiles serve up to this many rows a slot
FUSED_MAX_DELTAS = 2  # up to this many distinct slots, one pass also computes the base product
GEMV_MAX_ROWS = 4  # the CUDA-core gemv path takes the whole batch (<= this many rows) in one program
BITMMA_MAX_ROWS = 64  # v8 tiles: rows on the N side of m16n8k16 mmas, <= 8 or 16, 32, 64 (and the
# most rows a slot several distinct deltas may have before the prefill paths take over)
MERGED_GEMM_MIN_ROWS = 512  # a slot with this many prefill rows: merged weights once, then cuBLAS
SHARED_MEMORY_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
ONE_ROW_MAX_K = 1 << 17  # v9's int32 accumulator holds up to 64 * 128 * K: < 2^31 for K < 2^18
H100_SMS = 132  # SMs of the H100 SXM the rules were measured on; `sms` defaults to it (round 12)
SPLIT_K_MAX_ROWS = 64  # taller few-delta tiles are never split (128-row tiles measured 9-20% slower split)


@dataclass(frozen=True)
class KernelConfig:
    """rows: rows per tile (power of two); fuse_base: base product in the kernel rather than cuBLAS;
    gemv: the fused CUDA-core kernel taking the whole batch (rows = 1, 2 or 4, at least the batch
    size) per column block; block_k should be 256 x num_warps; bitmma: the tensor-core delta path of
    `decode_bitmma.py` (split: base from cuBLAS; rows <= 8, 16, 32 or 64; rows = 1 on the int8 kernel v9, else v8;
    block_n a multiple of 16 x num_warps, num_stages = depth of its cp.async ring). Otherwise the
    Triton segment kernel, bits expanded for tl.dot; merge (fused only): one product with the tile's
    merged weights, bf16/fp16(W + scale * sign), as `bitdelta merge` writes them; swap_ab (segment
    kernel only): the product computed transposed, weights as the tensor cores' A operand from
    registers, the tile's rows as their N side. merged_gemm (prefill of long segments): each slot's
    merged weights written once (`triton_merge.py`, tiles block_n x block_k), then cuBLAS per segment.
    split_k (segment kernel only): K cut into this many ranges of whole block_k steps, one program
    each; the last of a tile's programs to finish sums the fp32 partials in split order and writes y
    (more programs for narrow layers, whose column blocks alone leave SMs idle)."""

    rows: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fuse_base: bool
    gemv: bool = False
    bitmma: bool = False
    merge: bool = False
    swap_ab: bool = False
    merged_gemm: bool = False
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.split_k < 1 or (self.split_k > 1 and (self.gemv or self.bitmma or self.merged_gemm)):
            raise ValueError("split_k is a form of the segment kernel: >= 1, and 1 with gemv, bitmma or merged_gemm")
        if self.gemv and (not self.fuse_base or self.rows not in (1, 2, 4)):
            raise ValueError("gemv is its own fused CUDA-core path (fuse_base=True, rows 1, 2 or 4)")
        if self.block_k % 32:
            raise ValueError("block_k must be a multiple of 32 (one packed word)")
        if self.merge and not (self.fuse_base and not self.gemv):
            raise ValueError("merge is a form of the fused segment kernel (fuse_base=True, gemv=False)")
        if self.merged_gemm and (self.gemv or self.bitmma or self.merge or self.swap_ab):
            raise ValueError("merged_gemm is its own path (merge kernel + cuBLAS), not a segment-kernel form")
        if self.swap_ab and not (self.merge and self.rows >= 16 and self.block_n >= 16
                                 and next_pow2(self.rows) == self.rows):
            raise ValueError("swap_ab is a form of the merged pass (merge=True) for tiles of a power of two >= 16 "
                             "rows and block_n >= 16")
        if self.merged_gemm and next_pow2(self.block_k) != self.block_k:
            raise ValueError("merged_gemm: block_k (the merge kernel's tile) must be a power of two")
        if self.bitmma:
            self._check_bitmma()

    def _check_bitmma(self) -> None:
        if self.fuse_base or self.gemv or not (1 <= self.rows <= 8 or self.rows in (16, 32, 64)):
            raise ValueError("bitmma is a split path (fuse_base=False) for tiles of <= 8, 16, 32 or 64 rows")
        if self.block_n % (16 * self.num_warps) or self.block_k not in (256, 512, 1024) or self.num_stages < 2:
            raise ValueError("bitmma: block_n a multiple of 16 x num_warps, block_k 256, 512 or 1024, >= 2 stages")
        shared = self.bitmma_shared_bytes()
        if shared > SHARED_MEMORY_BYTES:
            raise ValueError(f"bitmma: {shared} bytes of shared memory a block (> {SHARED_MEMORY_BYTES}): "
                             "use fewer stages, a shorter block_k or a narrower block_n")

    def bitmma_shared_bytes(self) -> int:
        """The cp.async ring of decode_bitmma.py: per stage the words [BN, BK/32] (int32) and x, as
        4 x 8 bf16 rows of BK/4 per 8 tile rows (v8) or 16 int8 digit rows of BK/4 (v9)."""
        x_bytes = 16 * self.block_k // 4 if self.rows == 1 else 4 * max(self.rows, 8) * self.block_k // 4 * 2
        return self.num_stages * (self.block_n * self.block_k // 32 * 4 + x_bytes)


def split_threshold(plan: SlotPlan) -> int | None:
    """Segments of more rows than the returned count go apart from the others, each side dispatched
    on its own (round 8); None keeps the batch whole. A prefill chunk beside decode rows: one config
    for both would put every 1-row slot in a 128-row prefill tile, and no segment could take the
    merged-weight GEMM while a short one is present."""
    if plan.max_rows > BITMMA_MAX_ROWS and min(plan.counts) <= BITMMA_MAX_ROWS:
        return BITMMA_MAX_ROWS
    return None


def next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def choose_config(n: int, plan: SlotPlan, k: int = 4096, bitmma: bool = True, sms: int = H100_SMS) -> KernelConfig:
    """Pick the variant measured fastest on an H100 (benchmarks/KERNEL_NOTES.md).

    Few distinct deltas: one fused pass on the tile's merged weights (base + scale * bits: one
    tensor-core product, round 7), narrow column blocks. Many distinct deltas: cuBLAS for the base
    once, then a tensor-core delta kernel (v8; v9 for one-row tiles), which reads each slot's bits
    once per tile of up to 64 rows (8, 16, 32 or 64, picked per batch). Prefill (round 8): slots of at
    least MERGED_GEMM_MIN_ROWS rows get their merged weights written once and cuBLAS; shorter
    segments the fused pass on merged weights, computed transposed. `bitmma=False` (a Triton
    without Gluon) takes the tl.dot kernel instead of v8/v9. `sms`: the device's SM count, against
    which the few-delta rules count a call's programs (round 12).
    """
    gemv = _gemv_config(n, plan, k)
    if gemv is not None:
        return gemv
    few_deltas = plan.num_deltas <= FUSED_MAX_DELTAS
    if few_deltas:
        decode_rows = SHARED_DECODE_MAX_ROWS
    else:
        decode_rows = BITMMA_MAX_ROWS if bitmma else DECODE_MAX_ROWS
    if plan.max_rows > decode_rows:
        return _prefill_config(n, plan, few_deltas)
    rows = next_pow2(plan.max_rows)
    if few_deltas:
        tiles = plan.tile_count(rows)
        return _with_split_k(_few_deltas_config(n, rows, k, tiles, sms), tiles, n, sms)
    if bitmma:  # the tensor-core delta kernels: 1.4-4x the dot kernel (KERNEL_NOTES rounds 5b, 8)
        return _bitmma_config(n, plan, k)
    return KernelConfig(rows=rows, block_n=64, block_k=128, num_warps=4, num_stages=3, fuse_base=False)


def _few_deltas_config(n: int, rows: int, k: int, tiles: int, sms: int) -> KernelConfig:
    """One or two deltas, tiles of `rows` (a power of two <= SHARED_DECODE_MAX_ROWS): the fused pass on
    merged weights. H100 (KERNEL_NOTES rounds 7, 8, 11): 32 x 128 tiles, but on wide layers (N >= 8192)
    64-row tiles computed transposed (7-30% less time; 64 x 64 untransposed on a 4096-deep layer wider
    than 16384, such as a 7B model's stacked gate/up: 108 -> 92 us), taller tiles 64 columns wide (32
    rows at K = 4096 excepted: 32 columns took 7-15% less there), and 8-16-row tiles 32 x 256 beyond
    N = 16384 (4096x22016: 94 -> 84 us at 8 rows, 98 -> 88 at 16). The K = 4096 rules were measured at
    K = 4096 only and are extended to shallower layers (less work a program, the same wave argument).
    Round 12: 32-row tiles stay 32 wide on deeper layers too where they fit one wave (3 blocks an SM:
    8192x10240 92.5 -> 86.0 us; 8192x8192 and 28672x8192 0.3-1.5% less); at 2.3 waves (8192x28672, 896
    programs) they took 14% more time than 64 wide, though at 4.5 waves (8192x57344, 1792) 6% less:
    the wave count alone does not settle it (KERNEL_NOTES open lead 1)."""
    def merged(block_n: int, block_k: int, warps: int = 4, stages: int = 4, swap_ab: bool = False) -> KernelConfig:
        return KernelConfig(rows=rows, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages,
                            fuse_base=True, merge=True, swap_ab=swap_ab)

    if rows == 64 and n >= 8192:
        return merged(64, 64) if k <= 4096 and n > 16384 else merged(64, 128, stages=3, swap_ab=True)
    one_wave = _programs(tiles, n, 32) <= 3 * sms
    if rows > DECODE_MAX_ROWS and n >= 8192 and not (rows == 32 and (k <= 4096 or one_wave)):  # shorter K step past 32 rows
        return merged(64, 128 if rows <= 32 else 64)
    if 4 < rows <= DECODE_MAX_ROWS and n > 16384:
        return merged(32, 256, stages=3)
    # one or two rows per tile: 2 warps (more programs resident); more rows: 4 warps, deeper pipeline
    return merged(32, 128, warps=2, stages=3) if rows <= 2 else merged(32, 128)


def _with_split_k(config: KernelConfig, tiles: int, n: int, sms: int) -> KernelConfig:
    """K split in two (four for the 2-warp tiles of 1-2 rows) where the 32-column or transposed 64-row
    tiles of up to SPLIT_K_MAX_ROWS rows make at most `sms` programs: one program an SM or none, each
    streaming all of K alone. H100 (round 12, one delta, final run): 11008x4096 at 1-64 rows 46.7-63.4 ->
    44.4-49.6 us, 4096x4096 at 4-64 rows 3-11% less time, 8192x8192 at 64 rows 70.4 -> 66.3 us,
    28672x8192 at 64 rows 225 -> 199 (sweep). With more programs than SMs (160-192 at 8192x10240,
    4096x11008 and 4096x12288, 64 rows) the split tiles took 20-25% more time, 128-row tiles 9-20%
    more, and the untransposed 64-column tiles of 32 rows on N = 8192 0.6-5% more."""
    if config.rows > SPLIT_K_MAX_ROWS or not (config.block_n == 32 or config.swap_ab):
        return config
    if _programs(tiles, n, config.block_n) > sms:
        return config
    return replace(config, split_k=4 if config.rows <= 2 else 2)


def _programs(tiles: int, n: int, block_n: int) -> int:
    return tiles * -(-n // block_n)


def plan_config(n: int, plan: SlotPlan, k: int, bitmma: bool = True, sms: int = H100_SMS) -> KernelConfig:
    """`choose_config`, memoised on the plan: a step's plan serves every layer, which have a handful
    of shapes, and an eager step (prefill) pays the choice in host time at every linear."""
    key = (n, k, bitmma, sms)
    config = plan._configs.get(key)
    if config is None:
        config = plan._configs[key] = choose_config(n, plan, k=k, bitmma=bitmma, sms=sms)
    return config


def _prefill_config(n: int, plan: SlotPlan, few_deltas: bool) -> KernelConfig:
    """Long segments (H100, round 8): merged weights once + cuBLAS when every delta segment has at
    least MERGED_GEMM_MIN_ROWS rows (twice that when rows of more than FUSED_MAX_DELTAS deltas must be
    gathered into slot order and scattered back); otherwise the fused pass on merged weights,
    computed transposed: with 128-row tiles, 128 x 64 once the tiles (partial ones included) times
    the 128-column blocks make >= 256 programs; else 64 x 128 for one or two deltas and 64 x 64 with
    4 stages for more (512 tokens over 4 deltas: 15-17% less time than 64 x 128)."""
    min_rows = MERGED_GEMM_MIN_ROWS * (1 if few_deltas or plan.in_order else 2)
    if plan.min_delta_rows >= min_rows:
        return KernelConfig(rows=128, block_n=32, block_k=256, num_warps=4, num_stages=1, fuse_base=True,
                            merged_gemm=True)
    rows = min(next_pow2(plan.max_rows), 128)
    tiles = plan.tile_count(rows)
    if rows == 128 and tiles * -(-n // 128) >= 256:
        return KernelConfig(rows=rows, block_n=128, block_k=64, num_warps=4, num_stages=3, fuse_base=True,
                            merge=True, swap_ab=True)
    if few_deltas:
        return KernelConfig(rows=rows, block_n=64, block_k=128, num_warps=4, num_stages=3, fuse_base=True, merge=True,
                            swap_ab=True)
    return KernelConfig(rows=rows, block_n=64, block_k=64, num_warps=4, num_stages=4, fuse_base=True, merge=True,
                        swap_ab=True)


def _gemv_config(n: int, plan: SlotPlan, k: int) -> KernelConfig | None:
    """The fused CUDA-core gemv for batches of <= GEMV_MAX_ROWS rows, where it measured faster
    (H100 sweep, benchmarks/KERNEL_NOTES.md v6, v8, rounds 11-12): one row, except on long rows (K > 8192)
    of layers up to 4096 wide, where the merged pass with K split won; one shared slot on wide layers (N >
    16384); 2-3 rows of several slots on N <= 4096, K <= 8192 (at 4 rows v8 won). Since round 12, 2-4 rows
    of one slot on long rows take the merged pass (measured at 4 rows: 11008x4096 47.2 -> 44.6 us,
    28672x8192 229.8 -> 194.4; 2-3 rows follow unmeasured). BLOCK_K = 256 x warps keeps the x load in the
    W tile's layout (warps along K)."""
    m = plan.num_rows
    if m == 0 or m > GEMV_MAX_ROWS:
        return None
    single = len(plan.host_slots) == 1
    stages = 1
    if m == 1:
        if k > 8192 and n <= 4096:  # the merged pass with K split beat it (round 12): 11008x4096 46.7 -> 44.4 us
            return None
        if k > 8192:
            bn, bk, warps = 16, 1024, 4
        elif n > 8192:  # 4-column blocks pipelined 3 deep: 2-8% less time on six layers (round 11)
            bn, bk, warps, stages = 4, 512, 2, 3
        else:
            bn, bk, warps = 8, 512, 2
    elif single and n > 16384:
        # wide layers: the K loop pipelined 3 deep (8192x28672, 4 rows: 209 -> 186 us; round 7)
        bn, bk, warps, stages = 4, 512, 2, 3
    elif not single and n <= 4096 and k <= 8192 and m < GEMV_MAX_ROWS:
        bn, bk, warps = 4, 512, 2
    else:
        return None
    return KernelConfig(rows=next_pow2(m), block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, fuse_base=True,
                        gemv=True)


def _bitmma_config(n: int, plan: SlotPlan, k: int) -> KernelConfig:
    """Tiles of up to 64 rows of one slot on the tensor cores (H100 sweeps, KERNEL_NOTES.md).

    Every slot one row (the all-distinct batch; round 7): one-row tiles on the int8 kernel v9, 128 x
    1024 with 2 stages (41 KB of shared memory: 5 blocks an SM) at every shape and batch. Otherwise v8
    (round 8) with the tile height `_v8_tile_rows` picks. 8-row tiles: 256 x 512, 4 warps (4 mma slabs
    a warp); long rows (K > 8192) 128 x 256; with <= 4 tiles (few programs) narrower column blocks, 64
    on N <= 4096. 16 rows: 256 x 512 from 16 tiles on, else 128 x 512; 32 and 64 rows: 128 x 256 (3 and
    2 stages)."""
    if plan.max_rows == 1 and k <= ONE_ROW_MAX_K:
        return KernelConfig(rows=1, block_n=128, block_k=1024, num_warps=4, num_stages=2, fuse_base=False, bitmma=True)
    rows = _v8_tile_rows(plan)
    tiles = plan.tile_count(rows)
    if rows == 16:
        bn, bk, stages = (256 if tiles >= 16 else 128), 512, 3
    elif rows > 16:
        bn, bk, stages = 128, 256, (3 if rows == 32 else 2)
    elif k > 8192:
        bn, bk, stages = 128, 256, 4
    elif tiles <= 4:
        bn, bk, stages = (64, 512, 4) if n <= 4096 else (128, 512, 3)
    else:
        bn, bk, stages = 256, 512, 3
    return KernelConfig(rows=rows, block_n=bn, block_k=bk, num_warps=4, num_stages=stages, fuse_base=False,
                        bitmma=True)


def _v8_tile_rows(plan: SlotPlan) -> int:
    """The v8 tile height (8, 16, 32 or 64) with the least modelled work: a tile expands its slot's
    bits once (cost ~ two 8-column mmas) and runs rows/8 mmas per expanded fragment. Measured on an
    H100 (round 8): 16-row tiles take 10-20% less time than 8-row ones where every slot has 9..16
    rows, 32-row tiles 40% less than anything else at 32 rows a slot; a Zipf batch (most slots 1-5
    rows) stays on 8-row tiles."""
    def work(rows: int) -> int:  # in 8-column mmas: 2 for the expansion + rows / 8, per tile (x 8)
        return plan.tile_count(rows) * (16 + rows)

    return min((8, 16, 32, 64), key=lambda rows: (work(rows), rows))
