"""Rotary position embedding of a packed step's queries and keys, and the keys and values written
into the paged KV cache: the public entry point and its reference.

    q_rotated = rotary_and_cache(q, k, v, cos, sin, key_pool, value_pool, write_rows)

q [T, Hq, D], k and v [T, Hk, D] (views of one stacked projection are fine), cos and sin [T, D]
(the model's rotary embedding at each row's position). The rotation is the Llama family's
(`rotate_half`: x * cos + cat(-x2, x1) * sin, x1 and x2 the halves of a head); the reference is
transformers' arithmetic exactly, the kernel rounds once instead of three times (within an ulp of
the activation dtype). The rotated keys and the values go to pool rows `write_rows` of key_pool and
value_pool [rows, Hk, D].

On a CUDA fp16/bf16 tensor with Triton it runs one kernel (`rotary_triton.py`) for what the
reference does in about a dozen (an eager serving step launches these per layer from Python, and its
host time is the step's time: docs/kernels.md); otherwise the reference.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos, sin [T, D]: transformers' apply_rotary_pos_emb for one tensor."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


def rotary_and_cache_reference(q, k, v, cos, sin, key_pool, value_pool, write_rows) -> torch.Tensor:
    """In cos's precision (OLMo 2 rotates bf16 heads in fp32), each result in its tensor's dtype."""
    key_pool[write_rows] = rotate(k, cos, sin).to(key_pool.dtype)
    value_pool[write_rows] = v
    return rotate(q, cos, sin).to(q.dtype)


def rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     key_pool: torch.Tensor, value_pool: torch.Tensor, write_rows: torch.Tensor) -> torch.Tensor:
    """The rotated queries [T, Hq, D] (contiguous); writes the rotated keys and the values into the pools."""
    from bitdelta.kernels import on_triton

    if on_triton(q) and cos.dtype == q.dtype:
        from bitdelta.engine.ops.rotary_triton import rotary_and_cache_triton

        return rotary_and_cache_triton(q, k, v, cos, sin, key_pool, value_pool, write_rows)
    return rotary_and_cache_reference(q, k, v, cos, sin, key_pool, value_pool, write_rows)
