"""Reference quantization math: grids, clipping search, errors."""

import pytest
import torch

from compactlm.errors import ConfigError
from compactlm.primitives.quant import QuantSpec, choose_qparams, dequantize, quantize, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_rtn_error_is_within_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    codes, scale, zero = rtn(w, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    groups = 64 // group_size if group_size > 0 else 1
    assert scale.shape == (24, groups) and zero.shape == (24, groups)
    err = (dequantize(codes, scale, zero) - w).abs()
    step = scale.repeat_interleave(64 // groups, dim=1)
    assert bool((err <= step / 2 + 1e-6).all()), f"max err/step {float((err / step).max())}"
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())


def test_zero_weights_stay_exactly_zero():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    w[:, ::3] = 0.0
    for sym in (False, True):
        codes, scale, zero = rtn(w, QuantSpec(bits=3, group_size=16, symmetric=sym))
        assert bool((dequantize(codes, scale, zero)[:, ::3] == 0).all())


def test_clip_search_never_worse_and_usually_better():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[0, 0] = 12.0  # an outlier makes plain min/max wasteful
    base = QuantSpec(bits=3, group_size=32)
    clip = QuantSpec(bits=3, group_size=32, clip_search=True)
    errs = []
    for spec in (base, clip):
        s, z = choose_qparams(w, spec)
        errs.append(((dequantize(quantize(w, s, z, 3), s, z) - w).abs().pow(2.4)).sum(-1))
    assert bool((errs[1] <= errs[0] + 1e-5).all())
    assert float(errs[1].sum()) < 0.97 * float(errs[0].sum())


def test_g_idx_dequantize_matches_contiguous():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    spec = QuantSpec(bits=4, group_size=8)
    codes, s, z = rtn(w, spec)
    g_idx = torch.arange(32) // 8
    assert torch.equal(dequantize(codes, s, z), dequantize(codes, s, z, g_idx))


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits_is_a_clear_error(bits):
    with pytest.raises(ConfigError, match="bits=.*choose one of"):
        QuantSpec(bits=bits)


def test_group_size_must_divide_width():
    with pytest.raises(ConfigError, match="group_size=100 does not divide the input width 576"):
        choose_qparams(torch.randn(4, 576), QuantSpec(bits=4, group_size=100))
