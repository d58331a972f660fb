"""SALS ``index`` mode stores only the r* scoring columns of the latent: same selections and outputs as the layout
that stored all r columns, fewer bytes per token.

Selections, decode outputs and logits are compared bit for bit; the latent itself only to fp32 rounding, since
projecting on r* columns instead of r (then slicing) is a GEMM of another width, which BLAS may sum in another
order (measured on this tiny model: 2.4e-6 at most in some entries; identical at the default model's shapes).

The stored-r layout is rebuilt here by constructing the cache layers without ``score_dims`` (what the cache did
before): the comparison runs both layouts through the same model runtime and records every decode step's chosen
slots and output.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from compactlm.attention import sals as sals_mod
from compactlm.attention import sals_cache
from compactlm.attention.runtime import sparse_attention
from compactlm.attention.sals import SALSConfig
from compactlm.attention.sals_cache import SALSLayer, kv_bytes_per_token
from compactlm.attention.sals_calib import calibrate_sals, projections_for
from compactlm.errors import ConfigError

# Tiny llama: 4 query heads over 2 KV heads (GQA), head dim 16, joint key width 32; rank 0.5 -> r = 16, r* = 8.
BASE = dict(mode="index", rank=0.5, keep=6, sink=2, recent=3, dense_first=0, dense_last=0)


@pytest.fixture
def model():
    from compactlm.models import tiny_model

    m = tiny_model("llama", seed=0).eval()
    calibrate_sals(m, torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(0)))
    return m


class _WideLayer(SALSLayer):
    """The stored-r layout: index mode keeping every latent column (SALSLayer without ``score_dims``)."""

    def __init__(self, *args, score_dims=None, **kwargs):
        super().__init__(*args, **kwargs)


def _tokens(n: int, seed: int) -> torch.Tensor:
    # Distinct tokens: a repeated token scores the same, and a tie at the k-th score may be broken either way.
    return torch.randperm(253, generator=torch.Generator().manual_seed(seed))[:n].add(3).unsqueeze(0)


def _run(model, cfg, monkeypatch, wide: bool, fn):
    """``fn()`` under ``sparse_attention(model, cfg)``, in the narrow (runtime) or stored-r layout, recording each
    decode step's (chosen slots, output) of every sparse layer."""
    steps = []
    decode = sals_mod.sals_decode

    def recording(*args, **kwargs):
        out, idx = decode(*args, **kwargs)
        steps.append((idx.clone(), out.clone(), args[3].shape[-1]))
        return out, idx

    with monkeypatch.context() as mp:
        mp.setattr(sals_mod, "sals_decode", recording)
        if wide:
            mp.setattr(sals_cache, "SALSLayer", _WideLayer)
        with torch.no_grad(), sparse_attention(model, cfg):
            result = fn()
    return result, steps


def _decode(model, prompt, new, chunks=1):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for part in prompt.tensor_split(chunks, dim=1):  # chunked prefill: later chunks attend to the cached keys
        model(part, cache=cache)
    return torch.cat([model(new[:, j:j + 1], cache=cache).logits for j in range(new.shape[1])], 1), cache


def _assert_same(narrow, wide, r_star, r):
    assert len(narrow) == len(wide) > 0
    for step, ((i_n, o_n, w_n), (i_w, o_w, w_w)) in enumerate(zip(narrow, wide, strict=True)):
        assert (w_n, w_w) == (r_star, r), (w_n, w_w)  # the latent each layout handed the decode step
        assert torch.equal(i_n, i_w), f"step {step}: selections differ"
        assert torch.equal(o_n, o_w), f"step {step}: outputs differ by {(o_n - o_w).abs().max()}"


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("extra", [{}, {"score_rope": "averaged"}, {"pool": "mean"}, {"pool": "softmax"},
                                   {"block": 2}])
def test_narrow_index_matches_stored_r_layout(model, monkeypatch, extra, chunks):
    """Bit-identical selections, per-step outputs and logits, GQA, with and without chunked prefill."""
    cfg = SALSConfig(**BASE, **extra)
    tokens = _tokens(100, seed=1)
    prompt, new = tokens[:, :92], tokens[:, 92:]
    (out_n, cache_n), steps_n = _run(model, cfg, monkeypatch, False, lambda: _decode(model, prompt, new, chunks))
    (out_w, cache_w), steps_w = _run(model, cfg, monkeypatch, True, lambda: _decode(model, prompt, new, chunks))
    _assert_same(steps_n, steps_w, 8, 16)
    assert torch.equal(out_n, out_w)
    for layer_n, layer_w in zip(cache_n.layers, cache_w.layers, strict=True):
        # The stored columns are the leading r* columns of the stored-r latent, up to the last fp32 bit: the
        # projection GEMM with N = r* instead of r may sum in another order (the BLAS kernel depends on N).
        torch.testing.assert_close(layer_n.latent_view(), layer_w.latent_view()[..., :8], atol=1e-5, rtol=1e-5)
        assert torch.equal(layer_n.keys_view(), layer_w.keys_view())


def test_narrow_index_matches_stored_r_layout_padded_batch(model, monkeypatch):
    """A left-padded batch through ``generate``: the same chosen slots, scores and tokens in both layouts."""
    cfg = SALSConfig(**BASE)
    a, b = _tokens(60, seed=2), _tokens(48, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :12] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    def gen():
        return model.generate(batch, attention_mask=mask, **kw)

    out_n, steps_n = _run(model, cfg, monkeypatch, False, gen)
    out_w, steps_w = _run(model, cfg, monkeypatch, True, gen)
    _assert_same(steps_n, steps_w, 8, 16)
    assert torch.equal(out_n.sequences, out_w.sequences)
    for s_n, s_w in zip(out_n.scores, out_w.scores, strict=True):
        assert torch.equal(s_n, s_w)


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("ninja") is None,
                    reason="impl='cpu' builds its kernels with g++ and ninja")
@pytest.mark.parametrize("pool", ["max", "mean"])
def test_narrow_index_matches_stored_r_layout_cpu_kernels(model, monkeypatch, pool):
    """``impl="cpu"``: its scoring GEMM reads the contiguous r*-column latent instead of a strided slice."""
    cfg = SALSConfig(**BASE, pool=pool, impl="cpu")
    tokens = _tokens(100, seed=4)
    prompt, new = tokens[:, :92], tokens[:, 92:]
    (out_n, _), steps_n = _run(model, cfg, monkeypatch, False, lambda: _decode(model, prompt, new))
    (out_w, _), steps_w = _run(model, cfg, monkeypatch, True, lambda: _decode(model, prompt, new))
    _assert_same(steps_n, steps_w, 8, 16)
    assert torch.equal(out_n, out_w)


@pytest.mark.parametrize("rank", [0.5, "energy:0.9"])
def test_index_bytes_count_r_star_columns(model, rank):
    """Per token and layer: r* latent columns + full keys + values + an int32 position (fp32 tiny model)."""
    cfg = SALSConfig(**{**BASE, "rank": rank})
    tokens = _tokens(50, seed=5)
    with torch.no_grad(), sparse_attention(model, cfg):
        _, cache = _decode(model, tokens[:, :47], tokens[:, 47:])
    ranks = cfg.layer_ranks(projections_for(model, None), 2)
    expected = 0
    for i, (r, r_star) in ranks.items():
        layer = cache.layers[i]
        assert r_star < r and layer.latent_view().shape == (1, 50, r_star)
        assert layer.proj.shape == (2, 16, r_star)
        per_token = r_star * 4 + 2 * (2 * 16 * 4) + 4
        assert layer.nbytes() == 50 * per_token
        expected += per_token
    assert kv_bytes_per_token(cache) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="index mode"):
        cache.layers[0].rebuild_keys()


def test_compressed_mode_keeps_all_r_columns(model):
    cfg = SALSConfig(**{**BASE, "mode": "compressed"})
    tokens = _tokens(50, seed=6)
    with torch.no_grad(), sparse_attention(model, cfg):
        _, cache = _decode(model, tokens[:, :47], tokens[:, 47:])
    for layer in cache.layers:
        assert layer.latent_view().shape == (1, 50, 16) and layer.keys_view() is None
        assert layer.nbytes() == 50 * (16 * 4 + 2 * 16 * 4 + 4)


@pytest.mark.parametrize("method, width", [("sals-index", 8), ("sals-index-mean-cpu", 8), ("sals-index-wide-cpu", 16),
                                           ("sals", 16)])
def test_bench_index_rows_read_the_runtime_layout(monkeypatch, method, width):
    """``bench decode-attention``: index rows get an r*-column latent (as SALSLayer stores it), ``-wide`` and
    compressed rows the r-column one; all of them the same leading numbers."""
    from compactlm.cli import bench_decode
    from compactlm.kernels import sparse_decode

    seen = {}
    monkeypatch.setattr(sparse_decode, "sals_decode", lambda *a, **k: seen.update(latent=a[3], proj=a[6]))
    c = bench_decode._case(256, torch.float32, 4, 2, 16, 0.5, seed=0)  # r = 16, r* = 8
    bench_decode._method_fn(method, c, 0.25)()
    assert seen["latent"].shape == (1, 256, width) and seen["proj"].shape == (2, 16, width)
    assert seen["latent"].is_contiguous()
    assert torch.equal(seen["latent"][..., :8], c["latent"][..., :8])
