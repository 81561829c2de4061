"""The residual add + RMSNorm and SiLU-and-multiply between a layer's linears (`engine/ops/norm.py`): the
references against transformers' LlamaRMSNorm and LlamaMLP activation on the CPU (bit for bit), and
the Triton kernels, on a GPU and under Triton's CPU interpreter, against the same arithmetic in fp32.
The kernels round where PyTorch does (the sum; the normalised row and its product with the weight;
SiLU and its product), so the sum is exact and every other element is within an ulp of the activation
dtype of the unrounded fp32 value. Fresh random inputs every time."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from bitdelta.engine.ops.norm import add_rms_norm, add_rms_norm_reference, silu_and_mul, silu_and_mul_reference
from bitdelta.kernels import triton_available
from conftest import needs_triton_interpreter, run_in_triton_interpreter, within_an_ulp

EPS = 1e-5


def _inputs(rows: int, hidden: int, entries: int, dtype: torch.dtype, device: str):
    h = (torch.randn(rows, hidden, device=device) * 3).to(dtype)
    residual = torch.randn(rows, hidden, device=device).to(dtype)
    table = (1 + 0.1 * torch.randn(entries, hidden, device=device)).to(dtype)  # per-slot norm weights
    weight_rows = torch.randint(0, entries, (rows,), device=device)
    return h, residual, table, weight_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_llama_rms_norm_after_the_residual_add(dtype):
    h, residual, table, weight_rows = _inputs(7, 48, 3, dtype, "cpu")
    norm = LlamaRMSNorm(48, eps=EPS).to(dtype)
    norm.weight.data = table[1].clone()
    summed, x = add_rms_norm_reference(h, residual, norm.weight.data, EPS)
    assert torch.equal(summed, h + residual) and torch.equal(x, norm(h + residual))
    same, x_first = add_rms_norm_reference(h, None, norm.weight.data, EPS)  # the first layer: no residual yet
    assert same is h and torch.equal(x_first, norm(h))
    _, per_row = add_rms_norm_reference(h, residual, table, EPS, weight_rows)
    for row, entry in enumerate(weight_rows.tolist()):
        norm.weight.data = table[entry].clone()
        assert torch.equal(per_row[row], norm((h + residual)[row:row + 1])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_reference_composes_the_llama_mlp(dtype):
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")).to(dtype)
    x = torch.randn(5, 32).to(dtype)
    assert torch.equal(mlp.down_proj(silu_and_mul_reference(mlp.gate_proj(x), mlp.up_proj(x))), mlp(x))


def _mostly_exact(got: torch.Tensor, eager: torch.Tensor) -> bool:
    """At least 99% of the elements equal eager PyTorch's: the kernels round where it rounds (skipping
    one of its roundings would break far more ties than the last fp32 bit of a normaliser does)."""
    return (got == eager).float().mean().item() >= 0.99


def _check_kernels(rows: int, hidden: int, dtype: torch.dtype, device: str, add_norm, silu) -> None:
    h, residual, table, weight_rows = _inputs(rows, hidden, 4, dtype, device)
    summed, x = add_norm(h, residual, table, EPS, weight_rows)
    assert torch.equal(summed, h + residual)  # one fp32 sum rounded once, as eager PyTorch
    assert within_an_ulp(x, _rms_norm_fp32(summed, table[weight_rows]), dtype)
    assert _mostly_exact(x, add_rms_norm_reference(h, residual, table, EPS, weight_rows)[1])
    same, x_first = add_norm(h, None, table[2], EPS, None)  # one weight for every row, no residual
    assert same is h and within_an_ulp(x_first, _rms_norm_fp32(h, table[2]), dtype)
    same, x_own = add_norm(h, None, table, EPS, weight_rows)  # a first layer whose fine-tunes have their own norms
    assert same is h and within_an_ulp(x_own, _rms_norm_fp32(h, table[weight_rows]), dtype)
    empty_sum, empty_x = add_norm(h[:0], residual[:0], table, EPS, weight_rows[:0])
    assert empty_sum.shape == empty_x.shape == (0, hidden)
    gate_up = (torch.randn(rows, 2 * hidden + 6, device=device) * 4).to(dtype)
    gate, up = gate_up.split(hidden + 3, dim=1)  # views of one stacked product, odd width
    activated = silu(gate, up)
    assert within_an_ulp(activated, F.silu(gate.float()) * up.float(), dtype)
    assert _mostly_exact(activated, silu_and_mul_reference(gate, up))


def _rms_norm_fp32(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    hf = h.float()
    return weight.float() * hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)


@needs_triton_interpreter
def test_kernels_in_the_triton_interpreter():
    """The kernels on the CPU under TRITON_INTERPRET=1, so a change to them is checked without a GPU. In
    fp16 only: the interpreter rounds fp32 to bf16 by truncation (NumPy has no bf16), the GPU to nearest."""
    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_norm import _check_kernels
from bitdelta.engine.ops.norm_triton import add_rms_norm_triton, silu_and_mul_triton
for rows, hidden in [(3, 64), (5, 100), (1, 1030)]:
    _check_kernels(rows, hidden, torch.float16, "cpu", add_rms_norm_triton, silu_and_mul_triton)
print("ok")
"""
    assert run_in_triton_interpreter(code).split()[-1] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (37, 4096), (300, 5120), (8, 8192), (3, 896)])
def test_kernels_match_the_fp32_arithmetic_within_an_ulp(rows, hidden, dtype):
    _check_kernels(rows, hidden, dtype, "cuda", add_rms_norm, silu_and_mul)


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
def test_mixed_dtypes_take_the_reference():
    """A residual or weight in another dtype than h: eager PyTorch's type promotion, not the kernel."""
    h, residual, table, weight_rows = _inputs(6, 256, 3, torch.bfloat16, "cuda")
    for r, w in ((residual.float(), table), (residual, table.float())):
        got, expected = add_rms_norm(h, r, w, EPS, weight_rows), add_rms_norm_reference(h, r, w, EPS, weight_rows)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected))
