import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdelta.pack import pack_signs, packed_words, unpack_signs


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_round_trip_recovers_signs_for_any_shape(n, k, seed):
    delta = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    words = pack_signs(delta)
    assert words.dtype == torch.int32 and words.shape == (n, packed_words(k))
    assert torch.equal(unpack_signs(words, k), torch.where(delta > 0, 1.0, -1.0))


def test_layout_is_lsb_first_along_k():
    delta = -torch.ones(2, 70)
    delta[0, 0] = delta[0, 33] = delta[1, 31] = delta[1, 69] = 1.0
    words = pack_signs(delta)
    assert words.shape == (2, 3)
    assert words[0].tolist() == [1, 2, 0]
    assert words[1].tolist() == [-(2**31), 0, 1 << 5]  # bit 31 set is the int32 sign bit


def test_zero_delta_packs_as_minus_one_and_padding_is_zero():
    words = pack_signs(torch.zeros(3, 5))
    assert torch.equal(words, torch.zeros(3, 1, dtype=torch.int32))
    assert torch.equal(unpack_signs(words, 5), -torch.ones(3, 5))


def test_unpack_works_batched_and_in_other_dtypes():
    delta = torch.randn(4, 3, 45)
    words = torch.stack([pack_signs(d) for d in delta])
    signs = unpack_signs(words, 45, torch.bfloat16)
    assert signs.dtype == torch.bfloat16 and torch.equal(signs.float(), torch.where(delta > 0, 1.0, -1.0))
