"""CPU tests of the kernel path choice (`bitdelta.kernels.paths`): which path a batch takes, with which
tiles, where K is split, how a prefill chunk is split from decode rows, and what each path's tile
parameters refuse. No Triton needed, except for the interpreter test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from bitdelta.kernels import reference, split_k
from bitdelta.kernels.base_product import GROUP_SCALED, PLAIN, ROW_SCALED, form_of
from bitdelta.kernels.grouping import build_plan
from bitdelta.kernels.paths import (BitmmaTiles, Choice, GemvTiles, KernelPath, MergedGemmTiles, MergedTiles,
                                    Problem, Tiles, choose, plan_choice, run_path, split_threshold)
from bitdelta.kernels.paths.bitmma import ONE_ROW_MAX_K
from bitdelta.kernels.paths.gemv import MAX_ROWS as GEMV_MAX_ROWS
from bitdelta.kernels.paths.merged_gemm import MIN_ROWS as MERGED_GEMM_MIN_ROWS
from bitdelta.kernels.paths.problem import (BITMMA_MAX_ROWS, DOT_MAX_ROWS, FEW_DELTAS, FEW_DELTAS_DECODE_ROWS,
                                            H100_SMS, next_pow2)
from conftest import needs_triton_interpreter, run_in_triton_interpreter

BITMMA, DOT, GEMV = KernelPath.BITMMA, KernelPath.DOT, KernelPath.GEMV
MERGED_TILES, MERGED_GEMM, DENSE = KernelPath.MERGED_TILES, KernelPath.MERGED_GEMM, KernelPath.DENSE


def _choice(n: int, slot_ids: torch.Tensor, k: int = 4096, gluon: bool = True, sms: int = H100_SMS,
            base_form: int = PLAIN) -> Choice:
    return choose(Problem(build_plan(slot_ids.long()), n, k, gluon, sms, base_form))


def _choice_over(n: int, slot_ids: torch.Tensor, base_form: int, gluon: bool = True) -> Choice:
    """The choice on a layer of 8192 inputs over a base stored as `base_form`."""
    return _choice(n, slot_ids, k=8192, gluon=gluon, base_form=base_form)


def _one_delta(rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.long)


def test_a_batch_without_delta_rows_is_the_dense_layer():
    assert _choice(4096, torch.full((3,), -1)) == (DENSE, None)
    assert _choice(4096, torch.zeros(0, dtype=torch.long)).path is DENSE


def test_many_distinct_deltas_take_the_bitmma_tiles():
    path, tiles = _choice(4096, torch.arange(32))
    assert path is BITMMA and (tiles.rows, tiles.block_k, tiles.num_stages) == (1, 1024, 2)  # one row: int8
    assert _choice(4096, torch.arange(32), k=ONE_ROW_MAX_K + 1).tiles.rows == 8  # past the int8 accumulator's K
    assert _choice(4096, torch.arange(16).repeat(8)).tiles.rows == 8  # 8 rows a slot: one tile each
    assert _choice(4096, torch.arange(16).repeat(2), k=11008).tiles.block_k == 256  # long rows
    assert _choice(4096, torch.arange(16), k=11008).tiles.rows == 1  # one-row tiles: any K up to the bound
    assert _choice(4096, torch.arange(4).repeat(2)).tiles.block_n == 64  # 4 tiles: narrow blocks
    nine = _choice(4096, torch.arange(64).repeat(9))  # 9 rows a slot: one 16-row tile
    assert nine.path is BITMMA and nine.tiles.rows == 16
    zipf = torch.repeat_interleave(torch.arange(27), torch.tensor([14, 5, 5, 4, 4, 3, 3] + [2] * 6 + [1] * 14))
    assert _choice(4096, zipf).tiles.rows == 8  # mostly small slots: 8-row tiles waste less
    assert _choice(4096, torch.arange(32).repeat(32)).tiles.rows == 32
    assert _choice(4096, torch.arange(32).repeat(BITMMA_MAX_ROWS)).tiles.rows == 64


def test_without_gluon_several_deltas_take_the_dot_kernel():
    assert _choice(4096, torch.arange(32)).path is BITMMA
    assert _choice(4096, torch.arange(32), gluon=False) == (DOT, Tiles(1, 64, 128, 4, 3))
    assert _choice(4096, torch.arange(64).repeat(9), gluon=False) == (DOT, Tiles(16, 64, 128, 4, 3))
    # past DOT_MAX_ROWS rows a slot they are prefill already: transposed merged tiles
    prefill = _choice(4096, torch.arange(4).repeat(DOT_MAX_ROWS + 1), gluon=False)
    assert prefill.path is MERGED_TILES and prefill.tiles.transposed


def test_one_or_two_deltas_take_merged_tiles():
    shared = _choice(4096, _one_delta(16))
    assert shared.path is MERGED_TILES and shared.tiles.rows == 16
    assert _choice(4096, torch.arange(FEW_DELTAS).repeat(8)).path is MERGED_TILES
    assert _choice(4096, torch.arange(FEW_DELTAS + 1).repeat(8)).path is BITMMA
    # decode tiles up to FEW_DELTAS_DECODE_ROWS rows, then prefill tiles
    assert _choice(4096, _one_delta(64)).tiles == MergedTiles(64, 32, 128, 4, 4, split_k=2)
    wide = _choice(8192, _one_delta(64)).tiles
    assert wide.block_n == 64 and wide.transposed  # wide layers: the product computed transposed
    assert not _choice(8192, _one_delta(32)).tiles.transposed
    assert _choice(4096, _one_delta(FEW_DELTAS_DECODE_ROWS)).tiles.rows == 128
    # the stacked projections: K = 4096 keeps 32-row tiles 32 wide; a 4096x22016 layer takes untransposed
    # 64 x 64 tiles for 64 rows and 32 x 256 ones for 8-16 rows
    assert _choice(12288, _one_delta(32), k=4096).tiles.block_n == 32
    # deeper layers keep 32-row tiles 32 wide where they fit one wave (3 blocks an SM)
    assert _choice(10240, _one_delta(32), k=8192).tiles.block_n == 32
    assert _choice(28672, _one_delta(32), k=8192).tiles.block_n == 64
    assert _choice(10240, torch.arange(64) % 2, k=8192).tiles.block_n == 64  # two deltas: twice the programs
    gate_up = _choice(22016, _one_delta(64), k=4096).tiles
    assert (gate_up.block_n, gate_up.block_k, gate_up.transposed) == (64, 64, False)
    assert _choice(28672, _one_delta(64), k=8192).tiles.transposed
    assert _choice(22016, _one_delta(128), k=4096).tiles.block_n == 64
    for rows in (8, 16):
        assert _choice(22016, _one_delta(rows), k=4096).tiles.block_k == 256
    assert _choice(11008, _one_delta(8), k=4096).tiles.block_k == 128


def test_prefill_takes_transposed_merged_tiles_or_the_merged_gemm():
    prefill = _choice(4096, _one_delta(FEW_DELTAS_DECODE_ROWS + 1))
    assert prefill == (MERGED_TILES, MergedTiles(128, 64, 128, 4, 3, transposed=True))
    assert _choice(4096, torch.arange(4).repeat_interleave(256)).tiles.block_n == 128  # >= 256 programs: wide blocks
    few_programs = _choice(4096, torch.arange(4).repeat_interleave(128)).tiles  # 4 tiles x 32 blocks
    assert (few_programs.block_n, few_programs.block_k, few_programs.num_stages) == (64, 64, 4)
    many = _choice(4096, torch.arange(4).repeat(BITMMA_MAX_ROWS + 1))  # 4 deltas, 65 rows each: prefill tiles
    assert many.path is MERGED_TILES and many.tiles.rows == 128 and many.tiles.transposed
    # every delta segment of >= MERGED_GEMM_MIN_ROWS rows (twice that when rows of more than FEW_DELTAS
    # deltas must be gathered): merged weights once, then cuBLAS
    assert _choice(4096, _one_delta(MERGED_GEMM_MIN_ROWS)) == (MERGED_GEMM, MergedGemmTiles(32, 256, 4))
    base_rows = torch.cat([torch.full((3,), -1), _one_delta(MERGED_GEMM_MIN_ROWS)])
    assert _choice(4096, base_rows).path is MERGED_GEMM  # a few base-only rows do not count
    four = torch.arange(4).repeat_interleave(MERGED_GEMM_MIN_ROWS)
    assert _choice(4096, four).path is MERGED_GEMM  # whole requests in order: slices, no gather
    shuffled = four[torch.randperm(four.numel())]
    assert _choice(4096, shuffled).path is MERGED_TILES
    assert _choice(4096, shuffled.repeat_interleave(2)).path is MERGED_GEMM
    assert _choice(4096, torch.cat([four, torch.tensor([9])])).path is MERGED_TILES  # one short segment


def test_k_is_split_where_merged_tiles_leave_sms_idle():
    """One or two deltas in 32-column or transposed tiles of up to 64 rows split K in two (four for
    2-warp tiles) where the tiles make at most one program an SM; one row on long rows of a 4096-wide
    layer takes that pass instead of the gemv."""
    def choice(n: int, rows: int, k: int, deltas: int = 1) -> Choice:
        return _choice(n, torch.arange(rows) % deltas, k=k)

    for rows in (4, 16, 32, 64):
        narrow = choice(4096, rows, 11008)
        assert narrow.path is MERGED_TILES and narrow.tiles.block_n == 32 and narrow.tiles.split_k == 2
    assert choice(4096, 32, 11008, deltas=2).tiles.split_k == 1  # two deltas' tiles: 256 programs
    one_row = choice(4096, 1, 11008)
    assert one_row == (MERGED_TILES, MergedTiles(1, 32, 128, 2, 3, split_k=4))
    assert choice(8192, 1, 28672).path is GEMV
    assert choice(8192, 64, 8192).tiles == MergedTiles(64, 64, 128, 4, 3, transposed=True, split_k=2)
    assert choice(8192, 64, 28672).tiles.split_k == 2
    for n, k in ((10240, 8192), (11008, 4096), (12288, 4096)):  # more programs than SMs: not split
        assert choice(n, 64, k).tiles.transposed and choice(n, 64, k).tiles.split_k == 1
    assert choice(8192, 32, 8192).tiles.split_k == 1  # 64-column untransposed tiles
    assert choice(8192, 16, 8192).tiles.split_k == 1  # 256 programs
    assert choice(4096, 128, 4096).tiles.split_k == 1  # 128-row tiles
    assert choice(4096, 1, 4096).path is GEMV and choice(8192, 1, 8192).path is GEMV  # K <= 8192: the gemv
    assert choice(4096, 200, 4096).tiles.split_k == 1  # prefill tiles are never split
    # counted against the device's SMs: 132 programs split on an H100 SXM, 133 do not; 114 SMs (an H100
    # PCIe) leave the 128 programs of N = 4096 unsplit
    assert choice(132 * 32, 16, 8192).tiles.split_k == 2 and choice(132 * 32 + 1, 16, 8192).tiles.split_k == 1
    assert _choice(4096, _one_delta(16), k=11008, sms=114).tiles.split_k == 1


def test_few_rows_take_the_gemv_where_it_is_fastest():
    path, one = _choice(4096, torch.tensor([3]))
    assert path is GEMV and one.rows == 1 and one.block_k == 256 * one.num_warps
    assert _choice(16384, torch.tensor([2]), k=16384).tiles.block_k == 1024  # long rows, wide layer
    assert _choice(11008, _one_delta(1), k=4096).tiles == GemvTiles(1, 4, 512, 2, 3)  # wide: pipelined
    assert _choice(4096, _one_delta(1), k=4096).tiles.block_n == 8
    # one shared slot, 4 rows: gemv only on wide layers, else merged tiles (long rows too)
    assert _choice(4096, _one_delta(4)).path is MERGED_TILES
    assert _choice(4096, _one_delta(4), k=11008).path is MERGED_TILES
    wide = _choice(28672, _one_delta(3), k=8192)
    assert wide == (GEMV, GemvTiles(4, 4, 512, 2, 3))  # 3 rows in a 4-row program, the K loop pipelined
    # several slots: gemv for 2-3 rows on N <= 4096, K <= 8192; at 4 rows the tensor-core delta kernel
    assert _choice(4096, torch.tensor([0, 1, -1])).path is GEMV
    assert _choice(4096, torch.arange(4)).path is BITMMA
    assert _choice(4096, torch.tensor([0, 1]), k=11008).path is not GEMV
    assert _choice(8192, torch.arange(3), k=8192).path is not GEMV
    assert _choice(4096, torch.arange(GEMV_MAX_ROWS + 1)).path is not GEMV


def test_over_an_int4_base_wide_layers_leave_the_gemv():
    for n, slot_ids in ((28672, _one_delta(1)), (11008, _one_delta(1)), (28672, _one_delta(3))):
        assert _choice_over(n, slot_ids, PLAIN).path is GEMV
        assert _choice_over(n, slot_ids, GROUP_SCALED).path is BITMMA  # the stored product, then the delta kernel
        assert _choice_over(n, slot_ids, GROUP_SCALED, gluon=False).path is MERGED_TILES
    assert _choice_over(11008, _one_delta(1), ROW_SCALED).path is GEMV
    assert _choice_over(8192, _one_delta(1), GROUP_SCALED).path is GEMV  # narrow enough: the gemv stays


def test_over_an_int8_or_fp8_base_the_merged_tiles_take_deeper_k_steps_and_split_k_more():
    """The merged tiles over a row-scaled base as its own sweep measured best (kernels_sweep
    --base-quant int8 and fp8, H100): 3-8 rows K steps of 256, three stages; 16 and 64 rows on layers of
    8192+ columns 64 wide with K split in two where that makes at most four programs an SM (16 rows
    transposed; 64 rows K steps of 64 on short rows). A plain base keeps its own tiles."""
    def tiles(n: int, rows: int, k: int = 4096, base_form: int = ROW_SCALED) -> MergedTiles:
        choice = _choice(n, _one_delta(rows), k=k, base_form=base_form)
        assert choice.path is MERGED_TILES
        return choice.tiles

    assert tiles(8192, 4, k=8192) == MergedTiles(4, 32, 256, 4, 3)
    assert tiles(4096, 4) == MergedTiles(4, 32, 256, 4, 3, split_k=2)  # 128 programs: the plain rule's split
    assert tiles(4096, 8) == MergedTiles(8, 32, 256, 4, 3, split_k=2)
    assert tiles(8192, 8, k=8192) == MergedTiles(8, 32, 256, 4, 3)
    assert tiles(4096, 8, base_form=PLAIN) == MergedTiles(8, 32, 128, 4, 4, split_k=2)
    assert tiles(8192, 4, k=8192, base_form=PLAIN) == MergedTiles(4, 32, 128, 4, 4)
    assert tiles(11008, 16) == MergedTiles(16, 64, 128, 4, 3, transposed=True, split_k=2)  # 172 programs
    assert tiles(11008, 16, base_form=PLAIN) == MergedTiles(16, 32, 128, 4, 4)
    assert tiles(4096, 16) == tiles(4096, 16, base_form=PLAIN)  # narrow layers: the plain tiles
    assert tiles(11008, 64) == MergedTiles(64, 64, 64, 4, 4, split_k=2)
    assert tiles(8192, 64, k=8192) == MergedTiles(64, 64, 128, 4, 3, split_k=2)
    assert tiles(28672, 64, k=8192) == tiles(28672, 64, k=8192, base_form=PLAIN)  # 448 programs: the plain tiles
    assert tiles(11008, 64, base_form=PLAIN).transposed
    assert tiles(4096, 1) == MergedTiles(1, 32, 128, 2, 3, split_k=4)  # one row: the rule of a plain base


def test_over_a_quantized_base_wide_layers_take_the_stored_product_and_the_delta_kernel():
    for slot_ids in (_one_delta(1), _one_delta(4), _one_delta(16), torch.tensor([0, 0, 1, 1])):
        assert _choice_over(28672, slot_ids, ROW_SCALED).path is BITMMA
        assert _choice_over(28672, slot_ids, PLAIN).path in (GEMV, MERGED_TILES)  # the fused paths on a plain base
        assert _choice_over(11008, slot_ids, ROW_SCALED).path in (GEMV, MERGED_TILES)  # and on narrower layers
        assert _choice_over(28672, slot_ids, ROW_SCALED, gluon=False).path in (GEMV, MERGED_TILES)  # no Gluon delta kernel
    assert _choice_over(28672, _one_delta(64), ROW_SCALED).path is MERGED_TILES  # 64 rows: the merged tiles tie or win
    assert _choice_over(28672, _one_delta(17), ROW_SCALED).path is MERGED_TILES  # past 16 rows a slot
    assert _choice_over(16384, _one_delta(4), ROW_SCALED).path is not BITMMA  # wider than 16384 only
    assert _choice_over(16385, _one_delta(4), ROW_SCALED).path is BITMMA
    # over int4, wider than 8192 (up to 16 rows a slot)
    assert _choice_over(8192, _one_delta(16), GROUP_SCALED).path is MERGED_TILES
    assert _choice_over(8193, _one_delta(16), GROUP_SCALED).path is BITMMA
    assert _choice_over(11008, _one_delta(64), GROUP_SCALED).path is MERGED_TILES


def test_one_row_over_a_quantized_narrow_layer_takes_merged_tiles_split():
    for form in (ROW_SCALED, GROUP_SCALED):
        chosen = _choice(4096, _one_delta(1), base_form=form)
        assert chosen.path is MERGED_TILES and chosen.tiles.split_k == 4
    assert _choice(4096, _one_delta(1)).path is GEMV  # the plain base keeps the gemv


def test_the_entry_point_chooses_by_the_base_it_is_given():
    from bitdelta.quant import quantize

    w = torch.randn(11008, 64)
    assert form_of(w) == PLAIN
    assert form_of(quantize(w, "int8")) == ROW_SCALED and form_of(quantize(w, "int4")) == GROUP_SCALED
    plan = build_plan(_one_delta(1))
    assert plan_choice(plan, 11008, 4096).path is GEMV
    assert plan_choice(plan, 11008, 4096, base_form=GROUP_SCALED).path is BITMMA  # not the plain base's memo


def test_plan_choice_is_built_once_per_plan_and_shape():
    plan = build_plan(torch.arange(8))
    first = plan_choice(plan, 4096, 4096)
    assert plan_choice(plan, 4096, 4096) is first  # cached: every layer of the step reuses it
    assert plan_choice(plan, 4096, 4096, gluon=False).path is DOT  # a different key
    assert first == choose(Problem(plan, 4096, 4096))


def test_split_threshold_separates_prefill_chunks_from_decode_rows():
    chunk_and_decoders = torch.cat([_one_delta(BITMMA_MAX_ROWS + 1), torch.arange(1, 40)])
    assert split_threshold(build_plan(chunk_and_decoders)) == BITMMA_MAX_ROWS
    assert split_threshold(build_plan(_one_delta(1000))) is None  # one long segment
    assert split_threshold(build_plan(torch.arange(64).repeat(3))) is None  # decode only
    slot_ids = torch.tensor([2] * 5 + [-1, 0, 7, 0] + [2] * 3 + [-1] * 9)
    assert split_threshold(build_plan(slot_ids)) is None  # every segment a decode segment (<= 64 rows)


def test_tile_parameters_refuse_what_their_kernels_cannot_run():
    with pytest.raises(ValueError):  # a bitmma tile's rows fill whole 8-column mmas: <= 8, 16, 32 or 64
        BitmmaTiles(rows=12, block_n=128, block_k=256, num_warps=4, num_stages=3)
    BitmmaTiles(rows=32, block_n=128, block_k=256, num_warps=4, num_stages=3)
    # the ring's shared memory, as the compiler reports it (offline sm_90 builds)
    assert BitmmaTiles(rows=8, block_n=256, block_k=512, num_warps=4, num_stages=3).shared_bytes() == 73728
    assert BitmmaTiles(rows=64, block_n=128, block_k=512, num_warps=4, num_stages=3).shared_bytes() == 221184
    assert BitmmaTiles(rows=1, block_n=128, block_k=1024, num_warps=4, num_stages=2).shared_bytes() == 40960
    with pytest.raises(ValueError, match="shared memory"):  # 64 rows x 1024 k x 3 stages: 417 KB
        BitmmaTiles(rows=64, block_n=128, block_k=1024, num_warps=4, num_stages=3)
    with pytest.raises(ValueError):  # each warp owns 16-row mma slabs
        BitmmaTiles(rows=8, block_n=96, block_k=256, num_warps=4, num_stages=3)
    with pytest.raises(ValueError):  # whole packed words a K step
        Tiles(rows=1, block_n=32, block_k=48, num_warps=4, num_stages=3)
    with pytest.raises(ValueError):  # the gemv unrolls 1, 2 or 4 rows
        GemvTiles(rows=8, block_n=8, block_k=512, num_warps=2, num_stages=1)
    with pytest.raises(ValueError):  # transposed tiles need tl.dot's >= 16 rows
        MergedTiles(rows=8, block_n=64, block_k=128, num_warps=4, num_stages=3, transposed=True)
    with pytest.raises(ValueError, match="split_k"):
        MergedTiles(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=0)
    assert MergedTiles(rows=16, block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=4).split_k == 4
    with pytest.raises(ValueError):  # the merge kernel's tile is a power of two
        MergedGemmTiles(block_n=32, block_k=96, num_warps=4)
    assert [next_pow2(v) for v in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]


def test_gemv_refuses_more_rows_than_its_program_takes():
    x, w = torch.randn(3, 64), torch.randn(8, 64)
    signs, scales = torch.zeros(3, 8, 2, dtype=torch.int32), torch.ones(3, 8)
    plan = build_plan(torch.arange(3))
    with pytest.raises(ValueError, match="whole batch"):
        run_path(GEMV, GemvTiles(2, 4, 256, 1, 1), x, w, signs, scales, plan)


def test_dense_path_is_the_linear_layer_itself():
    x, w, bias = torch.randn(5, 40), torch.randn(7, 40), torch.randn(7)
    signs, scales = torch.zeros(1, 7, 2, dtype=torch.int32), torch.ones(1, 7)
    plan = build_plan(torch.full((5,), -1))
    out = torch.full((5, 7), float("nan"))
    run_path(DENSE, None, x, w, signs, scales, plan, bias, out=out)
    assert torch.equal(out, torch.nn.functional.linear(x, w, bias))
    expected = reference.bitdelta_matmul(x, w, signs, scales, torch.full((5,), -1), bias)
    torch.testing.assert_close(out, expected)


def test_split_counters_grow_without_freeing_the_buffer_graphs_hold():
    """A grown counter buffer replaces the old one for new calls, but the old one stays alive: a CUDA
    graph captured before the growth still holds its address."""
    device = torch.device("cpu")
    first = split_k.split_counters(device, 10)
    assert first.numel() >= 10 and not first.any()
    assert split_k.split_counters(device, first.numel()) is first  # no growth: the same buffer
    grown = split_k.split_counters(device, first.numel() + 1)
    assert grown.numel() > first.numel() and not grown.any()
    assert any(kept is first for kept in split_k._retired_counters)


@needs_triton_interpreter
def test_segment_kernel_in_the_triton_interpreter():
    """The segment kernel with K split on the CPU under TRITON_INTERPRET=1, against the reference
    (plain and transposed merged tiles, bias, K tails, base-only rows, split ranges past K); the
    arrival counters end at zero. (DOT needs cuBLAS's fp32-out product: GPU tests only.)"""
    code = """
import torch
from bitdelta.kernels import reference
from bitdelta.kernels.grouping import build_plan
from bitdelta.kernels.paths import KernelPath, MergedTiles, run_path
from bitdelta.kernels.split_k import split_counters
cases = [(5, 40, 300, KernelPath.MERGED_TILES, MergedTiles(8, 16, 64, 4, 1, split_k=3)),
         (16, 33, 1000, KernelPath.MERGED_TILES, MergedTiles(16, 16, 64, 4, 1, transposed=True, split_k=4))]
for m, n, k, path, tiles in cases:
    x, w = torch.randn(m, k).half(), (torch.randn(n, k) * 0.05).half()
    signs = torch.randint(-(2**31), 2**31 - 1, (3, n, (k + 31) // 32), dtype=torch.int32)
    signs[..., -1] &= (1 << (k % 32)) - 1 if k % 32 else -1
    scales, bias = torch.rand(3, n) * 0.02 + 0.002, torch.randn(n).half()
    scales[1] *= -1  # distillation may turn scales negative
    slot_ids = torch.randint(-1, 3, (m,))
    out = torch.full((m, n), float("nan")).half()
    run_path(path, tiles, x, w, signs, scales, build_plan(slot_ids), bias, out=out)
    ref = reference.bitdelta_matmul(x.float(), w, signs, scales, slot_ids, bias)
    print(((out.float() - ref).norm() / ref.norm()).item())
print(int(split_counters(torch.device("cpu"), 1).abs().sum()))
"""
    *errors, counters = run_in_triton_interpreter(code).split()
    assert len(errors) == 2 and all(float(e) < 1e-3 for e in errors), errors  # fp16: half an ulp, x3
    assert counters == "0"


def test_the_stored_product_splits_k_where_its_column_blocks_leave_sms_idle():
    """The stored product's decode tiles (a quantized base's product) as the H100 sweep measured best:
    32 columns up to 32 rows with K cut in 4 on a 4096-wide layer (128 blocks for 132 SMs), in 2 at
    8192 wide, none at 11008; 128 columns past 32 rows, K cut in 4 at 4096 wide, 2 at 8192 and 11008,
    none at 28672 (over int4 the 32-column blocks unsplit). Prompts are never split."""
    from bitdelta.kernels.base_product import ProductTiles, product_tiles

    for m in (1, 16):
        assert product_tiles(m, 4096, 132) == ProductTiles(16, 32, 128, 4, 4, False, split_k=4)
        assert [product_tiles(m, n, 132).split_k for n in (8192, 11008, 28672)] == [2, 1, 1]
    assert product_tiles(20, 4096, 132) == ProductTiles(32, 32, 128, 4, 4, False, split_k=4)
    assert product_tiles(64, 4096, 132) == ProductTiles(64, 128, 128, 8, 3, False, split_k=4)
    assert [product_tiles(40, n, 132).split_k for n in (8192, 11008, 28672)] == [2, 2, 1]
    assert product_tiles(65, 4096, 132) == ProductTiles(128, 128, 64, 8, 3, True)
    assert product_tiles(64, 4096, 132, GROUP_SCALED) == ProductTiles(64, 32, 128, 4, 4, False)  # int4: narrow, unsplit
    assert product_tiles(16, 4096, 132, GROUP_SCALED).split_k == 4
    assert product_tiles(1, 4096, 264).split_k == 4 and product_tiles(1, 8192, 264).split_k == 4  # twice the SMs


def test_the_choice_needs_no_triton():
    """The paths' rules and tiles import and run where Triton is absent; only a launch imports it."""
    code = ("import sys, torch\n"
            "from bitdelta.kernels.grouping import build_plan\n"
            "from bitdelta.kernels.paths import Problem, choose\n"
            "for ids in (torch.arange(32), torch.zeros(600, dtype=torch.long), torch.tensor([1])):\n"
            "    choose(Problem(build_plan(ids), 4096, 4096))\n"
            "assert 'triton' not in sys.modules, 'the choice imported triton'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_triton_interpreter
def test_grouped_experts_kernel_in_the_triton_interpreter():
    """The grouped experts kernel on the CPU under TRITON_INTERPRET=1 against the reference: pairs of
    several experts and slots (base-only pairs, an expert no pair routes to, a segment longer than a
    tile, a K tail), over an fp16 base and int8 and int4 bases read as stored (half an ulp, x3)."""
    code = """
import torch
from bitdelta.kernels import reference
from bitdelta.kernels.experts import ExpertPairs
from bitdelta.kernels.experts_triton import grouped_expert_matmul
from bitdelta.quant import quantize
experts, slots, n, k = 5, 3, 40, 300  # expert 4: no pair
signs = torch.randint(-(2**31), 2**31 - 1, (experts, slots, n, (k + 31) // 32), dtype=torch.int32)
signs[..., -1] &= (1 << (k % 32)) - 1
scales = torch.rand(experts, slots, n) * 0.02 + 0.002
pair_experts = torch.tensor([0, 2, 2, 0, 3, 2, 0] + [1] * 20)
pair_slots = torch.tensor([0, 1, -1, 0, 2, 1, -1] + [2] * 20)
x = torch.randn(len(pair_experts), k).half()
base = torch.randn(experts, n, k) * 0.05
segments = ExpertPairs(pair_experts, pair_slots, experts, slots).segments
stored = [quantize(base.reshape(experts * n, k), recipe) for recipe in ("int8", "int4")]
for weights, dense in [(base.half(), base.half())] + [(q, q.dequantize().view(experts, n, k)) for q in stored]:
    out = grouped_expert_matmul(x, weights, signs, scales, *segments)
    ref = reference.expert_matmul(x.float(), dense.float(), signs, scales, pair_experts, pair_slots)
    print(((out.float() - ref).norm() / ref.norm()).item())
"""
    errors = run_in_triton_interpreter(code).split()
    assert len(errors) == 3 and all(float(e) < 1e-3 for e in errors), errors


def test_experts_loop_on_the_cpu_matches_the_reference():
    """The per-expert loop (the CPU's path) gives each pair its own expert and slot."""
    from bitdelta.kernels.experts import ExpertPairs, expert_matmul

    experts, slots, n, k = 5, 2, 24, 70
    signs = torch.randint(-(2**31), 2**31 - 1, (experts, slots, n, (k + 31) // 32), dtype=torch.int32)
    scales = torch.rand(experts, slots, n) * 0.02 + 0.002
    base = torch.randn(experts, n, k) * 0.05
    pair_experts, pair_slots = torch.randint(0, experts, (30,)), torch.randint(-1, slots, (30,))
    x = torch.randn(30, k)
    out = expert_matmul(x, base, signs, scales, ExpertPairs(pair_experts, pair_slots, experts, slots))
    for p in range(30):  # pair by pair, from the merged weight of its own expert and slot
        e, s = pair_experts[p].item(), pair_slots[p].item()
        weight = base[e] if s < 0 else reference.merged_weight(base[e], signs[e], scales[e], s)
        assert torch.allclose(out[p], weight @ x[p], atol=1e-5, rtol=1e-5)


# the pointer arguments' element types by name (the rest of each signature: i32 scalars, constexprs)
_POINTER_TYPES = {"signs_ptr": "*i32", "order_ptr": "*i32", "rslot_ptr": "*i32", "tiles_ptr": "*i32", "counters_ptr": "*i32",
                  "starts_ptr": "*i32", "sizes_ptr": "*i32", "x_ptr": "*bf16", "y_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}


HOPPER_SHARED_MEMORY = 232448  # bytes a block may use on sm_90 (227 KiB)


@pytest.mark.parametrize("form,stored", [(0, "*bf16"), (1, "*i8"), (1, "*fp8e4nv"), (2, "*u8")],
                         ids=["bf16 base", "int8 base", "fp8 base", "int4 base"])
def test_every_kernel_reading_the_base_compiles_for_hopper(form, stored):
    """Each kernel that reads base tiles (GEMV, segment, merge, experts, stored product), compiled for
    sm_90 on the CPU in each base form: the interpreter runs code the compiler rejects (a branch's
    return type where another returns early, say), so the interpreter tests alone would not catch it.
    The stored product compiles with the tiles it is dispatched with and must fit an SM's shared
    memory, or its launch fails on the GPU; no kernel may load the base a byte at a time (an int4
    base's bytes once were, at a quarter of the load width)."""
    triton = pytest.importorskip("triton")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bitdelta.kernels import base_product, base_product_triton, experts_triton
    from bitdelta.kernels.paths import gemv_triton, merged_gemm_triton, segment_triton

    kernels = [
        (gemv_triton._gemv_kernel, dict(HAS_BIAS=True, EVEN_K=False, ROWS=4, SAME_SLOT=False, BLOCK_N=8, BLOCK_K=512, NUM_STAGES=2), {}),
        (segment_triton._segment_kernel, dict(HAS_BIAS=True, MERGE=True, EVEN_K=False, ROWS=16, BLOCK_N=64, BLOCK_K=64,
                                              TRANSPOSED=True, SPLIT_K=2), {}),
        (segment_triton._segment_kernel, dict(HAS_BIAS=True, MERGE=True, EVEN_K=True, ROWS=4, BLOCK_N=32, BLOCK_K=256,
                                              TRANSPOSED=False, SPLIT_K=1), {}),
        (merged_gemm_triton._merge_kernel, dict(BLOCK_N=32, BLOCK_K=256), {}),
        (experts_triton._experts_kernel, dict(EVEN_K=False, ROWS=16, BLOCK_N=32, BLOCK_K=128, SEGMENTS=8), {}),
    ]
    kernels.append((base_product_triton._stored_product_kernel,  # one output element: the JIT makes M x N == 1 a constant
                    dict(HAS_BIAS=False, EVEN_K=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, TRANSPOSED=False, SPLIT_K=4,
                         stride_ps=1), dict(num_warps=4, num_stages=4)))
    for m in (1, 64, 512):  # decode, the widest decode batch, a prompt: the stored product's tiles as dispatched
        t = base_product.product_tiles(m, 4096, 132, form)  # K split in 4 up to 64 rows (int4: up to 32)
        kernels.append((base_product_triton._stored_product_kernel,
                        dict(HAS_BIAS=True, EVEN_K=False, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, TRANSPOSED=t.transposed,
                             SPLIT_K=t.split_k), dict(num_warps=t.num_warps, num_stages=t.num_stages)))
    for kernel, constants, options in kernels:
        constants = dict(constants, FORM=form)
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constants:
                signature[name] = "constexpr"
            elif name == "w_ptr":
                signature[name] = stored
            elif name.endswith("_ptr"):
                signature[name] = _POINTER_TYPES.get(name, "*fp32")
            else:
                signature[name] = "i32"
        # as the JIT specializes real launches: 16-byte aligned pointers, sizes and strides multiples of 16
        aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "constexpr"}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY, (kernel.fn.__name__, constants, compiled.metadata.shared)
        assert not re.search(r"ld\.global[.\w]*\.[usb]8\b", compiled.asm["ptx"]), (kernel.fn.__name__, constants)
        # int4 values reach every kernel made from bits (`base_tile`, `nibble_values`), not on the conversion
        # pipe (I2F: 16 a clock an SM)
        if stored == "*u8":
            assert not re.search(r"cvt\.rn\.(f32|f16|bf16)\.[su](8|16|32)\b", compiled.asm["ptx"]), (kernel.fn.__name__, constants)
        # fp8 reaches bf16 through fp32 (`stored_values`), not an f16 -> bf16 cvt a value on the conversion pipe
        if stored == "*fp8e4nv":
            assert not re.search(r"cvt(\.rn)?\.bf16\.f16\b", compiled.asm["ptx"]), (kernel.fn.__name__, constants)


@pytest.mark.parametrize("stored", ["*i8", "*fp8e4nv"])
def test_the_gluon_stored_product_compiles_for_hopper_with_both_operands_straight_to_registers(stored):
    """The Gluon product over an int8/fp8 base (`base_product_gluon`), compiled for sm_90 on the CPU at
    tiles its sweep times: the loads' natural k order reaches the mma operands within each thread
    (conversions asserted trivial at compile time; no shared memory, no shuffles), K split or not, and both operands
    load as vectors, the base never a byte at a time. Its numbers are checked on the GPU
    (tests/test_quantized_base.py)."""
    triton = pytest.importorskip("triton")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from bitdelta.kernels import base_product_gluon

    kernel = base_product_gluon._stored_product_kernel
    for block_n, block_k, cols, warps, splits in ((64, 32, 64, 4, 1), (128, 32, 32, 8, 2), (32, 64, 16, 2, 4)):
        constants = dict(HAS_BIAS=True, BLOCK_N=block_n, BLOCK_K=block_k, COLS=cols, SPLIT_K=splits)
        signature = {name: "constexpr" if name in constants else stored if name == "w_ptr" else
                     _POINTER_TYPES.get(name, "*fp32") if name.endswith("_ptr") else "i32"
                     for name in inspect.signature(kernel.fn).parameters}
        aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "constexpr"}
        compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        ptx = compiled.asm["ptx"]
        # shared memory: none, but the split's arrival count broadcast to the program
        assert compiled.metadata.shared <= (0 if splits == 1 else 16) and "shfl" not in ptx, constants
        assert not re.search(r"ld\.global[.\w]*\.[usb]8\b", ptx), constants  # (the bias loads b16 in the epilogue)
        assert re.search(r"ld\.global[.\w]*\.v[24]\.b32", ptx), constants


def test_the_gluon_stored_product_refuses_tiles_it_cannot_run():
    """Before any launch (so on the CPU): rows off 8..64 or not a power of two, fewer than 16 base rows a
    warp or a block that is not a power of two, K steps that are not powers of two, a transposed tiling,
    fp32 activations, and a base without row scales."""
    pytest.importorskip("triton.experimental.gluon")
    from bitdelta.kernels.base_product import ProductTiles, StoredBase
    from bitdelta.kernels.base_product_gluon import stored_product_gluon

    base = StoredBase(torch.zeros(64, 64, dtype=torch.int8), torch.ones(64), ROW_SCALED)
    x, out = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(4, 64, dtype=torch.bfloat16)
    for tiles in (ProductTiles(12, 64, 32, 4, 1, False), ProductTiles(128, 128, 32, 8, 1, False), ProductTiles(16, 192, 32, 4, 1, False),
                  ProductTiles(16, 32, 32, 4, 1, False), ProductTiles(16, 64, 48, 4, 1, False), ProductTiles(16, 64, 32, 4, 1, True)):
        with pytest.raises(ValueError, match="Gluon product tiles take"):
            stored_product_gluon(x, base, None, out, tiles)
    with pytest.raises(ValueError, match="bf16 or fp16 activations"):
        stored_product_gluon(x.float(), base, None, out, ProductTiles(16, 64, 32, 4, 1, False))
    with pytest.raises(ValueError, match="int8 or fp8 bases"):
        stored_product_gluon(x, StoredBase(torch.zeros(64, 32, dtype=torch.uint8), torch.ones(64, 1), GROUP_SCALED), None, out,
                             ProductTiles(16, 64, 32, 4, 1, False))
