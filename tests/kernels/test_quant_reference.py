"""Torch reference quantisers: packing, round-trip bounds."""

import pytest
import torch

from adaptive_kv.kernels import reference as ref


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_is_exact(bits):
    codes = torch.randint(0, 1 << bits, (17, 64), dtype=torch.uint8)
    packed = ref.pack(codes, bits)
    assert packed.shape == (17, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(ref.unpack(packed, bits), codes)


def test_pack_layout_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert ref.pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert ref.pack(torch.tensor([[5, 10]], dtype=torch.uint8), 4).tolist() == [[5 | 10 << 4]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_key_round_trip_within_half_a_step(bits, head_dim):
    torch.manual_seed(bits)
    keys = torch.randn(5, 32, head_dim) * torch.linspace(0.1, 8, head_dim)  # outlier channels
    packed, scale, zero = ref.quantize_keys(keys, bits)
    lengths = torch.full((5,), 32)
    back = ref.dequantize_keys(packed, scale, zero, lengths, bits, torch.float32).view_as(keys)
    step = scale.float().unsqueeze(1)
    assert ((back - keys).abs() <= step / 2 + 1e-4 * step + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_value_round_trip_within_half_a_step(bits):
    values = torch.randn(97, 64) * 3
    packed, scale, zero = ref.quantize_values(values, bits, 32)
    assert scale.shape == (97, 2) and scale.dtype == torch.float16
    back = ref.dequantize_values(packed, scale, zero, bits, torch.float32)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((back - values).abs() <= step / 2 + 1e-4 * step + 1e-6).all()


def test_constant_group_does_not_divide_by_zero():
    keys = torch.ones(1, 32, 64)
    packed, scale, zero = ref.quantize_keys(keys, 2)
    back = ref.dequantize_keys(packed, scale, zero, torch.tensor([32]), 2, torch.float32)
    assert torch.allclose(back, keys.view(32, 64), atol=1e-3)


def test_varlen_attention_matches_dense_per_head():
    torch.manual_seed(0)
    lengths = [5, 17]
    query = torch.randn(4, 1, 16)  # 2 KV heads x 2 query heads each
    keys = [torch.randn(n, 16) for n in lengths]
    values = [torch.randn(n, 16) for n in lengths]
    heads = torch.cat([torch.full((n,), h) for h, n in enumerate(lengths)])
    out, mass = ref.varlen_attention(query, torch.cat(keys), torch.cat(values), heads, 2, 0.25, need_mass=True)
    for h in range(2):
        q = query[2 * h : 2 * h + 2]
        expected = torch.softmax(q @ keys[h].T * 0.25, -1) @ values[h]
        torch.testing.assert_close(out[2 * h : 2 * h + 2], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass[heads == 0].sum(), torch.tensor(1.0))
