"""GPU tests of every kernel path against `kernels/reference.py` (skipped without CUDA or Triton).

Every case draws fresh random inputs (no fixed seed: the kernel must compute the same function on
any valid input), fills the output with NaN first so that an unwritten element fails, and checks
the relative error ||out - ref|| / ||ref|| against the fp32 reference evaluated *before* the cast
to the activation dtype. Kernel and reference both multiply exactly (+-1 signs, fp16/bf16
products are exact in fp32) and accumulate in fp32, so what remains is the final rounding to the
activation dtype: at most half an ulp per element, i.e. a relative RMS error near
2**-11 / sqrt(3) ~ 3e-4 for fp16 and 2**-8 / sqrt(3) ~ 2e-3 for bf16. The merged paths
(MERGED_TILES, MERGED_GEMM) round each merged weight W + scale * sign to the activation dtype first
(what `bitdelta merge` writes), one more rounding of the same size spread over the sum: the bounds
allow about three times the total, and stay far below what a misread word, bit order or slot would
cause.
"""

from __future__ import annotations

import pytest
import torch

from bitdelta.kernels import reference

pytestmark = pytest.mark.gpu

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except ImportError:
    _HAVE_TRITON = False

if not (torch.cuda.is_available() and _HAVE_TRITON):
    pytest.skip("needs a CUDA GPU and Triton", allow_module_level=True)

import bitdelta.kernels as kernels  # noqa: E402
from bitdelta.kernels.grouping import build_plan  # noqa: E402
from bitdelta.kernels.paths import (BitmmaTiles, Choice, GemvTiles, KernelPath, MergedGemmTiles,  # noqa: E402
                                    MergedTiles, Problem, Tiles, choose, run_path, split_threshold)

BITMMA, DOT, GEMV = KernelPath.BITMMA, KernelPath.DOT, KernelPath.GEMV
MERGED_TILES, MERGED_GEMM = KernelPath.MERGED_TILES, KernelPath.MERGED_GEMM

BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 6e-3}
DTYPES = list(BOUNDS)


def _problem(m: int, n: int, k: int, s: int, dtype: torch.dtype, per_row_scales: bool = True):
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") * 0.05).to(dtype)
    kw = (k + 31) // 32
    signs = torch.randint(-(2**31), 2**31 - 1, (s, n, kw), dtype=torch.int32, device="cuda")
    if k % 32:  # the layout contract: padding bits are 0
        signs[..., -1] &= (1 << (k % 32)) - 1
    # Scales as large as BitDelta's relative to the base (mean |delta| ~ 0.2 mean |w|), so the
    # delta term is a visible share of y and a wrong sign shows up in the error.
    if per_row_scales:
        scales = torch.rand(s, n, device="cuda") * 0.02 + 0.002
    else:
        scales = (torch.rand(s, 1, device="cuda") * 0.02 + 0.002).expand(s, n).contiguous()
    bias = torch.randn(n, device="cuda").to(dtype)
    return x, w, signs, scales, bias


def _check(out: torch.Tensor, x, w, signs, scales, slot_ids, bias) -> None:
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    ref = reference.bitdelta_matmul(x.float(), w, signs, scales, slot_ids, bias)  # fp32, unrounded
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < BOUNDS[x.dtype], f"relative error {err:.2e}"


def _run(x, w, signs, scales, slot_ids, bias, choice: Choice | None) -> torch.Tensor:
    """The product on `choice`'s path and tiles (None: the path `choose` picks) into a NaN-filled output."""
    plan = build_plan(slot_ids)
    path, tiles = choice or choose(Problem(plan, w.shape[0], w.shape[1]))
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    return run_path(path, tiles, x, w, signs, scales, plan, bias, out=out)


def _slots(kind: str, m: int, s: int) -> torch.Tensor:
    if kind == "same":
        return torch.full((m,), int(torch.randint(0, s, ())), device="cuda")
    if kind == "distinct":
        return torch.randperm(s, device="cuda")[:m]
    return torch.randint(-1, s, (m,), device="cuda")  # mixed, with base-only rows


CHOICES = [
    None,  # whatever `choose` picks
    # DOT: cuBLAS base, then the tl.dot delta kernel on expanded bits, tiles of every height
    Choice(DOT, Tiles(rows=4, block_n=64, block_k=128, num_warps=4, num_stages=2)),
    Choice(DOT, Tiles(rows=1, block_n=32, block_k=256, num_warps=4, num_stages=3)),
    Choice(DOT, Tiles(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=3)),
    Choice(DOT, Tiles(rows=64, block_n=32, block_k=128, num_warps=4, num_stages=4)),
    Choice(DOT, Tiles(rows=128, block_n=32, block_k=128, num_warps=8, num_stages=3)),
    Choice(DOT, Tiles(rows=32, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    Choice(DOT, Tiles(rows=128, block_n=64, block_k=64, num_warps=4, num_stages=4)),
    # BITMMA: the Gluon tensor-core delta kernel, tiles of up to 8 rows on the mma's N side
    Choice(BITMMA, BitmmaTiles(rows=8, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    Choice(BITMMA, BitmmaTiles(rows=8, block_n=128, block_k=256, num_warps=4, num_stages=4)),
    Choice(BITMMA, BitmmaTiles(rows=4, block_n=256, block_k=512, num_warps=8, num_stages=3)),
    # MERGED_TILES: one product with bf16/fp16(W + scale * sign)
    Choice(MERGED_TILES, MergedTiles(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=4)),
    Choice(MERGED_TILES, MergedTiles(rows=64, block_n=64, block_k=64, num_warps=4, num_stages=4)),
    Choice(MERGED_TILES, MergedTiles(rows=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    Choice(MERGED_TILES, MergedTiles(rows=16, block_n=32, block_k=256, num_warps=4, num_stages=3)),
    # one-row BITMMA tiles: the int8 kernel (x as digit planes; 128 x 1024 S2 is what `choose` picks),
    # and a narrow 2-warp tile; the 8-row tile of few-tile batches on wide layers
    Choice(BITMMA, BitmmaTiles(rows=1, block_n=64, block_k=1024, num_warps=2, num_stages=2)),
    Choice(BITMMA, BitmmaTiles(rows=1, block_n=256, block_k=512, num_warps=4, num_stages=3)),
    Choice(BITMMA, BitmmaTiles(rows=1, block_n=128, block_k=1024, num_warps=4, num_stages=2)),
    Choice(BITMMA, BitmmaTiles(rows=1, block_n=64, block_k=256, num_warps=2, num_stages=4)),
    Choice(BITMMA, BitmmaTiles(rows=8, block_n=128, block_k=512, num_warps=4, num_stages=3)),
    # transposed merged tiles (the merged weights as the register A operand); and MERGED_GEMM
    Choice(MERGED_TILES, MergedTiles(rows=64, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True)),
    Choice(MERGED_TILES, MergedTiles(rows=16, block_n=128, block_k=64, num_warps=4, num_stages=3, transposed=True)),
    Choice(MERGED_GEMM, MergedGemmTiles(block_n=32, block_k=256, num_warps=4)),
    # BITMMA tiles of 16, 32 and 64 rows (several 8-column mmas per expanded weight fragment)
    Choice(BITMMA, BitmmaTiles(rows=16, block_n=256, block_k=512, num_warps=4, num_stages=3)),
    Choice(BITMMA, BitmmaTiles(rows=32, block_n=256, block_k=256, num_warps=8, num_stages=2)),
    Choice(BITMMA, BitmmaTiles(rows=64, block_n=128, block_k=256, num_warps=4, num_stages=2)),
    # K split over programs, the last to arrive summing the partials (plain and transposed merged tiles)
    Choice(MERGED_TILES, MergedTiles(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=3)),
    Choice(MERGED_TILES, MergedTiles(rows=64, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True,
                                     split_k=4)),
]


def _choice_id(choice: Choice | None) -> str:
    if choice is None:
        return "auto"
    path, t = choice
    if path is MERGED_GEMM:
        return f"merged_gemm-n{t.block_n}k{t.block_k}w{t.num_warps}"
    form = ("T" if t.transposed else "") + (f"k{t.split_k}" if t.split_k > 1 else "") if path is MERGED_TILES else ""
    return f"{path.value}-r{t.rows}n{t.block_n}k{t.block_k}w{t.num_warps}s{t.num_stages}{form}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["same", "distinct", "mixed"])
@pytest.mark.parametrize("m,n,k", [(1, 333, 4097), (7, 333, 4097), (16, 1024, 512), (33, 300, 1000), (100, 200, 3000)])
@pytest.mark.parametrize("choice", CHOICES, ids=_choice_id)
def test_kernel_matches_reference(m, n, k, kind, dtype, choice):
    s = max(m, 3)
    x, w, signs, scales, bias = _problem(m, n, k, s, dtype)
    slot_ids = _slots(kind, m, s)
    _check(_run(x, w, signs, scales, slot_ids, bias, choice), x, w, signs, scales, slot_ids, bias)


GEMV_TILES = [
    GemvTiles(rows=1, block_n=8, block_k=512, num_warps=2, num_stages=1),
    GemvTiles(rows=1, block_n=16, block_k=1024, num_warps=4, num_stages=1),
    GemvTiles(rows=2, block_n=4, block_k=256, num_warps=1, num_stages=1),
    GemvTiles(rows=4, block_n=4, block_k=512, num_warps=2, num_stages=1),
    GemvTiles(rows=4, block_n=8, block_k=512, num_warps=2, num_stages=1),
    GemvTiles(rows=4, block_n=16, block_k=256, num_warps=4, num_stages=3),
    GemvTiles(rows=4, block_n=4, block_k=512, num_warps=2, num_stages=3),
    GemvTiles(rows=1, block_n=4, block_k=512, num_warps=2, num_stages=3),  # N > 8192
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["same", "distinct", "mixed"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(333, 4097), (1024, 512), (200, 3000), (64, 11008)])
@pytest.mark.parametrize("tiles", GEMV_TILES, ids=lambda t: f"r{t.rows}n{t.block_n}k{t.block_k}w{t.num_warps}s{t.num_stages}")
def test_gemv_matches_reference(m, n, k, kind, dtype, tiles):
    if m > tiles.rows:
        pytest.skip("the gemv program takes the whole batch: m <= rows")
    s = 5
    x, w, signs, scales, bias = _problem(m, n, k, s, dtype)
    slot_ids = _slots(kind, m, s)
    _check(_run(x, w, signs, scales, slot_ids, bias, Choice(GEMV, tiles)), x, w, signs, scales, slot_ids, bias)


def test_gemv_rejects_too_many_rows():
    x, w, signs, scales, bias = _problem(3, 64, 512, 3, torch.bfloat16)
    with pytest.raises(ValueError):
        _run(x, w, signs, scales, torch.arange(3, device="cuda"), bias, Choice(GEMV, GEMV_TILES[2]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,s", [(300, 333, 4097, 3), (1000, 256, 512, 32), (129, 4096, 4096, 1)])
def test_prefill_segments(m, n, k, s, dtype):
    x, w, signs, scales, bias = _problem(m, n, k, s, dtype, per_row_scales=False)
    slot_ids = torch.randint(-1, s, (m,), device="cuda")
    _check(_run(x, w, signs, scales, slot_ids, bias, None), x, w, signs, scales, slot_ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,shuffle,with_bias", [([0], False, True), ([0], False, False), ([-1, 0, 2], False, False),
                                                    ([-1, 0], True, True), ([2, 0, 1], True, False),
                                                    ([1, -1, 1, 0], True, True)])
def test_dispatcher_merges_long_prefill_segments_once(slots, shuffle, with_bias, dtype, monkeypatch):
    """Segments of >= MERGED_GEMM_MIN_ROWS rows take MERGED_GEMM, each slot's weights merged once:
    requests in order (slices of x and y), and shuffled mixes with base-only rows (gather and
    scatter); with and without bias."""
    import bitdelta.kernels.paths.merged_gemm_triton as merged_gemm_triton
    from bitdelta.kernels.paths.merged_gemm import MIN_ROWS as MERGED_GEMM_MIN_ROWS

    merged_slots = []
    merge_weight = merged_gemm_triton.merge_weight

    def counting_merge(base_weight, signs, scales, slot, tiles, out=None, dtype=None):
        merged_slots.append(slot)
        return merge_weight(base_weight, signs, scales, slot, tiles, out=out, dtype=dtype)

    monkeypatch.setattr(merged_gemm_triton, "merge_weight", counting_merge)
    per_slot = 2 * MERGED_GEMM_MIN_ROWS + 3
    slot_ids = torch.tensor(slots, device="cuda").repeat_interleave(per_slot)
    if shuffle:
        slot_ids = slot_ids[torch.randperm(slot_ids.numel(), device="cuda")]
    assert build_plan(slot_ids).in_order != shuffle
    x, w, signs, scales, bias = _problem(slot_ids.numel(), 333, 1000, 3, dtype)
    bias = bias if with_bias else None
    assert choose(Problem(build_plan(slot_ids), 333, 1000)).path is MERGED_GEMM
    _check(_run(x, w, signs, scales, slot_ids, bias, None), x, w, signs, scales, slot_ids, bias)
    assert sorted(merged_slots) == sorted(set(s for s in slots if s >= 0))  # once per delta slot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,kind,choice", [
    (1100, "same", Choice(MERGED_GEMM, MergedGemmTiles(block_n=32, block_k=256, num_warps=4))),
    (100, "mixed", Choice(MERGED_TILES, MergedTiles(rows=64, block_n=64, block_k=128, num_warps=4, num_stages=3,
                                                    transposed=True))),
    (64, "mixed", Choice(BITMMA, BitmmaTiles(rows=16, block_n=256, block_k=512, num_warps=4, num_stages=3))),
    (64, "mixed", Choice(DOT, Tiles(rows=16, block_n=64, block_k=128, num_warps=4, num_stages=3))),
    (3, "distinct", None), (40, "distinct", None),
])
def test_base_weight_stored_transposed(m, kind, choice, dtype):
    """A base weight viewed from its transpose (stride(1) != 1) gives the same function on every path."""
    x, w, signs, scales, bias = _problem(m, 333, 1000, max(m, 3), dtype)
    w_t = w.t().contiguous().t()  # same values, column-major storage
    assert w_t.stride(1) != 1
    slot_ids = _slots(kind, m, max(m, 3))
    _check(_run(x, w_t, signs, scales, slot_ids, bias, choice), x, w, signs, scales, slot_ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(333, 4097), (4096, 4096), (64, 40)])
def test_merge_weight_is_bitdelta_merge_bit_for_bit(n, k, dtype):
    """The GPU merge rounds base + scale * sign once, exactly as the reference (and `bitdelta merge`)."""
    from bitdelta.kernels.paths.merged_gemm_triton import merge_weight

    _, w, signs, scales, _ = _problem(1, n, k, 3, dtype)
    slot = int(torch.randint(0, 3, ()))
    out = torch.full_like(w, float("nan"))
    merge_weight(w, signs, scales, slot, MergedGemmTiles(block_n=32, block_k=256, num_warps=4), out=out)
    torch.testing.assert_close(out, reference.merged_weight(w, signs, scales, slot), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk,decoders,shuffle", [(300, 40, False), (700, 20, True), (65, 3, True)])
def test_entry_point_splits_a_prefill_chunk_from_decode_rows(chunk, decoders, shuffle, dtype):
    """A step with a prefill chunk (slot 0), one-row decode slots and base-only rows: the entry point
    dispatches the long and the short segments apart and scatters both back."""
    slot_ids = torch.cat([torch.zeros(chunk, dtype=torch.long), torch.arange(1, decoders + 1),
                          torch.full((3,), -1)]).cuda()
    if shuffle:
        slot_ids = slot_ids[torch.randperm(slot_ids.numel(), device="cuda")]
    plan = build_plan(slot_ids)
    assert split_threshold(plan) is not None
    x, w, signs, scales, bias = _problem(slot_ids.numel(), 333, 1000, decoders + 1, dtype)
    _check(kernels.bitdelta_matmul(x, w, signs, scales, slot_ids, bias, plan), x, w, signs, scales, slot_ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_entry_point_without_bias_and_with_plan(dtype):
    x, w, signs, scales, _ = _problem(12, 500, 777, 5, dtype)
    slot_ids = torch.tensor([4, 4, -1, 0, 1, 1, 1, 2, 3, -1, 0, 4], device="cuda")
    out = kernels.bitdelta_matmul(x, w, signs, scales, slot_ids)
    _check(out, x, w, signs, scales, slot_ids, None)
    again = kernels.bitdelta_matmul(x, w, signs, scales, slot_ids, plan=build_plan(slot_ids))
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("choice", [
    Choice(MERGED_TILES, MergedTiles(rows=8, block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=2)),
    Choice(GEMV, GemvTiles(rows=1, block_n=8, block_k=512, num_warps=2, num_stages=1)),
    Choice(BITMMA, BitmmaTiles(rows=8, block_n=128, block_k=256, num_warps=4, num_stages=4)),
    Choice(DOT, Tiles(rows=8, block_n=64, block_k=128, num_warps=4, num_stages=3)),
    Choice(MERGED_GEMM, MergedGemmTiles(block_n=32, block_k=256, num_warps=4)),
], ids=_choice_id)
def test_all_base_only_rows(choice):
    """Every kernel path on a batch of base-only rows (masked bits, zero scales); the entry point
    takes DENSE for it."""
    m = choice.tiles.rows if choice.path is GEMV else 5
    x, w, signs, scales, bias = _problem(m, 200, 300, 2, torch.bfloat16)
    slot_ids = torch.full((m,), -1, device="cuda")
    _check(_run(x, w, signs, scales, slot_ids, bias, choice), x, w, signs, scales, slot_ids, bias)
    # through the entry point a batch without delta rows is the dense layer itself, bit for bit
    exact = torch.nn.functional.linear(x, w, bias)
    torch.testing.assert_close(kernels.bitdelta_matmul(x, w, signs, scales, slot_ids, bias), exact, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rows_per_slot", [(4, 320, 11008, 1), (16, 4096, 4096, 1), (64, 1000, 4096, 1),
                                                 (48, 700, 8192, 3), (64, 256, 2048, 8), (64, 700, 4096, 13),
                                                 (64, 256, 11008, 16), (192, 300, 1000, 32), (320, 200, 4097, 64)])
def test_dispatcher_picks_bitmma_for_decode_tiles(m, n, k, rows_per_slot, dtype):
    """Several deltas with up to 64 rows each (and base-only rows): BITMMA, on tiles of 8..64 rows."""
    s = m // rows_per_slot
    x, w, signs, scales, bias = _problem(m, n, k, s + 1, dtype)
    slot_ids = (torch.randperm(m, device="cuda") // rows_per_slot) - 1  # slot -1: base only
    assert choose(Problem(build_plan(slot_ids), n, k)).path is BITMMA
    _check(_run(x, w, signs, scales, slot_ids, bias, None), x, w, signs, scales, slot_ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 22016, 4096), (8, 22016, 4096), (16, 22016, 4096), (32, 12288, 4096),
                                   (64, 22016, 4096), (1, 10240, 8192)])
def test_dispatcher_on_stacked_projections_with_one_shared_delta(m, n, k, dtype):
    """The shapes of a 7B and a 70B model's stacked q/k/v and gate/up, one delta shared by the batch:
    the tiles `choose` picks for them."""
    x, w, signs, scales, bias = _problem(m, n, k, 2, dtype)
    slot_ids = torch.ones(m, dtype=torch.long, device="cuda")
    _check(_run(x, w, signs, scales, slot_ids, bias, None), x, w, signs, scales, slot_ids, bias)


SPLIT = Choice(MERGED_TILES, MergedTiles(rows=16, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True,
                                         split_k=4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_sums_in_split_order_and_leaves_its_counters_at_zero(dtype):
    """Split-K adds the partials in split order whatever order the programs finish in: two runs give
    the same bits. Each launch resets the arrival counters it used, so the next call starts from zero."""
    from bitdelta.kernels.split_k import split_counters

    m, n, k = 24, 1000, 3000
    x, w, signs, scales, bias = _problem(m, n, k, 2, dtype)
    slot_ids = torch.randint(-1, 2, (m,), device="cuda")
    first = _run(x, w, signs, scales, slot_ids, bias, SPLIT)
    _check(first, x, w, signs, scales, slot_ids, bias)
    for _ in range(3):
        assert torch.equal(_run(x, w, signs, scales, slot_ids, bias, SPLIT), first)
    assert not split_counters(x.device, 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 11008), (2, 4096, 11008), (4, 8192, 28672), (64, 4096, 4096),
                                   (64, 8192, 8192), (3, 4096, 9000)])
def test_dispatched_split_k_paths(m, n, k, dtype):
    """One delta on narrow or long layers: K split on 32-column and transposed 64-row tiles (2 or 4
    ranges), and 1-4 rows on long rows taken from the gemv by MERGED_TILES."""
    x, w, signs, scales, bias = _problem(m, n, k, 2, dtype)
    slot_ids = torch.ones(m, dtype=torch.long, device="cuda")
    assert choose(Problem(build_plan(slot_ids), n, k)).path is MERGED_TILES
    _check(_run(x, w, signs, scales, slot_ids, bias, None), x, w, signs, scales, slot_ids, bias)


def test_split_k_replays_in_a_cuda_graph_on_new_inputs():
    """The engine replays decode steps as CUDA graphs: a captured split-K call, replayed on inputs
    copied into its buffers, computes the new product (the counters are reused across replays)."""
    m, n, k, dtype = 32, 4096, 2048, torch.bfloat16
    x, w, signs, scales, bias = _problem(m, n, k, 2, dtype)
    slot_ids = torch.zeros(m, dtype=torch.long, device="cuda")
    plan = build_plan(slot_ids)
    tiles = MergedTiles(rows=32, block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=4)
    run_path(MERGED_TILES, tiles, x, w, signs, scales, plan, bias)  # compile and allocate before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_path(MERGED_TILES, tiles, x, w, signs, scales, plan, bias)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, w, signs, scales, slot_ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_tiles_keep_outlier_rows_and_zero_rows_exact(dtype):
    """The one-row kernel (int8) writes x as a 28-bit fixed point of each row's |max|: a row with one
    activation 10^4 times the rest must keep its small entries, and an all-zero row (max 0) must give
    exactly the base output."""
    m, n, k = 6, 520, 4096
    x, w, signs, scales, bias = _problem(m, n, k, m, dtype)
    x[1, 17] = 1e4 * x[1].abs().mean()
    x[2] = 0
    slot_ids = torch.randperm(m, device="cuda")
    choice = Choice(BITMMA, BitmmaTiles(rows=1, block_n=128, block_k=512, num_warps=4, num_stages=4))
    out = _run(x, w, signs, scales, slot_ids, bias, choice)
    _check(out, x, w, signs, scales, slot_ids, bias)
    for row in range(m):  # row by row, so the outlier row's error is not hidden by the others
        _check(out[row:row + 1], x[row:row + 1], w, signs, scales, slot_ids[row:row + 1], bias)
    base = (x[2:3].float() @ w.float().t() + bias.float()).to(dtype)
    torch.testing.assert_close(out[2:3], base, rtol=0, atol=0)


def test_fast_launch_skips_jit_run_once_compiled_and_honours_launch_hooks(monkeypatch):
    """The second launch of a compiled specialisation bypasses JITFunction.run (its host time is what
    the fast path saves) and computes the same; with a launch hook registered, launches go through
    Triton's path again, so profilers still see them; debug mode selects its own binary."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    calls = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: calls.append(self) or real_run(self, *a, **kw))
    x, w, signs, scales, bias = _problem(40, 256, 512, 3, torch.float16)
    slot_ids = _slots("mixed", 40, 3)
    choice = Choice(MERGED_TILES, MergedTiles(rows=16, block_n=64, block_k=128, num_warps=4, num_stages=3,
                                              transposed=True))
    for _ in range(3):
        _check(_run(x, w, signs, scales, slot_ids, bias, choice), x, w, signs, scales, slot_ids, bias)
    assert len(calls) <= 1  # at most the first launch (none if an earlier test compiled this specialisation)
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        _run(x, w, signs, scales, slot_ids, bias, choice)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(calls) >= 1 and len(seen) == 1
    before = len(calls)
    monkeypatch.setattr(knobs.runtime, "debug", True)  # a debug binary is another binary: Triton's path compiles it
    _check(_run(x, w, signs, scales, slot_ids, bias, choice), x, w, signs, scales, slot_ids, bias)
    assert len(calls) == before + 1


@pytest.mark.parametrize("base", ["bf16", "int8", "fp8", "int4"])
@pytest.mark.parametrize("pairs,experts", [(64, 16), (1200, 8)], ids=["decode pairs", "prompt pairs"])
def test_grouped_experts_match_the_reference(base, pairs, experts):
    """expert_matmul in one launch over random (expert, slot) pairs, base-only pairs among them: each
    pair equals the reference over its own expert and slot (bf16 output: bound 1e-2 relative a row)."""
    from bitdelta.kernels.experts import ExpertPairs, expert_matmul, grouped
    from bitdelta.quant import quantize

    slots, n, k = 5, 160, 1000
    dense = torch.randn(experts, n, k, device="cuda") * 0.05
    weights = dense.bfloat16() if base == "bf16" else quantize(dense.reshape(experts * n, k), base)
    reference_weights = dense.bfloat16().float() if base == "bf16" else weights.dequantize().view(experts, n, k)
    signs = torch.randint(-(2**31), 2**31 - 1, (experts, slots, n, (k + 31) // 32), dtype=torch.int32, device="cuda")
    scales = torch.rand(experts, slots, n, device="cuda") * 0.02 + 0.002
    pair_experts = torch.randint(0, experts - 1, (pairs,), device="cuda")  # the last expert gets no pair
    pair_slots = torch.randint(-1, slots, (pairs,), device="cuda")
    x = torch.randn(pairs, k, device="cuda").bfloat16()
    assert grouped(x, weights)
    out = expert_matmul(x, weights, signs, scales, ExpertPairs(pair_experts, pair_slots, experts, slots))
    ref = reference.expert_matmul(x.float(), reference_weights, signs, scales, pair_experts, pair_slots)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-2


def test_grouped_experts_replay_in_a_cuda_graph_on_new_routing():
    """The experts' product captured once replays with new inputs and new routing: nothing in it was
    read on the host at capture."""
    from bitdelta.kernels.experts import ExpertPairs, expert_matmul

    experts, slots, n, k, pairs = 8, 3, 96, 512, 48
    weights = (torch.randn(experts, n, k, device="cuda") * 0.05).bfloat16()
    signs = torch.randint(-(2**31), 2**31 - 1, (experts, slots, n, k // 32), dtype=torch.int32, device="cuda")
    scales = torch.rand(experts, slots, n, device="cuda") * 0.02
    x = torch.randn(pairs, k, device="cuda").bfloat16()
    pair_experts = torch.randint(0, experts, (pairs,), device="cuda")
    pair_slots = torch.randint(-1, slots, (pairs,), device="cuda")
    expert_matmul(x, weights, signs, scales, ExpertPairs(pair_experts, pair_slots, experts, slots))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = expert_matmul(x, weights, signs, scales, ExpertPairs(pair_experts, pair_slots, experts, slots))
    x.copy_(torch.randn_like(x))
    pair_experts.copy_(torch.randint(0, experts, (pairs,), device="cuda"))
    pair_slots.copy_(torch.randint(-1, slots, (pairs,), device="cuda"))
    graph.replay()
    ref = reference.expert_matmul(x.float(), weights.float(), signs, scales, pair_experts, pair_slots)
    assert ((out.float() - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-2
