"""The arithmetic and the bit-plane layout of the binary tensor-core delta kernel (v11,
`decode_binary.py`), in PyTorch: the kernel's contract, tested on the CPU.

x . sign over one row is computed from popcounts, which the tensor cores' 1-bit mma (m16n8k256,
AND + POPC) gives 32768 at a time with no bit expansion at all:

- x becomes a 32-bit fixed point of the row's magnitude: v = trunc(x * 2^(30 - E)), with E the
  binary exponent of the row's |max| (|max| = m * 2^E, 0.5 <= m < 1), so |v| < 2^30. Scaling by a
  power of two is exact: the kernel and this model give the same v bit for bit.
- v is written as 32 bit planes, two's complement: v = -2^31 b_31 + sum_{b < 31} 2^b b_b.
- with u the packed sign bit (1 = +1, `bitdelta.pack`), sign = 2u - 1, so
  x . sign = 2^(E - 30) * (2 sum_k v_k u_k - sum_k v_k), and
  sum_k v_k u_k = sum_b c_b popc(plane_b AND u), c_b = 2^b (b < 31), c_31 = -2^31: exact integers.

The planes are stored per row in mma k-steps of 256 k (8 packed words), in whole blocks of 4
k-steps (1024 k: the kernel's pipeline step, a 128-byte line of each sign row): word w of k-step s
of plane b = 8p + g sits at s * 256 + ((g * 4 + q) * 4 + p) * 2 + w, where the packed word is
8s + 2q + w. Lane (g, q) of a warp then reads its B operands of all 32 planes of a k-step (two per
plane group p: words 2q and 2q + 1 of plane 8p + g) as 32 contiguous bytes, and the A operand it
pairs them with is words 2q, 2q + 1 of sign rows g and g + 8: the same k on both sides, whatever
the mma's own k order (a reduction may run in any order both operands share).
"""

from __future__ import annotations

import torch

PLANES = 32  # two's complement bit planes of v: four groups of 8, one group per mma (its N side)
FIXED_POINT_BITS = 30  # |v| < 2^30
STEP_WORDS = 8  # packed words of one mma k-step (k = 256)
BLOCK_STEPS = 4  # k-steps of one 128-byte line of a sign row
STEP_PLANE_WORDS = PLANES * STEP_WORDS  # int32 words of one row's planes per k-step
MIN_EXPONENT = -96  # rows whose |max| is below 2^-96 (or zero) take this exponent: 2^(30 - E) stays a normal float


def row_exponents(x: torch.Tensor) -> torch.Tensor:
    """E per row of x [M, K]: |max| = m * 2^E with 0.5 <= m < 1, at least MIN_EXPONENT (int32 [M])."""
    peak = x.float().abs().amax(dim=1)
    _, exponent = torch.frexp(peak)
    return torch.where(peak > 0, exponent, MIN_EXPONENT).clamp(min=MIN_EXPONENT).to(torch.int32)


def fixed_point(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v int64 [M, K] (|v| < 2^30) and E int32 [M]: x = v * 2^(E - 30) up to truncation toward zero."""
    exponent = row_exponents(x)
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), FIXED_POINT_BITS - exponent)
    return (x.float() * scale[:, None]).to(torch.int32).long(), exponent


def plane_steps(k: int) -> int:
    """k-steps (of 256) the planes of a K-column row take: whole blocks of 1024 k."""
    return BLOCK_STEPS * -(-(-(-k // 32)) // (BLOCK_STEPS * STEP_WORDS))


def natural_planes(v: torch.Tensor) -> torch.Tensor:
    """v int64 [M, K] -> plane words int32 [M, 32, KS * 8]: bit j of word kw of plane b is bit b of
    v[32 kw + j] (zero past K)."""
    m, k = v.shape
    words = plane_steps(k) * STEP_WORDS
    padded = torch.zeros(m, words * 32, dtype=torch.int64, device=v.device)
    padded[:, :k] = v & 0xFFFFFFFF  # the two's complement bits
    bits = (padded.view(m, 1, words, 32) >> torch.arange(PLANES, device=v.device).view(1, PLANES, 1, 1)) & 1
    packed = (bits << torch.arange(32, device=v.device)).sum(dim=-1)  # [M, 32, words], < 2^32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def plane_layout(natural: torch.Tensor) -> torch.Tensor:
    """[M, 32 planes, KS * 8 words] -> the kernel's layout [M, KS * 256] (see the module docstring)."""
    m, planes, words = natural.shape
    steps = words // STEP_WORDS
    # plane b = 8p + g, word 8s + 2q + w -> (s, g, q, p, w)
    t = natural.view(m, 4, 8, steps, 4, 2)  # (m, p, g, s, q, w)
    return t.permute(0, 3, 2, 4, 1, 5).reshape(m, steps * STEP_PLANE_WORDS).contiguous()


def binary_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the planes kernel writes for x [M, K]: planes int32 [M, KS * 256] in the kernel layout,
    the row scale 2^(E - 30) fp32 [M] and sum_k v_k int64 [M]."""
    v, exponent = fixed_point(x)
    row_scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - FIXED_POINT_BITS)
    return plane_layout(natural_planes(v)), row_scale, v.sum(dim=1)


def plane_weights(device: torch.device | None = None) -> torch.Tensor:
    """c_b int64 [32]: 2^b, and -2^31 for the sign plane."""
    weights = torch.ones(PLANES, dtype=torch.int64, device=device) << torch.arange(PLANES, device=device)
    weights[PLANES - 1] = -(2**31)
    return weights


def binary_dot(planes: torch.Tensor, row_scale: torch.Tensor, sum_v: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The kernel's x . sign from the planes buffer: planes [M, KS * 256] (kernel layout), signs int32
    [M, N, ceil(K/32)] (row i's slot's words) -> fp32 [M, N], by popcounts as the 1-bit mma takes them."""
    m, n, kw = signs.shape
    steps = planes.shape[1] // STEP_PLANE_WORDS
    natural = planes.view(m, steps, 8, 4, 4, 2).permute(0, 4, 2, 1, 3, 5).reshape(m, PLANES, steps * STEP_WORDS)
    words = torch.zeros(m, n, natural.shape[2], dtype=torch.int64, device=signs.device)
    words[:, :, :kw] = signs.long() & 0xFFFFFFFF
    both = natural.long().unsqueeze(1) & 0xFFFFFFFF & words.unsqueeze(2)  # [M, N, 32 planes, words]
    popc = ((both.unsqueeze(-1) >> torch.arange(32, device=signs.device)) & 1).sum(dim=(-1, -2))  # [M, N, 32]
    vu = (popc * plane_weights(signs.device)).sum(dim=-1)
    return (2 * vu - sum_v[:, None]).float() * row_scale[:, None]
