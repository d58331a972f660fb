"""Group quantization math: round trip error bounds, packing, grouping axes, padding-aware statistics."""

from __future__ import annotations

import pytest
import torch

from compactlm.kv.quantizer import (
    QuantizedKV,
    decode_meta,
    decode_meta8,
    dequantize_groups,
    pack_codes,
    quantize_groups,
    unpack_codes,
)


def _x(shape=(2, 3, 64, 16), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == 16 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-2, -1])
def test_round_trip_error_is_within_half_a_step(bits, dim):
    x = _x()
    codes, scale, zero = quantize_groups(x, bits, 8, dim, meta_dtype=torch.float32)
    assert codes.max() <= 2 ** bits - 1
    y = dequantize_groups(codes, scale, zero, 8, dim)
    g = x.reshape(2, 3, 8, 8, 16) if dim == -2 else x.reshape(2, 3, 64, 2, 8)
    err = (y.reshape(g.shape) - g).abs()
    assert (err <= scale.unsqueeze(dim) / 2 + 1e-5).all()
    sqnr = 10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean())
    assert sqnr > {2: 5, 4: 18, 8: 40}[bits], f"SQNR {sqnr:.1f} dB"


def test_keys_group_along_tokens_values_along_channels():
    x = _x((1, 2, 32, 16))
    _, ks, _ = quantize_groups(x, 2, 8, -2)
    _, vs, _ = quantize_groups(x, 2, 8, -1)
    assert ks.shape == (1, 2, 4, 16)  # one scale per channel per 8 tokens
    assert vs.shape == (1, 2, 32, 2)  # one scale per token per 8 channels


def test_per_channel_outlier_stays_in_its_channel():
    """KIVI's reason for per-channel keys: a large channel must not ruin the precision of the others."""
    x = _x((1, 1, 32, 16))
    x[..., 3] *= 50
    codes, s, z = quantize_groups(x, 4, 32, -2)
    y = dequantize_groups(codes, s, z, 32, -2)
    others = [c for c in range(16) if c != 3]
    rel = (y - x)[..., others].abs().max() / x[..., others].abs().max()
    assert rel < 0.1


def test_constant_groups_are_exact_and_padding_is_ignored():
    x = torch.full((1, 1, 8, 8), 3.0)
    codes, s, z = quantize_groups(x, 2, 8, -2)
    assert torch.equal(dequantize_groups(codes, s, z, 8, -2), x)
    y = _x((1, 1, 8, 8))
    y[:, :, :2] = 1000.0  # left padding with garbage
    valid = torch.tensor([[False, False] + [True] * 6])
    codes, s, z = quantize_groups(y, 4, 8, -2, valid=valid)
    back = dequantize_groups(codes, s, z, 8, -2)
    assert (back[:, :, 2:] - y[:, :, 2:]).abs().max() < 0.5
    codes, s, z = quantize_groups(y, 4, 8, -2)  # without the mask the range is ruined
    assert (dequantize_groups(codes, s, z, 8, -2)[:, :, 2:] - y[:, :, 2:]).abs().max() > 2


def test_quantized_kv_slices_append_and_bytes():
    x = _x((1, 2, 64, 16))
    q = QuantizedKV.quantize(x, 2, 16, -2)
    assert q.nbytes == 1 * 2 * 64 * 4 + 2 * (1 * 2 * 4 * 16 * 2)  # codes + fp16 scale and zero
    both = q.append(QuantizedKV.quantize(x, 2, 16, -2))
    assert both.length == 128
    assert torch.equal(both.dequantize(start=64, end=96), q.dequantize(start=0, end=32))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        quantize_groups(_x(), 3, 8, -2)
    with pytest.raises(ValueError, match="multiple"):
        quantize_groups(_x(), 2, 7, -2)
    with pytest.raises(ValueError, match="B, H, T, D"):
        quantize_groups(torch.zeros(4, 4), 2, 2, -1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_unpack_equals_shift_unpack(bits, dtype):
    from compactlm.kv.quantizer import unpack_to

    codes = torch.randint(0, 2 ** bits, (2, 3, 7, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_to(packed, bits, dtype), unpack_codes(packed, bits).to(dtype))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [-2, -1])
def test_int8_metadata_round_trip_within_half_a_stored_step_and_near_fp16(bits, dim):
    """The 2-byte metadata: codes fitted to the decoded scale/zero point; the scale is within 1/16 octave
    of the group's (max - min) / qmax (rounded log code) and the zero within 1/8 step of -min, so every
    element decodes within 0.8 stored steps and the SQNR stays near that of fp16 metadata."""
    x = _x((2, 3, 64, 16), seed=3) + torch.linspace(-2, 2, 16)  # per-channel offsets, as keys have
    codes, scale, zero = quantize_groups(x, bits, 8, dim, meta_dtype="int8")
    assert scale.dtype == torch.uint8 and zero.dtype == torch.int8
    y = dequantize_groups(codes, scale, zero, 8, dim)
    s, _ = decode_meta8(scale, zero)
    g = x.reshape(2, 3, 8, 8, 16) if dim == -2 else x.reshape(2, 3, 64, 2, 8)
    err = (y.reshape(g.shape) - g).abs()
    assert (err <= 0.8 * s.unsqueeze(dim) + 1e-5).all(), (err / s.unsqueeze(dim)).max()
    need = (g.amax(dim) - g.amin(dim)) / (2 ** bits - 1)
    mn = g.amin(dim)
    fit = torch.where(mn > 0, mn / 32, -mn / 31.75)  # smallest scale whose quarter-step zero point fits int8
    assert (s >= need * 2 ** (-1 / 16) * (1 - 1e-6)).all()
    assert (s <= torch.maximum(need * 2 ** (1 / 16), fit * 2 ** (1 / 8)) * (1 + 1e-6)).all()
    ref = dequantize_groups(*quantize_groups(x, bits, 8, dim, meta_dtype=torch.float16), 8, dim)

    def sqnr(z):
        return 10 * torch.log10(x.pow(2).mean() / (x - z).pow(2).mean()).item()

    # int4 loses more: its 15 steps span less, so offset channels exceed the 32-step zero-point range
    # and the scale is enlarged (documented limit of the format; it exists for int2's bytes budget)
    assert sqnr(y) > sqnr(ref) - {2: 0.3, 4: 1.5}[bits], (sqnr(y), sqnr(ref))


def test_int8_metadata_large_offsets_enlarge_the_scale_instead_of_clipping():
    """A channel far from zero (offset 1000× its range) must still decode within half a (stored) step."""
    x = _x((1, 1, 32, 8), seed=4) * 0.01
    x[..., 2] += 10.0
    x[..., 5] -= 7.0
    codes, scale, zero = quantize_groups(x, 2, 32, -2, meta_dtype="int8")
    y = dequantize_groups(codes, scale, zero, 32, -2)
    s, _ = decode_meta8(scale, zero)
    assert ((y - x).abs() <= 0.8 * s + 1e-5).all()
    assert (y - x)[..., 2].abs().max() < 0.8 * 10.0 / 32  # the enlarged step: offset / 32, not a clipped offset
    with pytest.raises(ValueError, match="meta_dtype"):
        quantize_groups(x, 2, 32, -2, meta_dtype="fp8")


def test_quantized_kv_int8_metadata_bytes_and_slices():
    x = _x((1, 2, 64, 16), seed=5)
    q = QuantizedKV.quantize(x, 2, 16, -2, meta_dtype="int8")
    assert q.nbytes == 2 * 64 * 4 + 2 * (2 * 4 * 16)  # codes + (1-byte scale, 1-byte zero) per group
    full = q.dequantize()
    assert torch.equal(q.dequantize(start=16, end=48), full[..., 16:48, :])
    s, z = q.meta(16, 48, torch.float32)
    assert s.shape == (1, 2, 2, 16) and z.dtype == torch.float32


def _sq_err(x, y, group_size, dim):
    g = x.reshape(*x.shape[:2], -1, group_size, x.shape[-1]) if dim == -2 else x.reshape(*x.shape[:3], -1, group_size)
    h = y.reshape(g.shape)
    return (g - h).square().sum(dim)  # per group


@pytest.mark.parametrize("meta", [torch.float16, "int8"])
@pytest.mark.parametrize("dim", [-2, -1])
def test_clip_search_never_loses_to_min_max_and_wins_on_outliers(meta, dim):
    """The searched range includes min-max (no cut), so no group's error may grow; with one outlier per
    group of 2-bit codes the cut range must lower the total error clearly (here by more than 20 %)."""
    x = _x((1, 2, 64, 32), seed=6)
    x[..., ::16, 3] *= 8  # outlier tokens in a channel (keys) / outlier channels in tokens (values)
    x[..., 5, ::16] *= 8
    mm = dequantize_groups(*quantize_groups(x, 2, 16, dim, meta), 16, dim)
    codes, scale, zero = quantize_groups(x, 2, 16, dim, meta, clip_search=True)
    cs = dequantize_groups(codes, scale, zero, 16, dim)
    e_mm, e_cs = _sq_err(x, mm, 16, dim), _sq_err(x, cs, 16, dim)
    assert (e_cs <= e_mm * (1 + 1e-5) + 1e-6).all(), (e_cs - e_mm).max()
    assert e_cs.sum() < 0.8 * e_mm.sum(), (e_cs.sum(), e_mm.sum())
    assert scale.dtype == (torch.uint8 if meta == "int8" else torch.float16)  # same stored format, same bytes


def test_clip_search_ignores_padded_tokens():
    """Padded tokens (valid False) must not steer the fitted range: huge pads leave the codes unchanged."""
    x = _x((1, 1, 32, 8), seed=7)
    valid = torch.ones(1, 32, dtype=torch.bool)
    valid[:, :6] = False
    y = x.clone()
    y[..., :6, :] = 1e4
    a = quantize_groups(x, 2, 16, -2, "int8", valid, clip_search=True)
    b = quantize_groups(y, 2, 16, -2, "int8", valid, clip_search=True)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.equal(a[0][..., 6:, :], b[0][..., 6:, :])


@pytest.mark.parametrize("dim", [-2, -1])
def test_one_byte_metadata_is_one_byte_per_group_and_near_the_searched_two_byte_format(dim):
    """meta_dtype="int4": one uint8 per group plus a per-row base; its error stays within 10 % of the
    searched 2-byte format (1-byte codes are fitted by the same error criterion) and below min-max's."""
    x = _x((2, 3, 64, 32), seed=8) * torch.linspace(0.5, 2, 32) + torch.linspace(-3, 3, 32)  # keys-like
    codes, scale, base = quantize_groups(x, 2, 16, dim, "int4")
    rows = 32 if dim == -2 else 2
    assert scale.dtype == torch.uint8 and scale.shape == ((2, 3, 4, 32) if dim == -2 else (2, 3, 64, 2))
    assert base.shape == (2, 3, 1, rows, 6) and base.dtype == torch.float32
    y = dequantize_groups(codes, scale, base, 16, dim)
    m8 = dequantize_groups(*quantize_groups(x, 2, 16, dim, "int8", clip_search=True), 16, dim)
    mm = dequantize_groups(*quantize_groups(x, 2, 16, dim, torch.float16), 16, dim)
    e4, e8, emm = ((x - t).square().sum().item() for t in (y, m8, mm))
    # values (dim=-1) are fitted by the x²-weighted error (fit.VALUE_GRID), so only keys compare in plain MSE
    assert e4 < emm and (dim == -1 or e4 < 1.1 * e8), (e4, e8, emm)


def test_one_byte_metadata_store_keeps_its_first_base_and_counts_it():
    x = _x((1, 2, 64, 16), seed=9)
    q = QuantizedKV.quantize(x[..., :32, :], 2, 16, -2, "int4")
    later = QuantizedKV.quantize(x[..., 32:, :] * 3, 2, 16, -2, "int4", like=q)
    assert later.zero is q.zero  # the base fixed by the first flush is reused, not refitted
    both = q.append(later)
    assert both.meta4 and both.zero is q.zero
    assert both.nbytes == 2 * 64 * 4 + 2 * 4 * 16 + q.zero.numel() * 4  # codes + 1 byte per group + base
    full = both.dequantize()
    assert torch.equal(both.dequantize(start=16, end=48), full[..., 16:48, :])
    assert (full - torch.cat([x[..., :32, :], x[..., 32:, :] * 3], -2)).square().mean() < 0.25 * (x * 3).var()
    with pytest.raises(ValueError, match="like="):
        q.append(QuantizedKV.quantize(x[..., 32:, :], 2, 16, -2, "int4"))  # a second base: refused


def test_one_byte_metadata_base_names_its_grid_and_a_covering_grid_never_clips(monkeypatch):
    """The stored base carries its Meta4Grid (decode needs nothing else); with ``cover`` the fit keeps every
    group's min and max inside the code range where a grid can, the default fit may clip them."""
    from compactlm.kv import fit

    x = _x((1, 2, 64, 32), seed=11)
    x[..., 5, 3] = 4.0  # one outlier channel in one token: a value group a clipping fit cuts
    wide = fit.Meta4Grid(u_bits=5, steps=8, mid_code=20, z_step=0.4, cover=True)
    monkeypatch.setattr(fit, "VALUE_GRID", wide)
    codes, scale, base = quantize_groups(x, 2, 16, -1, "int4")
    assert base[..., 4].unique().tolist() == [5.0] and torch.allclose(base[..., 3], torch.tensor(1 / 8))
    s, lo = decode_meta(scale, base, torch.float32)
    g = x.reshape(1, 2, 64, 2, 16)
    covered = (lo <= g.amin(-1) + 1e-6) & (lo + 3 * s >= g.amax(-1) - 1e-6)
    y = dequantize_groups(codes, scale, base, 16, -1)
    assert covered[0, 0, 5, 0] and (y[0, 0, 5, 3] - 4.0).abs() <= s[0, 0, 5, 0] / 2 + 1e-6
    monkeypatch.setattr(fit, "VALUE_GRID", fit.Meta4Grid(4, 4, 11, 0.2, cover=False))
    codes, scale, base = quantize_groups(x, 2, 16, -1, "int4")
    s, lo = decode_meta(scale, base, torch.float32)
    assert (lo[0, 0, 5, 0] + 3 * s[0, 0, 5, 0]) < 4.0  # the MSE fit clips the outlier
