"""What the path choice sees of a call (`Problem`), and the tile shape the kernel paths share (`Tiles`).

Pure Python, so the choice is tested on the CPU. The thresholds below separate the paths; where they
came from is in docs/kernels.md, what they buy in benchmarks/results/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitdelta.kernels.base_product import GROUP_SCALED, PLAIN, ROW_SCALED
from bitdelta.kernels.grouping import SlotPlan

H100_SMS = 132  # SMs of the H100 SXM the rules were measured on: the default device
FEW_DELTAS = 2  # up to this many distinct deltas, one pass on merged weights beats the base product + a delta pass
FEW_DELTAS_DECODE_ROWS = 128  # with few deltas, decode tiles serve up to this many rows a slot
BITMMA_MAX_ROWS = 64  # the tallest tile of the Gluon delta kernel: rows on the N side of its mmas
DOT_MAX_ROWS = 16  # without Gluon, several deltas past this many rows a slot are prefill
# over a quantized base, layers wider than this (by the base's form) at up to 16 rows a slot: base product + delta kernel
STORED_PRODUCT_MIN_N = {ROW_SCALED: 16384, GROUP_SCALED: 8192}
STORED_PRODUCT_MAX_ROWS = 16


@dataclass(frozen=True)
class Problem:
    """One product y = x @ W.T + delta for x [plan.num_rows, k] and W [n, k]: its shape, its rows
    grouped by slot, whether this Triton has Gluon, the SM count the programs are counted against, and
    how the base is stored (`base_product.form_of`)."""

    plan: SlotPlan
    n: int
    k: int
    gluon: bool = True
    sms: int = H100_SMS
    base_form: int = PLAIN

    @property
    def few_deltas(self) -> bool:
        return self.plan.num_deltas <= FEW_DELTAS

    @property
    def stored_product_first(self) -> bool:
        """Over a quantized base, decode of up to 16 rows a slot on a wide layer (int8/fp8: over 16384
        columns, int4: over 8192) goes to BITMMA whatever the number of deltas: the stored product reads
        the base in its own bytes on tiles tuned for it, then the delta kernel reads the bits, where the
        fused paths (GEMV, MERGED_TILES) build and convert every merged weight per tile. Over int8 1.04-1.26x
        faster on 8192x28672 at 1, 4 and 16 rows of one delta (quantized_base.md, "each path"); over int4
        1.07-1.30x on 4096x11008 and 8192x28672 at 1 and 16 rows (the side-by-side run in docs/kernels.md;
        4 rows untimed); at 64 rows, or on narrower layers, the fused paths tie or win."""
        min_n = STORED_PRODUCT_MIN_N.get(self.base_form)
        return (self.gluon and min_n is not None and self.n > min_n
                and self.plan.max_rows <= STORED_PRODUCT_MAX_ROWS)

    @property
    def prefill(self) -> bool:
        """A slot has more rows than the decode tiles of this batch's path take (a prompt's chunk)."""
        if self.few_deltas:
            decode_rows = FEW_DELTAS_DECODE_ROWS
        else:
            decode_rows = BITMMA_MAX_ROWS if self.gluon else DOT_MAX_ROWS
        return self.plan.max_rows > decode_rows


@dataclass(frozen=True)
class Tiles:
    """A program's tile: up to `rows` rows of one slot by `block_n` output columns, walking K
    `block_k` at a time; `num_warps` and `num_stages` as Triton takes them."""

    rows: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.block_k % 32:
            raise ValueError("block_k must be a multiple of 32 (one packed word)")


def next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def programs(tiles: int, n: int, block_n: int) -> int:
    """Programs of a launch over `tiles` row tiles and the column blocks of N."""
    return tiles * -(-n // block_n)
