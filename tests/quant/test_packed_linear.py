"""PackedLinear: the int4 kernel path and the dequantize path against the plain reference."""

import pytest
import torch
import torch.nn.functional as F

from compactlm.modules.packed_linear import ALWAYS, PackedLinear, force_path, int4_crossover
from compactlm.primitives.quant import QuantSpec, dequantize, rtn


def _layer(bits, out=96, inp=128, group=32, sym=False, bias=False):
    torch.manual_seed(bits)
    w = torch.randn(out, inp)
    codes, s, z = rtn(w, QuantSpec(bits=bits, group_size=group, symmetric=sym))
    b = torch.randn(out) if bias else None
    return PackedLinear.from_codes(codes, s, z, bits=bits, group_size=group, symmetric=sym, bias=b), (codes, s, z, b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_dequant_path_matches_reference(bits, sym):
    layer, (codes, s, z, b) = _layer(bits, sym=sym, bias=True)
    x = torch.randn(3, 5, 128)
    ref = F.linear(x, dequantize(codes, s, z), b)
    with force_path("dequant"):
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.codes(), codes)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_matches_reference(m, group, bits):
    layer, (codes, s, z, _b) = _layer(bits, out=128, inp=256, group=group)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    ref = x.float() @ dequantize(codes, s, z).t()
    with force_path("int4"):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 128)
    err = (out.float() - ref).abs()
    # bf16 scales/zeros and accumulation: compare by SQNR (STYLE 9), print the differences on failure
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out.float() - ref).pow(2).mean())
    assert sqnr > 35, f"SQNR {float(sqnr):.1f} dB, max diff {float(err.max()):.4g}, mean {float(err.mean()):.4g}"


def test_path_choice_comes_from_a_measurement():
    layer, _ = _layer(4, out=128, inp=256, group=64)
    limit = int4_crossover(128, 256, 64)
    assert limit in (0, 1, 4, 16, 64, ALWAYS)
    x1 = torch.randn(1, 256, dtype=torch.bfloat16)
    assert layer.choose_path(x1) == ("int4" if limit >= 1 else "dequant")
    assert layer.choose_path(torch.randn(1, 256)) == "dequant"  # fp32 activations never take the bf16 kernel
    with pytest.raises(ValueError, match="int4 path needs 2-4 bits"), force_path("int4"):
        _layer(8)[0].choose_path(x1)
