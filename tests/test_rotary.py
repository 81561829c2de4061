"""Rotary embedding + KV-cache write of a packed step (`engine/ops/rotary.py`): the reference against
transformers' own apply_rotary_pos_emb on the CPU (bit for bit), and the Triton kernel on a GPU
against the rotation computed in fp32. The kernel rounds its fp32 result once, so each element is
within one ulp of the activation dtype of the fp32 value (half an ulp for the rounding, the rest
for fp32 contraction); the values are copied exactly. Fresh random inputs every time."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from bitdelta.engine.ops.rotary import rotary_and_cache, rotary_and_cache_reference
from bitdelta.kernels import triton_available
from conftest import needs_triton_interpreter, run_in_triton_interpreter, within_an_ulp


def _step(rows: int, q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str):
    """q/k/v as views of one stacked projection (as the engine's stacked q/k/v gives them), cos and sin
    of random positions, pools with random contents and distinct random rows to write."""
    stacked = torch.randn(rows, (q_heads + 2 * kv_heads) * dim, device=device).to(dtype)
    q, k, v = (part.view(rows, -1, dim) for part in stacked.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=1))
    angles = torch.randint(0, 4096, (rows, 1), device=device).float() * (10000.0 ** (-torch.arange(0, dim, 2, device=device) / dim))
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pool_rows = 3 * rows + 5
    pools = [torch.randn(pool_rows, kv_heads, dim, device=device).to(dtype) for _ in range(2)]
    write_rows = torch.randperm(pool_rows, device=device)[:rows]
    return q, k, v, cos, sin, pools, write_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers_rotary_and_writes_the_cache(dtype):
    q, k, v, cos, sin, (keys, values), rows = _step(9, 4, 2, 16, dtype, "cpu")
    before = keys.clone(), values.clone()
    got = rotary_and_cache_reference(q, k, v, cos, sin, keys, values, rows)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(got, q_hf[0].transpose(0, 1))
    assert torch.equal(keys[rows], k_hf[0].transpose(0, 1)) and torch.equal(values[rows], v)
    untouched = torch.ones(keys.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(keys[untouched], before[0][untouched]) and torch.equal(values[untouched], before[1][untouched])


def test_half_precision_heads_rotated_in_fp32_as_olmo2_does_land_in_their_own_dtype():
    """OLMo 2's rotary embedding gives fp32 cos/sin beside bf16 heads and rotates in fp32; the rotated
    keys go to the bf16 cache and the queries come back in bf16 (found on an H100: the pool write failed)."""
    from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb as olmo2_rotary

    q, k, v, cos, sin, (keys, values), rows = _step(9, 4, 2, 16, torch.bfloat16, "cpu")
    cos, sin = cos.float(), sin.float()
    got = rotary_and_cache_reference(q, k, v, cos, sin, keys, values, rows)
    q_hf, k_hf = olmo2_rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert got.dtype == torch.bfloat16 and torch.equal(got, q_hf[0].transpose(0, 1))
    assert torch.equal(keys[rows], k_hf[0].transpose(0, 1))


def _check_kernel(rows: int, q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str, kernel) -> None:
    q, k, v, cos, sin, pools, write_rows = _step(rows, q_heads, kv_heads, dim, dtype, device)
    expected_pools = [p.float() for p in pools]  # the reference in fp32: nothing rounded
    expected = rotary_and_cache_reference(q.float(), k.float(), v.float(), cos.float(), sin.float(), *expected_pools,
                                          write_rows)
    got = kernel(q, k, v, cos, sin, *pools, write_rows)
    assert within_an_ulp(got, expected, dtype) and within_an_ulp(pools[0], expected_pools[0], dtype)
    assert torch.equal(pools[1].float(), expected_pools[1])  # values: copied as they are


@needs_triton_interpreter
def test_kernel_in_the_triton_interpreter():
    """The kernel on the CPU under TRITON_INTERPRET=1, so a change to it is checked without a GPU."""
    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_rotary import _check_kernel
from bitdelta.engine.ops.rotary_triton import rotary_and_cache_triton
for dtype in (torch.float16, torch.bfloat16):
    for shape in [(3, 4, 2, 16), (5, 6, 3, 20), (2, 2, 2, 6)]:
        _check_kernel(*shape, dtype, "cpu", rotary_and_cache_triton)
print("ok")
"""
    assert run_in_triton_interpreter(code).split()[-1] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,q_heads,kv_heads,dim", [(1, 32, 32, 128), (287, 32, 8, 128), (70, 12, 4, 80), (5, 8, 8, 64)])
def test_kernel_matches_the_fp32_rotation_within_an_ulp(rows, q_heads, kv_heads, dim, dtype):
    _check_kernel(rows, q_heads, kv_heads, dim, dtype, "cuda", rotary_and_cache)
