"""Fast SALS decode path vs its plain reference, on random inputs over shapes and dtypes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from triton_helpers import run_interpreted

from compactlm.kernels.reference import masked_attention_reference, sals_decode_reference
from compactlm.kernels.sparse_decode import (
    SelectParams,
    dense_grouped_decode,
    rope,
    sals_decode,
    sparse_gather_decode,
    unrope,
)


def _tables(n: int, d: int, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.arange(n).double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _inputs(b, h, hkv, d, length, r, dtype, seed=0, padded=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g, dtype=torch.float64).to(dtype)
    latent = torch.randn(b, length, r, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(b, hkv, length, d, generator=g, dtype=torch.float64).to(dtype)
    proj = torch.linalg.qr(torch.randn(hkv * d, hkv * d, generator=g, dtype=torch.float64))[0][:, :r]
    proj = proj.reshape(hkv, d, r).to(dtype).contiguous()
    positions = torch.arange(length).expand(b, length).to(torch.int32).contiguous()
    valid = None
    if padded:
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[0, :5] = False
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0).to(torch.int32)
    cos_t, sin_t = _tables(length + 1, d, dtype)
    qpos = positions[:, -1].long() + 1
    return q, cos_t[qpos][:, None], sin_t[qpos][:, None], latent, values, positions, proj, cos_t, sin_t, valid


def _err(a, b):
    d = (a.double() - b.double()).abs()
    return f"max {d.max().item():.3g} mean {d.mean().item():.3g}"


@pytest.mark.parametrize("shape", [(1, 4, 2, 16, 97, 8), (2, 8, 2, 32, 300, 16), (1, 6, 3, 64, 257, 48)])
@pytest.mark.parametrize("mode", ["compressed", "index"])
@pytest.mark.parametrize("block", [1, 8])
def test_fast_matches_reference_float64(shape, mode, block):
    b, h, hkv, d, length, r = shape
    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(b, h, hkv, d, length, r, torch.float64)
    keys = None
    if mode == "index":
        keys = torch.randn(b, hkv, length, d, dtype=torch.float64)
    p = SelectParams(k=length // 8, sink=4, recent=8, block=block)
    out, idx = sals_decode(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, keys=keys)
    ref, ridx = sals_decode_reference(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, keys=keys)
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), _err(out, ref)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pool", ["max", "mean", "softmax"])
def test_fast_matches_reference_low_precision(dtype, atol, pool):
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(2, 8, 2, 32, 200, 16, dtype, seed=1, padded=True)
    p = SelectParams(k=25, sink=4, recent=8, pool=pool)
    out, idx = sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 32 ** -0.5, valid=valid)
    # Same selection as the reference when it is given the same chosen set (ties may flip in low precision).
    keep = torch.zeros(2, 2, 200, dtype=torch.bool).scatter_(2, idx, True) & valid[:, None]
    keys = torch.einsum("blr,hdr->bhld", latent.double(), proj.double())
    keys = rope(keys, ct[pos.long()][:, None].double(), st[pos.long()][:, None].double())
    ref = masked_attention_reference(q.double(), keys, values.double(), keep, 32 ** -0.5)
    assert torch.allclose(out.double(), ref, atol=atol), _err(out, ref)
    _, ridx = sals_decode_reference(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 32 ** -0.5, valid=valid)
    same = (torch.zeros_like(keep).scatter_(2, ridx, True) & keep).sum() / keep.sum()
    assert same > 0.95


def test_selection_respects_padding_and_forced_tokens():
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(2, 4, 2, 16, 120, 8, torch.float64, padded=True)
    p = SelectParams(k=10, sink=3, recent=5)
    _, idx = sals_decode(q, qc, qs, latent, values, pos, proj, 4, ct, st, p, 0.25, valid=valid)
    assert idx.shape == (2, 2, 18)
    for b in range(2):
        chosen = set(idx[b, 0].tolist())
        first_real = 5 if b == 0 else 0
        assert set(range(first_real, first_real + 3)) <= chosen  # sinks are the first *real* tokens
        assert set(range(115, 120)) <= chosen
        assert not (chosen & set(range(first_real)))  # no padding chosen while real tokens remain


def test_rope_roundtrip_and_dense_baselines():
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    ct, st = _tables(7, 16, torch.float64)
    assert torch.allclose(unrope(rope(x, ct, st), ct, st), x, atol=1e-12)
    q = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 50, 16, dtype=torch.float64)
    v = torch.randn(1, 2, 50, 16, dtype=torch.float64)
    ref = masked_attention_reference(q, k, v, torch.ones(1, 2, 50, dtype=torch.bool), 0.25)
    dense = dense_grouped_decode(q, k, v, 0.25).transpose(1, 2)
    assert torch.allclose(dense, ref, atol=1e-12)
    idx = torch.arange(50).view(1, 1, 50).expand(1, 2, 50)
    assert torch.allclose(sparse_gather_decode(q, k, v, idx, 0.25), ref, atol=1e-12)


@pytest.mark.parametrize("sinks,recent", [(4, 0), (0, 8), (4, 8)])
def test_exact_keys_fast_matches_reference(sinks, recent):
    from compactlm.kernels.sparse_decode import ExactKeys

    b, h, hkv, d, length, r = 2, 8, 2, 32, 300, 16
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(b, h, hkv, d, length, r, torch.float64, padded=True)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(b, hkv, sinks + recent, d, generator=g, dtype=torch.float64)
    sink_slot = torch.full((b, sinks), -1, dtype=torch.long)
    if sinks:  # row 0 is left-padded by 5 slots: its sink positions sit at slots 5..
        sink_slot[0] = torch.arange(sinks) + 5
        sink_slot[1, : sinks - 1] = torch.arange(sinks - 1)  # one sink missing in row 1
    exact = ExactKeys(keys, sink_slot, recent, length)
    p = SelectParams(k=length // 8, sink=4, recent=8)
    out, idx = sals_decode(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, valid=valid, exact=exact)
    ref, ridx = sals_decode_reference(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, valid=valid,
                                      exact=exact)
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), _err(out, ref)
    plain, _ = sals_decode(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, valid=valid)
    assert not torch.allclose(out, plain)  # the exact keys were used


@pytest.mark.parametrize("mode", ["compressed", "index"])
def test_capacity_slices_match_contiguous_and_are_not_copied(mode):
    """Caches hand out [:, :, :length] slices of buffers with spare capacity: same result, gathered in place."""
    from compactlm.kernels.sparse_decode import _row_view

    b, h, hkv, d, length, r, cap = 2, 8, 2, 32, 150, 16, 256
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(b, h, hkv, d, length, r, torch.float64, padded=True)
    keys = torch.randn(b, hkv, length, d, dtype=torch.float64) if mode == "index" else None
    big_latent = torch.randn(b, cap, r, dtype=torch.float64)
    big_values = torch.randn(b, hkv, cap, d, dtype=torch.float64)
    big_latent[:, :length], big_values[:, :, :length] = latent, values
    lat_view, val_view = big_latent[:, :length], big_values[:, :, :length]
    assert not lat_view.is_contiguous() and not val_view.is_contiguous()
    if keys is not None:
        big_keys = torch.randn(b, hkv, cap, d, dtype=torch.float64)
        big_keys[:, :, :length] = keys
        keys = big_keys[:, :, :length]
    p = SelectParams(k=20, sink=4, recent=8)
    out, idx = sals_decode(q, qc, qs, lat_view, val_view, pos, proj, r // 2, ct, st, p, 0.125, valid=valid, keys=keys)
    ref, ridx = sals_decode_reference(q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125, valid=valid,
                                      keys=None if keys is None else keys.contiguous())
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), _err(out, ref)
    for view in (lat_view, val_view):  # a strided view over the buffer, not a copy of the cache
        assert _row_view(view)[0].data_ptr() == view.data_ptr()


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_weighted_rows_equals_gather_then_matmul(dtype, atol):
    from compactlm.kernels.sparse_decode import gather_heads, weighted_rows

    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.stack([torch.randperm(40, generator=g)[:11] for _ in range(6)]).view(2, 3, 11)
    p = torch.softmax(torch.randn(2, 3, 4, 11, generator=g, dtype=torch.float64), -1)
    p[0, 1, :, :3] = 0.0  # masked slots carry weight 0
    got = weighted_rows(p.to(dtype), values, idx).double()
    ref = torch.matmul(p.to(dtype).double(), gather_heads(values, idx).double())
    assert torch.allclose(got, ref, atol=atol)


TRITON_DECODE_CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_sparse_decode import _inputs
from compactlm.kernels.reference import sals_decode_reference
from compactlm.kernels.sparse_decode import SelectParams, sals_decode
b, h, hkv, d, length, r, mode, padded = json.loads(sys.argv[1])
q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(b, h, hkv, d, length, r, torch.float32, padded=padded)
keys = torch.randn(b, hkv, length, d, generator=torch.Generator().manual_seed(9)) if mode == "index" else None
p = SelectParams(k=length // 4, sink=4, recent=8)
args = (q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, d ** -0.5)
out, idx = sals_decode(*args, valid=valid, keys=keys, impl="triton")
ref, ridx = sals_decode_reference(*args, valid=valid, keys=keys)
print(json.dumps({{"same_idx": bool(torch.equal(idx.sort(-1).values, ridx.sort(-1).values)),
                  "max": (out.double() - ref.double()).abs().max().item()}}))
"""


@pytest.mark.parametrize("shape", [(2, 9, 3, 64, 257, 48, "compressed", True), (1, 8, 2, 32, 700, 16, "index", False)])
def test_triton_decode_interpreter_matches_reference(shape):
    """The fused Triton step (gather, rebuild, RoPE on halves, attention, split merge) against the reference.

    Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported. The shapes cover a
    query group of 3 (padded to 16 rows), a latent rank that is not a power of two, left padding, and several
    splits of the chosen slots.
    """
    res = run_interpreted(TRITON_DECODE_CHECK.format(tests=str(Path(__file__).parent)), shape)
    assert res["same_idx"] and res["max"] < 1e-5, res


def test_decode_impl_choices_are_checked():
    from compactlm.errors import ConfigError
    from compactlm.kernels.sparse_decode import ExactKeys

    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 64, 16, torch.float32)
    p = SelectParams(k=8, sink=2, recent=4)
    args = (q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 0.2)
    with pytest.raises(ConfigError, match="impl="):
        sals_decode(*args, impl="cuda-magic")
    exact = ExactKeys(torch.zeros(1, 2, 4, 32), torch.full((1, 0), -1), 4, 64)
    with pytest.raises(ConfigError, match="exact sink/recent"):
        sals_decode(*args, exact=exact, impl="triton")
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(ConfigError, match="CUDA"):  # CPU tensors, no interpreter: a clear error, no crash
            sals_decode(*args, impl="triton")
    out_auto, _ = sals_decode(*args)  # "auto" on CPU is the tensor path
    out_torch, _ = sals_decode(*args, impl="torch")
    assert torch.equal(out_auto, out_torch)


def test_unknown_pool_is_a_config_error():
    from compactlm.errors import ConfigError

    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 64, 16, torch.float32)
    with pytest.raises(ConfigError, match="head pooling"):
        params = SelectParams(k=8, sink=2, recent=4, pool="median")
        sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, params, 0.2)


def test_triton_wrapper_rejects_what_the_kernel_cannot_run(monkeypatch):
    """Each input the fused kernel cannot take gets a ConfigError naming it (checked before any launch)."""
    from compactlm.errors import ConfigError
    from compactlm.kernels.sparse_decode_triton import sals_attend_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA check, on CPU tensors
    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 64, 16, torch.float32)
    q_g, idx = q.view(1, 2, 2, 32), torch.zeros(1, 2, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match="power-of-two head dim"):
        sals_attend_triton(q_g[..., :24], idx, values[..., :24], 0.2, keys=values[..., :24])
    with pytest.raises(ConfigError, match="needs latent, proj, positions"):
        sals_attend_triton(q_g, idx, values, 0.2, latent=latent)
    odd = ct.clone()
    odd[:, 0] += 1.0  # halves differ: not the rotate_half table layout
    with pytest.raises(ConfigError, match="repeat their halves"):
        sals_attend_triton(q_g, idx, values, 0.2, latent=latent, proj=proj, positions=pos, cos_table=odd,
                           sin_table=st)
    with pytest.raises(ConfigError, match="last dim must be contiguous"):
        sals_attend_triton(q_g, idx, values.transpose(-1, -2).contiguous().transpose(-1, -2), 0.2, keys=values)
