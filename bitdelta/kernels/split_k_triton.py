"""Split-K inside a kernel (GPU only; imported lazily): a program's range of K, and the sum of a
tile's partials by the last of its programs to arrive (`split_k.py` holds the counters). The grid's
axis 2 is the split."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K range of this program: whole BLOCK_K steps, the last range shorter."""
    first = 0
    end = K
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        first = tl.program_id(2) * per_split
        end = tl.minimum(K, first + per_split)
    return first, end


@triton.jit
def sum_of_splits(acc, partials_ptr, counters_ptr, rows, cols, N, stride_ps, mask, SPLIT_K: tl.constexpr):
    """Writes this program's fp32 partial `acc` of the tile (rows, cols) of an N-wide output and counts
    its arrival on the tile's counter (one per (axis 0, axis 1) program). Returns (last, total): whether
    it arrived last, and then the partials' sum in split order (zeros otherwise)."""
    partials = partials_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    stride_ps = tl.cast(stride_ps, tl.int64)  # splits x M x N may pass 2^31; M x N == 1 comes in as a constant
    tl.store(partials + tl.program_id(2) * stride_ps, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted
    counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    total = tl.zeros(acc.shape, dtype=tl.float32)
    if last:
        for split in tl.static_range(SPLIT_K):  # in split order: the sum does not depend on arrival
            total += tl.load(partials + split * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter, 0)  # ready for the next launch
    return last, total
