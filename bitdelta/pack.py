"""The bit layout contract: how the signs of a delta matrix are packed.

A sign matrix of shape [N, K] (N output rows, K input columns) is stored as int32 words of shape
[N, ceil(K / 32)]. Bit j (least significant first) of word w in row n holds column k = 32 * w + j;
bit 1 means +1 and bit 0 means -1. Packing runs along K so that a kernel computing a row of the
output reads contiguous words. Columns past K (the padding of the last word) are 0; every reader
must either ignore them or multiply them by zero-padded activations.

A zero delta gets bit 0 (-1): with one bit there is no zero, and either choice costs the same
squared error, scale**2, for that weight.

This is the only place the layout is written down; every other module calls these functions.
"""

from __future__ import annotations

import numpy as np
import torch

BITS_PER_WORD = 32
_ROWS_PER_CHUNK = 1024  # bounds the temporary bool/uint8 buffers to ~32 MiB for K = 32768


def packed_words(k: int) -> int:
    """Number of int32 words a row of K signs occupies."""
    return (k + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Pack sign(delta) of a 2-D tensor [N, K] into int32 words [N, ceil(K/32)] on the CPU."""
    if delta.ndim != 2:
        raise ValueError(f"pack_signs expects a 2-D tensor, got shape {tuple(delta.shape)}")
    n, k = delta.shape
    words = packed_words(k)
    out = np.empty((n, words), dtype="<i4")
    for start in range(0, n, _ROWS_PER_CHUNK):
        positive = (delta[start : start + _ROWS_PER_CHUNK] > 0).cpu().numpy()
        padded = np.zeros((positive.shape[0], words * BITS_PER_WORD), dtype=np.bool_)
        padded[:, :k] = positive
        # packbits(little) puts column 8b+i in bit i of byte b; four little-endian bytes then form
        # the word whose bit j is column 32w+j, which is the layout above.
        out[start : start + positive.shape[0]] = np.packbits(padded, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(out)


def unpack_signs(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expand int32 words [..., N, ceil(K/32)] to a +-1 tensor [..., N, K] of `dtype`, on words' device."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed signs must be int32, got {words.dtype}")
    if words.shape[-1] != packed_words(k):
        raise ValueError(f"{words.shape[-1]} packed words cannot hold K={k} columns")
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift is fine: we keep only bit 0
    bits = bits.flatten(-2)[..., :k]
    return (bits * 2 - 1).to(dtype)
