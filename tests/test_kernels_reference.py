"""CPU tests: the reference matmul against a dense fp64 computation, the slot grouping, the CPU
dispatch (which must not need Triton), stacked linears and the fast launch. The kernel path choice:
test_kernel_paths.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitdelta.kernels as kernels
from bitdelta.kernels import reference
from bitdelta.kernels.grouping import build_plan, row_slots, segment_tiles, split_plan
from bitdelta.kernels.paths import split_threshold
from bitdelta.pack import pack_signs


def _problem(m: int, n: int, k: int, s: int, per_row_scales: bool, gen: torch.Generator):
    """Random inputs plus the dense +-1 sign matrices they pack (never zeros: they hide bugs)."""
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    dense = torch.randn(s, n, k, generator=gen)
    signs = torch.stack([pack_signs(d) for d in dense])
    sign_values = torch.where(dense > 0, 1.0, -1.0).double()
    if per_row_scales:
        scales = torch.rand(s, n, generator=gen) * 0.01 + 1e-3
    else:
        scales = (torch.rand(s, 1, generator=gen) * 0.01 + 1e-3).expand(s, n).contiguous()
    bias = torch.randn(n, generator=gen)
    return x, w, signs, sign_values, scales, bias


def _dense_fp64(x, w, sign_values, scales, slot_ids, bias):
    """The definition, row by row, in fp64 with the signs unpacked by comparison, not by pack.py."""
    rows = []
    for i, slot in enumerate(slot_ids.tolist()):
        weight = w.double()
        if slot >= 0:
            weight = weight + scales[slot].double()[:, None] * sign_values[slot]
        rows.append(x[i].double() @ weight.T + bias.double())
    return torch.stack(rows)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("per_row_scales", [False, True])
@pytest.mark.parametrize("m,n,k,s", [(1, 7, 5, 1), (9, 33, 97, 4), (16, 40, 64, 3), (5, 3, 129, 6)])
def test_reference_matches_dense_fp64(m, n, k, s, per_row_scales):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x, w, signs, sign_values, scales, bias = _problem(m, n, k, s, per_row_scales, gen)
    slot_ids = torch.randint(-1, s, (m,), generator=gen)
    out = reference.bitdelta_matmul(x, w, signs, scales, slot_ids, bias)
    # fp32 arithmetic against fp64: rounding only, far under 1e-5.
    assert _rel_err(out, _dense_fp64(x, w, sign_values, scales, slot_ids, bias)) < 1e-5


def test_merged_weight_is_the_rounded_finetune_weight():
    gen = torch.Generator().manual_seed(7)
    x, w, signs, sign_values, scales, _ = _problem(2, 9, 70, 3, True, gen)
    w16 = w.to(torch.bfloat16)
    merged = reference.merged_weight(w16, signs, scales, 2)
    assert merged.dtype == torch.bfloat16 and merged.shape == w16.shape
    exact = w16.double() + scales[2].double()[:, None] * sign_values[2]
    # one rounding to bf16 of an fp32 sum: within one bf16 ulp (2^-8 relative) of the exact value
    assert ((merged.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    assert not torch.equal(merged, w16)  # the delta is applied, not dropped


def test_reference_slot_minus_one_is_base_only():
    gen = torch.Generator().manual_seed(1)
    x, w, signs, _, scales, bias = _problem(6, 20, 50, 2, True, gen)
    slot_ids = torch.tensor([-1, 0, -1, 1, -1, 0])
    out = reference.bitdelta_matmul(x, w, signs, scales, slot_ids, bias)
    base = x @ w.T + bias
    base_rows = slot_ids == -1
    torch.testing.assert_close(out[base_rows], base[base_rows], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[~base_rows], base[~base_rows], rtol=1e-3, atol=1e-3)


def test_reference_keeps_activation_dtype():
    gen = torch.Generator().manual_seed(2)
    x, w, signs, _, scales, _ = _problem(4, 8, 40, 2, False, gen)
    out = reference.bitdelta_matmul(x.bfloat16(), w.bfloat16(), signs, scales, torch.tensor([0, 1, -1, 0]))
    assert out.dtype == torch.bfloat16


def test_delta_matmul_is_zero_for_base_rows():
    gen = torch.Generator().manual_seed(3)
    x, _, signs, _, scales, _ = _problem(3, 8, 40, 1, False, gen)
    delta = reference.delta_matmul(x, signs, scales, torch.tensor([-1, 0, -1]))
    assert torch.all(delta[[0, 2]] == 0) and torch.all(delta[1] != 0)


def test_build_plan_groups_rows_by_slot():
    slot_ids = torch.tensor([3, -1, 0, 3, 3, -1, 7])
    plan = build_plan(slot_ids)
    assert plan.slots.tolist() == [-1, 0, 3, 7]
    assert plan.host_slots == (-1, 0, 3, 7)
    assert plan.counts == (2, 1, 3, 1)
    assert plan.offsets.tolist() == [0, 2, 3, 6, 7]
    assert plan.order.tolist() == [1, 5, 2, 0, 3, 4, 6]  # stable: equal slots keep their row order
    assert plan.order.dtype == plan.slots.dtype == plan.offsets.dtype == torch.int32
    assert (plan.num_rows, plan.max_rows, plan.num_deltas, plan.min_delta_rows) == (7, 3, 3, 1)
    assert not plan.in_order
    grouped = build_plan(torch.tensor([-1, 0, 0, 3, 3, 3]))  # whole requests one after another
    assert grouped.in_order and grouped.order.tolist() == list(range(6))
    assert build_plan(torch.tensor([], dtype=torch.long)).in_order


def test_build_plan_rejects_bad_slots():
    with pytest.raises(ValueError):
        build_plan(torch.tensor([0, -2]))
    with pytest.raises(ValueError):
        build_plan(torch.zeros(2, 2, dtype=torch.long))


def test_build_plan_empty_batch():
    plan = build_plan(torch.zeros(0, dtype=torch.long))
    assert plan.num_rows == 0 and plan.max_rows == 0 and plan.num_deltas == 0
    assert segment_tiles(plan, 4).shape == (0, 3)


@settings(max_examples=60, deadline=None)
@given(
    slot_list=st.lists(st.integers(min_value=-1, max_value=9), min_size=1, max_size=200),
    rows_per_tile=st.sampled_from([1, 2, 3, 16, 128]),
)
def test_segment_tiles_cover_each_row_once_and_never_mix_slots(slot_list, rows_per_tile):
    slot_ids = torch.tensor(slot_list)
    plan = build_plan(slot_ids)
    tiles = segment_tiles(plan, rows_per_tile)
    seen = []
    for slot, first, end in tiles.tolist():
        assert 0 < end - first <= rows_per_tile
        rows = plan.order[first:end]
        assert torch.all(slot_ids[rows] == slot)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(slot_list)))
    # bits are read once per tile: a slot needs ceil(count / rows_per_tile) tiles, no more
    assert tiles.shape[0] == sum(-(-c // rows_per_tile) for c in plan.counts)
    assert plan.tile_count(rows_per_tile) == tiles.shape[0]  # what the dispatcher counts without building them
    assert segment_tiles(plan, rows_per_tile) is tiles  # cached for the other layers of the step


def test_split_plan_gathers_long_and_short_segments_apart():
    slot_ids = torch.tensor([2] * 5 + [-1, 0, 7, 0] + [2] * 3 + [-1] * 9)  # slots 2 and -1 long (> 4 rows)
    plan = build_plan(slot_ids)
    assert split_threshold(plan) is None  # every segment here is a decode segment (<= 64 rows)
    parts = split_plan(plan, 4)
    assert split_plan(plan, 4) is parts  # cached: one build per step, whatever the number of layers
    long, short = parts
    assert long.plan.host_slots == (-1, 2) and long.plan.counts == (10, 8)
    assert short.plan.host_slots == (0, 7) and short.plan.counts == (2, 1)
    covered = torch.cat([long.rows, short.rows]).sort().values
    assert torch.equal(covered, torch.arange(slot_ids.numel()))  # every row once
    for side in parts:  # rows in slot order
        assert torch.equal(slot_ids[side.rows], torch.repeat_interleave(side.plan.slots.long(), torch.tensor(side.plan.counts)))
        assert side.plan.offsets.tolist() == [0, *torch.tensor(side.plan.counts).cumsum(0).tolist()]
    # the long side's rows surround the short side's: gathered, its plan over the gathered rows
    assert long.start is None and long.plan.in_order and long.plan.order.tolist() == list(range(18))
    # the short side is rows 6..8: a view, its plan's order indexes the slice (slot 0 at 6 and 8, slot 7 at 7)
    assert short.start == 6 and short.plan.order.tolist() == [0, 2, 1] and not short.plan.in_order
    assert len(split_plan(build_plan(torch.zeros(6, dtype=torch.long)), 4)) == 1  # one side only: no split


def test_split_sides_contiguous_in_the_batch_are_views():
    # the engine's layout: decode rows first (slots in any order, a base-only row), then a prefill chunk
    slot_ids = torch.tensor([5, 3, -1, 4] + [1] * 8)
    long, short = split_plan(build_plan(slot_ids), 4)
    assert (long.start, long.plan.in_order, long.plan.order.tolist()) == (4, True, list(range(8)))
    assert short.start == 0 and not short.plan.in_order
    assert short.plan.host_slots == (-1, 3, 4, 5)
    assert short.plan.order.tolist() == [2, 1, 3, 0]  # the slice's rows, in slot order
    assert torch.equal(slot_ids[short.start + short.plan.order.long()], torch.tensor([-1, 3, 4, 5]))


def test_row_slots_follow_the_order():
    slot_ids = torch.tensor([2, -1, 0, 2, 1, 0])
    plan = build_plan(slot_ids)
    slots = row_slots(plan)
    assert torch.equal(slots.long(), slot_ids[plan.order.long()])
    assert row_slots(plan) is slots  # cached


def test_public_entry_point_falls_back_to_reference_on_cpu():
    gen = torch.Generator().manual_seed(4)
    x, w, signs, _, scales, bias = _problem(5, 12, 70, 3, True, gen)
    slot_ids = torch.tensor([2, -1, 0, 2, 1])
    expected = reference.bitdelta_matmul(x, w, signs, scales, slot_ids, bias)
    torch.testing.assert_close(kernels.bitdelta_matmul(x, w, signs, scales, slot_ids, bias), expected)
    plan = kernels.build_plan(slot_ids)
    torch.testing.assert_close(kernels.bitdelta_matmul(x, w, signs, scales, slot_ids, bias, plan=plan), expected)


def test_cpu_import_and_call_never_import_triton():
    code = (
        "import sys, torch, bitdelta.kernels as k\n"
        "x = torch.randn(2, 40); w = torch.randn(3, 40)\n"
        "s = torch.zeros(1, 3, 2, dtype=torch.int32); sc = torch.ones(1, 3)\n"
        "k.bitdelta_matmul(x, w, s, sc, torch.tensor([0, -1]))\n"
        "assert 'triton' not in sys.modules, 'triton imported on the CPU path'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("k,block_k", [(256, 256), (1000, 256), (4097, 128), (2048, 512)])
def test_bitmma_reduction_order_is_a_permutation_of_k(k, block_k):
    """The bf16 bitmma kernel (paths/bitmma_gluon.py) reads mma k index kk = 32w + 16a + 8h + 2q + e of
    a K-tile as bit j + 16e of word w, j = 8a + 4h + q, and takes x in `permute_activations` order;
    both sides must visit the same k, so the product equals x . sign. Checked here on the host side of that contract
    (the kernel's own layouts are checked at compile time, its results in test_kernels_gpu.py)."""
    bitmma_gluon = pytest.importorskip("bitdelta.kernels.paths.bitmma_gluon")  # needs Triton with Gluon
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=gen, dtype=torch.float64)
    dense = torch.randn(5, k, generator=gen)
    words = pack_signs(dense)
    kw = words.shape[1]
    k_tiles = -(-k // block_k)
    xp = bitmma_gluon.permute_activations(x, block_k)
    assert xp.shape == (3, k_tiles * block_k)
    kk = torch.arange(k_tiles * block_k)
    tile, pos = kk // block_k, kk % block_k
    w, a, h, q, e = pos // 32, (pos >> 4) & 1, (pos >> 3) & 1, (pos >> 1) & 3, pos & 1
    word = tile * (block_k // 32) + w
    bit = 8 * a + 4 * h + q + 16 * e
    padded = torch.cat([words, torch.zeros(5, k_tiles * block_k // 32 - kw, dtype=torch.int32)], 1)
    signs = torch.where((padded[:, word] >> bit) & 1 == 1, 1.0, -1.0).double()  # [5, KT*BK] in kk order
    x_kk = xp.view(3, k_tiles, 4, block_k // 4)[:, tile, q, 8 * w + 4 * a + 2 * h + e]  # the B operand
    expected = x @ torch.where(dense > 0, 1.0, -1.0).double().T
    torch.testing.assert_close(x_kk @ signs.T, expected)


def test_stacked_linears_compute_each_part_and_write_through_to_it():
    """q/k/v stacked into one product: each output equals its part alone (static bias, one part's
    per-slot biases, base-only rows), and writing a part's slot (as the engine's install does) changes
    the stacked product."""
    from bitdelta.nn import BitDeltaLinear, DeltaRouting, StackedBitDeltaLinears

    torch.manual_seed(0)
    k, slots, widths = 70, 3, (24, 8, 8)
    routing = DeltaRouting()

    def part(width: int, bias: bool) -> BitDeltaLinear:
        signs = torch.stack([pack_signs(torch.randn(width, k)) for _ in range(slots)])
        return BitDeltaLinear(torch.nn.Linear(k, width, bias=bias), signs, torch.rand(slots, width) * 0.1, routing)

    parts = [part(widths[0], True), part(widths[1], False), part(widths[2], True)]
    parts[2].slot_bias = torch.randn(slots, widths[2])
    x = torch.randn(5, k)
    routing.slot_ids = torch.tensor([0, 2, -1, 1, 2])
    with torch.no_grad():
        alone = [p(x) for p in parts]
        stacked = StackedBitDeltaLinears(parts)
        together = stacked(x)
        for got, expected in zip(together, alone):
            torch.testing.assert_close(got, expected)
        parts[1].signs[2].copy_(~parts[1].signs[2])  # flip every sign of slot 2 in part 1, through its view
        flipped = stacked(x)[1]
    assert torch.equal(flipped[[0, 2, 3]], together[1][[0, 2, 3]])  # rows of other slots unchanged
    assert not torch.allclose(flipped[[1, 4]], together[1][[1, 4]])


@pytest.mark.parametrize("own_biases", [False, True])
def test_stacked_static_biases_are_rounded_once_as_each_part_alone(own_biases):
    """bf16: every part's output equals the part alone bit for bit, static biases (one part without
    any) added inside the product, also beside a part that brings per-slot biases."""
    from bitdelta.nn import BitDeltaLinear, DeltaRouting, StackedBitDeltaLinears

    torch.manual_seed(1)
    k, slots = 64, 2
    routing = DeltaRouting()
    parts = []
    for width, bias in ((32, True), (16, False), (16, True)):
        linear = torch.nn.Linear(k, width, bias=bias).to(torch.bfloat16)
        if bias:
            linear.bias.data.normal_(0, 3)  # large enough that a second rounding shows
        signs = torch.stack([pack_signs(torch.randn(width, k)) for _ in range(slots)])
        parts.append(BitDeltaLinear(linear, signs, torch.rand(slots, width) * 0.05, routing))
    if own_biases:
        parts[0].slot_bias = torch.randn(slots, 32).to(torch.bfloat16)
    x = torch.randn(7, k).to(torch.bfloat16)
    routing.slot_ids = torch.tensor([0, 1, -1, 1, 0, -1, 1])
    with torch.no_grad():
        alone = [p(x) for p in parts]
        together = StackedBitDeltaLinears(parts)(x)
    for got, expected in zip(together, alone):
        assert torch.equal(got, expected)


def test_stacking_consecutive_row_blocks_copies_nothing():
    from bitdelta.nn import _stack_rows

    storage = torch.randn(10, 4)
    blocks = list(storage.split([6, 2, 2]))
    assert _stack_rows(blocks).data_ptr() == storage.data_ptr()
    apart = [storage[:6], storage[8:]]  # a gap: a copy, in order
    stacked = _stack_rows(apart)
    assert stacked.data_ptr() != storage.data_ptr() and torch.equal(stacked, torch.cat(apart))


def test_fast_launch_reuses_a_binary_only_for_the_same_key(monkeypatch):
    """The fast path's bookkeeping, on a stand-in for Triton's JIT function (no GPU here): launch a
    cached binary directly; compile again through Triton's path for a new specialisation, launch
    options or debug mode; go through Triton's path while a launch hook is registered."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from triton import knobs

    from bitdelta.kernels import launch

    launched = []
    binary = SimpleNamespace(function="f", packed_metadata="m", run=lambda *a: launched.append(a))

    class StandIn:
        debug = False

        def __init__(self) -> None:
            self.compiled = []
            self.device_caches = {0: (None, None, None, None, self.bind)}

        def create_binder(self) -> None: ...

        def bind(self, n, **options):
            return {"n": n}, [("i32", "D" if n % 16 == 0 else "")], options

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.compiled.append((args, kwargs)) or binary

    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0,
                                                                                 get_current_stream=lambda device: 7)))
    fn = StandIn()
    fast = launch.fast(fn)
    fast[(3,)](32, num_warps=4)
    fast[(5, 2)](48, num_warps=4)  # same specialisation (divisible by 16) and options: the cached binary
    assert len(fn.compiled) == 1 and launched == [(5, 2, 1, 7, "f", "m", None, None, None, 48)]
    fast[(1,)](33, num_warps=4)  # another specialisation
    fast[(1,)](32, num_warps=8)  # other launch options
    monkeypatch.setattr(knobs.runtime, "debug", True)
    fast[(1,)](32, num_warps=4)  # debug mode
    assert len(fn.compiled) == 4 and len(launched) == 1
    monkeypatch.setattr(knobs.runtime, "debug", False)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        fast[(1,)](32, num_warps=4)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(fn.compiled) == 5 and len(launched) == 1
    fast[(1,)](32, num_warps=4)
    assert len(fn.compiled) == 5 and len(launched) == 2
