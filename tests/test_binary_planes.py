"""CPU tests of v11's arithmetic and plane layout (`kernels/binary_planes.py`): the contract the
binary tensor-core kernel and its planes kernel are held to on the GPU (tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from bitdelta.kernels.binary_planes import (
    FIXED_POINT_BITS,
    PLANES,
    binary_dot,
    binary_planes,
    fixed_point,
    natural_planes,
    plane_layout,
    plane_steps,
    row_exponents,
)
from bitdelta.pack import pack_signs, unpack_signs


def _signs(m: int, n: int, k: int) -> torch.Tensor:
    return torch.stack([pack_signs(torch.randn(n, k)) for _ in range(m)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 33, 256, 1000, 4097])
def test_popcount_dot_matches_x_dot_sign(k, dtype):
    """2^(E - 30) (2 sum v u - sum v) from the planes as the kernel lays them out is x . sign, with
    the error of a 30-bit fixed point of each row's |max| (relative ~1e-9 per element of |max|)."""
    m, n = 4, 24
    x = torch.randn(m, k).to(dtype)
    x[1, k // 2] = 4e3  # an outlier row: its small entries must survive the fixed point
    x[2] = 0
    signs = _signs(m, n, k)
    got = binary_dot(*binary_planes(x), signs)
    for row in range(m):
        want = x[row].double() @ unpack_signs(signs[row], k, torch.float64).T
        bound = 1e-7 * x[row].double().abs().max().item() * k ** 0.5 + 1e-30
        assert (got[row].double() - want).abs().max().item() <= bound
    assert torch.equal(got[2], torch.zeros(n))


def test_fixed_point_scales_by_a_power_of_two_below_2_to_30():
    x = torch.tensor([[1.0, -0.75, 0.0], [0.0, 0.0, 0.0], [3e-3, 1e-3, -2.5e-3]], dtype=torch.bfloat16)
    v, exponent = fixed_point(x)
    assert v.abs().max().item() < 2**FIXED_POINT_BITS
    # |max| = m 2^E with 0.5 <= m < 1
    peak = x.float().abs().amax(dim=1)
    live = peak > 0
    assert torch.all(peak[live] < torch.ldexp(torch.ones(1), exponent[live].float()))
    assert torch.all(peak[live] >= torch.ldexp(torch.ones(1), exponent[live].float() - 1))
    assert v[0].tolist() == [2**29, -(3 * 2**27), 0]  # 1.0 = 0.5 * 2^1: v = x * 2^29 exactly
    assert row_exponents(x)[1].item() < -90 and v[1].abs().sum().item() == 0


def test_planes_hold_the_twos_complement_bits_in_the_kernel_layout():
    k = 300
    x = torch.randn(3, k)
    v, _ = fixed_point(x)
    natural = natural_planes(v)
    assert natural.shape == (3, PLANES, plane_steps(k) * 8) and plane_steps(k) == 4  # one block of 1024 k
    for row, col in [(0, 0), (1, 37), (2, 299)]:
        word, bit = divmod(col, 32)
        bits = [(natural[row, b, word].item() >> bit) & 1 for b in range(PLANES)]
        assert sum(bit_b << b for b, bit_b in enumerate(bits)) == v[row, col].item() & 0xFFFFFFFF
    assert torch.all(natural[:, :, (k + 31) // 32:] == 0)  # zero past K
    # the layout: word 8s + 2q + w of plane 8p + g at s * 256 + ((g * 4 + q) * 4 + p) * 2 + w
    laid = plane_layout(natural)
    for p, g, s, q, w in [(0, 0, 0, 0, 0), (3, 7, 1, 2, 1), (1, 5, 3, 3, 0), (2, 1, 2, 1, 1)]:
        assert laid[1, s * 256 + ((g * 4 + q) * 4 + p) * 2 + w] == natural[1, 8 * p + g, 8 * s + 2 * q + w]
