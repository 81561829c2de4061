import pytest
import torch

from bitdelta.delta import BinaryDelta


@pytest.fixture
def weights():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(48, 100, generator=generator)
    return base, base + 0.01 * torch.randn(48, 100, generator=generator) * torch.rand(48, 1, generator=generator)


def test_reconstruction_is_base_plus_mean_abs_delta_times_sign(weights):
    base, finetuned = weights
    delta = finetuned - base
    expected = base + delta.abs().mean() * torch.where(delta > 0, 1.0, -1.0)
    got = BinaryDelta.from_weights(base, finetuned).apply(base)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_row_scales_are_per_row_mean_abs_delta(weights):
    base, finetuned = weights
    delta = finetuned - base
    binary = BinaryDelta.from_weights(base, finetuned, "row")
    torch.testing.assert_close(binary.scale, delta.abs().mean(dim=1))
    assert binary.row_scales().shape == (48,)


def test_row_scales_are_never_farther_than_one_matrix_scale(weights):
    base, finetuned = weights
    errors = {g: (BinaryDelta.from_weights(base, finetuned, g).apply(base) - finetuned).norm() for g in ("matrix", "row")}
    assert errors["row"] < errors["matrix"]


def test_mean_abs_is_the_l2_optimal_scale(weights):
    base, finetuned = weights
    binary = BinaryDelta.from_weights(base, finetuned)
    signs = binary.to_dense() / binary.scale
    best = (finetuned - base - binary.to_dense()).norm()
    for factor in (0.9, 1.1):
        assert (finetuned - base - factor * binary.scale * signs).norm() > best


def test_apply_in_lower_precision_rounds_once_from_fp32(weights):
    base, finetuned = weights
    binary = BinaryDelta.from_weights(base, finetuned)
    assert torch.equal(binary.apply(base, torch.bfloat16), binary.apply(base).to(torch.bfloat16))
