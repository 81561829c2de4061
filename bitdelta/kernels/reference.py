"""Pure-PyTorch multi-tenant BitDelta linear: the ground truth every GPU kernel is tested against,
and the CPU path.

For rows x_i of a batch, each tagged with the delta slot t_i of its fine-tune:

    y_i = x_i @ W_base.T + bias + scale[t_i] * (x_i @ sign[t_i].T)

slot -1 means "base only". `signs` are packed as `bitdelta.pack` defines: int32 [S, N, ceil(K/32)].
`scales` are fp32 [S, N]: a per-matrix scale is the same value repeated over the N rows.
Arithmetic is fp32 whatever the activation dtype, and the result is cast back to x's dtype.
"""

from __future__ import annotations

import torch

from bitdelta.pack import unpack_signs


def delta_matmul(x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """The delta term alone, fp32 [M, N]: scale[t_i] * (x_i @ sign[t_i].T), zero where t_i = -1."""
    m, k = x.shape
    out = torch.zeros(m, signs.shape[1], dtype=torch.float32, device=x.device)
    for slot in torch.unique(slot_ids).tolist():
        if slot < 0:
            continue
        rows = (slot_ids == slot).nonzero(as_tuple=True)[0]
        sign = unpack_signs(signs[slot], k, torch.float32)
        out[rows] = (x[rows].float() @ sign.T) * scales[slot].float()
    return out


def merged_weight(base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, slot: int) -> torch.Tensor:
    """Slot `slot`'s fine-tune weight as `bitdelta merge` writes it: base + scale * sign in fp32,
    rounded once to the base's dtype. [N, K] like base_weight."""
    sign = unpack_signs(signs[slot], base_weight.shape[1], torch.float32)
    return (base_weight.float() + scales[slot].float()[:, None] * sign).to(base_weight.dtype)


def bitdelta_matmul(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    slot_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] in x's dtype for x [M, K], base_weight [N, K], slot_ids [M] (int, -1 = base only)."""
    y = x.float() @ base_weight.float().T + delta_matmul(x, signs, scales, slot_ids)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def expert_matmul(x: torch.Tensor, base_weights: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor,
                  pair_experts: torch.Tensor, pair_slots: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts pairs: y [P, N] in x's dtype, y_p = x_p @ W[e_p].T + scale[e_p, t_p] * (x_p @
    sign[e_p, t_p].T) for x [P, K], base_weights [E, N, K], signs [E, S, N, ceil(K/32)], scales [E, S, N]
    and each pair's expert e_p and delta slot t_p (-1 = base only)."""
    y = torch.empty(x.shape[0], base_weights.shape[1], dtype=x.dtype, device=x.device)
    for expert in torch.unique(pair_experts).tolist():
        pairs = (pair_experts == expert).nonzero(as_tuple=True)[0]
        y[pairs] = bitdelta_matmul(x[pairs], base_weights[expert], signs[expert], scales[expert], pair_slots[pairs])
    return y
