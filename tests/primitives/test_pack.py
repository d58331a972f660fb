"""Bit packing: round trip, and the exact compressed-tensors pack-quantized layout."""

import pytest
import torch

from compactlm.primitives.pack import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 100, 576, 33])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits, n, dim):
    torch.manual_seed(bits * n)
    shape = (n, 5) if dim == 0 else (5, n)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_int32(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == -(-n * bits // 32)
    assert torch.equal(unpack_int32(packed, bits, n, dim=dim), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 100), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes, bits, dim=0), helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_rejects_bits_outside_1_to_8():
    with pytest.raises(ValueError, match="1..8"):
        pack_int32(torch.zeros(2, 32, dtype=torch.uint8), 9)
