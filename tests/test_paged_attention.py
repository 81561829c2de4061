"""Paged attention: the reference against attention written out position by position (CPU), and the
Triton kernel against the reference (GPU; skipped without CUDA and Triton).

Every case draws a fresh random cache layout: pages shuffled through the pool, sequences of
different lengths, decode rows and prefill chunks in one step, grouped-query heads."""

from __future__ import annotations

import math

import pytest
import torch

from bitdelta.engine.ops.paged_attention import TILE_ROWS, paged_attention, paged_attention_reference, query_split
from bitdelta.kernels import triton_available
from conftest import needs_triton_interpreter, run_in_triton_interpreter


def random_step(heads: int, kv_heads: int, head_dim: int, page: int, dtype: torch.dtype, device: str = "cpu",
                chunk: int | None = None, cached: int | None = None):
    """A step over three sequences: one decoding at a random position, one prefilling a chunk (of
    `chunk` rows, default 2..page+2) after `cached` positions of its prompt (default 2..5 pages; 0:
    the prompt's first chunk), one decoding its first token."""
    chunk = chunk or int(torch.randint(2, page + 3, ()))
    cached = int(torch.randint(2 * page, 5 * page, ())) if cached is None else cached
    lengths = [int(torch.randint(page + 1, 6 * page, ())), chunk + cached, 1]
    pages_needed = [-(-n // page) for n in lengths]
    pool_pages = sum(pages_needed) + 3
    keys = torch.randn(pool_pages * page, kv_heads, head_dim, device=device).to(dtype)
    values = torch.randn(pool_pages * page, kv_heads, head_dim, device=device).to(dtype)
    order = torch.randperm(pool_pages).tolist()
    tables, width = [], max(pages_needed)
    for needed in pages_needed:
        own, order = order[:needed], order[needed:]
        tables.append(own + [0] * (width - needed))
    row_sequence = [0] + [1] * chunk + [2]
    row_position = [lengths[0] - 1] + list(range(lengths[1] - chunk, lengths[1])) + [0]
    q = torch.randn(len(row_sequence), heads, head_dim, device=device).to(dtype)
    as_int = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return q, keys, values, as_int(tables), as_int(row_sequence), as_int(row_position)


# (sliding window, soft-cap): plain causal; a window shorter than a page; soft-capped scores (1.5
# binds: the scores are ~N(0, 1)); a window longer than a key block (64), with soft-capping
VARIANTS = [(None, None), (7, None), (None, 1.5), (70, 1.5)]


def attention_by_position(q, keys, values, tables, row_sequence, row_position, page, scale, window=None, softcap=None):
    """fp64, one row and head at a time, straight from the definition."""
    groups = q.shape[1] // keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for row in range(q.shape[0]):
        sequence, position = int(row_sequence[row]), int(row_position[row])
        first = 0 if window is None else max(0, position - window + 1)
        pool = [int(tables[sequence, p // page]) * page + p % page for p in range(first, position + 1)]
        for head in range(q.shape[1]):
            k = keys[pool, head // groups].double()
            v = values[pool, head // groups].double()
            scores = k @ q[row, head].double() * scale
            weights = torch.softmax(scores if softcap is None else softcap * torch.tanh(scores / softcap), dim=0)
            out[row, head] = weights @ v
    return out


@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(4, 4, 16, 4), (8, 2, 24, 8), (6, 1, 32, 16)])
def test_reference_is_causal_attention_over_the_pages(heads, kv_heads, head_dim, page, window, softcap):
    q, keys, values, tables, row_sequence, row_position = random_step(heads, kv_heads, head_dim, page, torch.float32)
    scale = 1 / math.sqrt(head_dim)
    got = paged_attention(q, keys, values, tables, row_sequence, row_position, page, scale, window=window, softcap=softcap)
    expected = attention_by_position(q, keys, values, tables, row_sequence, row_position, page, scale, window, softcap)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    if (window, softcap) != (None, None):  # the variant changes the answer: the comparison is not vacuous
        plain = attention_by_position(q, keys, values, tables, row_sequence, row_position, page, scale)
        assert not torch.allclose(plain, expected, atol=1e-3, rtol=1e-3)


def test_heads_must_group_evenly():
    q, keys, values, tables, row_sequence, row_position = random_step(4, 4, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="do not divide"):
        paged_attention(q[:, :3], keys, values, tables, row_sequence, row_position, 4, 0.25)


def test_query_split_tiles_prefill_runs_and_leaves_decode_rows_alone():
    # rows: decode (seq 0), a 150-row chunk (seq 1, positions 10..159), decode (seq 2), a 2-row chunk
    # (seq 3), a 1-token chunk (seq 4), seq 5 at positions 4, 5 then 9 (not consecutive: two runs)
    row_sequence = [0] + [1] * 150 + [2] + [3, 3] + [4] + [5, 5, 5]
    row_position = [7] + list(range(10, 160)) + [0] + [30, 31] + [12] + [4, 5, 9]
    split = query_split(torch.tensor(row_sequence), torch.tensor(row_position))
    assert split.rows.tolist() == [0, 151, 154, 157]
    assert split.tiles.tolist() == [[1, TILE_ROWS], [1 + TILE_ROWS, TILE_ROWS], [1 + 2 * TILE_ROWS, 150 - 2 * TILE_ROWS],
                                    [152, 2], [155, 2]]
    covered = sorted(split.rows.tolist() + [r for first, count in split.tiles.tolist() for r in range(first, first + count)])
    assert covered == list(range(len(row_sequence)))  # every row exactly once
    assert query_split(torch.tensor([0, 1, 2]), torch.tensor([5, 0, 9])) is None  # a decode step: rows only


# fp32 accumulation in both; what differs is the final rounding of the output to fp16/bf16 (half
# an ulp, relative RMS ~3e-4 / ~2e-3) and the softmax's summation order (~1e-6): about 3x margin.
BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 6e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", list(BOUNDS))
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(32, 32, 128, 16), (32, 8, 128, 16), (12, 4, 80, 16), (8, 8, 64, 32)])
@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_triton_kernel_matches_reference(dtype, heads, kv_heads, head_dim, page, window, softcap):
    for _ in range(3):
        q, keys, values, tables, row_sequence, row_position = random_step(heads, kv_heads, head_dim, page, dtype, "cuda")
        scale = 1 / math.sqrt(head_dim)
        expected = paged_attention_reference(q.float(), keys.float(), values.float(), tables, row_sequence, row_position, page, scale,
                                             window, softcap)
        torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")  # freed at once: the kernel's output block likely reuses it, so unwritten elements show
        got = paged_attention(q, keys, values, tables, row_sequence, row_position, page, scale, window=window, softcap=softcap).float()
        assert torch.isfinite(got).all()
        assert (got - expected).norm() / expected.norm() < BOUNDS[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", list(BOUNDS))
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(32, 32, 128, 16), (32, 8, 128, 16), (12, 4, 80, 16), (8, 8, 64, 32)])
@pytest.mark.parametrize("chunk,cached", [(2, None), (63, None), (64, 0), (65, None), (200, None), (200, 0)])
@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_prefill_tiles_match_reference(dtype, heads, kv_heads, head_dim, page, chunk, cached, window, softcap):
    """Prefill chunks as tiles (`query_split`): one tile, a tile one row short, a full one, a full
    one and a row, several with a partial last one; in the middle of a prompt or its first chunk,
    beside decode rows."""
    for _ in range(2):
        q, keys, values, tables, row_sequence, row_position = random_step(heads, kv_heads, head_dim, page, dtype, "cuda",
                                                                          chunk, cached)
        split = query_split(row_sequence.cpu(), row_position.cpu())
        assert split.tiles[:, 1].sum() == chunk
        scale = 1 / math.sqrt(head_dim)
        expected = paged_attention_reference(q.float(), keys.float(), values.float(), tables, row_sequence, row_position, page, scale,
                                             window, softcap)
        torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
        got = paged_attention(q, keys, values, tables, row_sequence, row_position, page, scale, split.to(q.device),
                              window=window, softcap=softcap).float()
        assert torch.isfinite(got).all()
        assert (got - expected).norm() / expected.norm() < BOUNDS[dtype]


INTERPRETED_CHECK = """
import math, sys
import torch
sys.path.insert(0, "tests")
from test_paged_attention import VARIANTS, random_step
from bitdelta.engine.ops.paged_attention import paged_attention_reference, query_split
from bitdelta.engine.ops.paged_attention_triton import paged_attention_triton
torch.manual_seed(0)
worst = 0.0
for (heads, kv_heads, head_dim, page, chunk, cached), (window, softcap) in zip(
        [(4, 2, 24, 8, 65, 0), (2, 1, 80, 16, 130, None), (2, 2, 16, 4, 64, 3), (2, 1, 32, 8, 100, None)], VARIANTS):
    q, keys, values, tables, row_sequence, row_position = random_step(heads, kv_heads, head_dim, page, torch.float16,
                                                                      chunk=chunk, cached=cached)
    scale = 1 / math.sqrt(head_dim)
    expected = paged_attention_reference(q.float(), keys.float(), values.float(), tables, row_sequence, row_position, page, scale,
                                         window, softcap)
    for split in (None, query_split(row_sequence, row_position)):
        got = paged_attention_triton(q, keys, values, tables, row_sequence, row_position, page, scale, split,
                                     window=window, softcap=softcap).float()
        worst = max(worst, ((got - expected).norm() / expected.norm()).item())
print(worst)
"""


@needs_triton_interpreter
def test_both_kernels_match_reference_in_the_triton_interpreter():
    """The row and tile kernels on the CPU under TRITON_INTERPRET=1 (a fresh process: the variable
    must be set before Triton loads), so a change to them is checked without a GPU."""
    assert float(run_in_triton_interpreter(INTERPRETED_CHECK).split()[-1]) < BOUNDS[torch.float16]
