"""The merge kernel of the MERGED_GEMM path (GPU only; imported lazily by `merged_gemm.py`): a slot's
merged weights, base + scale * sign rounded once to the base's dtype, written as a matrix: exactly
what `bitdelta merge` writes (`reference.merged_weight`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.base_product import stored
from bitdelta.kernels.base_tiles_triton import base_tile
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.merged_gemm import MergedGemmTiles
from bitdelta.kernels.signs_triton import merge_tile


@triton.jit
def _merge_kernel(w_ptr, w_scale_ptr, signs_ptr, scales_ptr, out_ptr, N, K, KW, stride_wn, stride_w_scale, stride_sg_n,
                  stride_on, FORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = dtype(w[n, k] + scale[n] * sign[n, k]) for one [BLOCK_N, BLOCK_K] tile, w read as
    stored in FORM (`base_tiles_triton`)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kw = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    row_mask = rows < N
    mask = row_mask[:, None] & (ks < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    w = base_tile(w_ptr, w_scale_ptr, rows.to(tl.int64), row_mask, tl.program_id(1) * BLOCK_K, K, stride_wn, stride_w_scale,
                  BLOCK_K, False, FORM)
    words = tl.load(signs_ptr + rows64 * stride_sg_n + kw[None, :], mask=row_mask[:, None] & (kw < KW)[None, :],
                    other=0)
    scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0)
    merged = merge_tile(w, scale, words, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64 * stride_on + ks[None, :], merged, mask=mask)


def merge_weight(base_weight, signs: torch.Tensor, scales: torch.Tensor, slot: int, tiles: MergedGemmTiles,
                 out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`reference.merged_weight` on the GPU: [N, K] in `dtype` (default: the base's; a quantized base
    read as stored needs one), row-major whatever the base's layout, into `out` if given (row-major
    [N, K])."""
    n, k = base_weight.shape
    base = stored(base_weight)
    if out is None:
        out = torch.empty(n, k, dtype=dtype or base.values.dtype, device=base.values.device)
    elif out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [{n}, {k}] tensor, got shape {tuple(out.shape)} strides {out.stride()}")
    slot_signs = signs[slot].contiguous()
    slot_scales = scales[slot].to(torch.float32).contiguous()
    fast(_merge_kernel)[(triton.cdiv(n, tiles.block_n), triton.cdiv(k, tiles.block_k))](
        base.values, base.scale if base.scale is not None else slot_scales, slot_signs, slot_scales, out, n, k,
        slot_signs.shape[1], base.values.stride(0), base.scale_stride, slot_signs.stride(0), out.stride(0), FORM=base.form,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
    )
    return out
