"""Per-layer SALS latent ranks from calibration energy: the rules, the config, the cache and its byte count."""

from __future__ import annotations

import contextlib

import pytest
import torch

from compactlm.attention.runtime import sparse_attention
from compactlm.attention.sals import SALSConfig, config_from_options, sals_method
from compactlm.attention.sals_cache import SALSLayer, kv_bytes_per_token
from compactlm.attention.sals_calib import calibrate_sals, projections_for
from compactlm.attention.sals_ranks import budget_ranks, energy_ranks, threshold_ranks
from compactlm.config import BaseConfig
from compactlm.errors import ConfigError


def _spectra() -> torch.Tensor:
    """Three layers with different spectra over 8 dims, sorted descending."""
    return torch.tensor([[8.0, 1, 0.5, 0.25, 0.125, 0.06, 0.03, 0.035],
                         [1.0, 1, 1, 1, 1, 1, 1, 1],
                         [5.0, 4, 0.5, 0.3, 0.1, 0.05, 0.03, 0.02]]).sort(-1, descending=True).values


def test_threshold_ranks_hand_computed_and_monotone():
    ev = _spectra()
    frac = ev.double() / ev.double().sum(-1, keepdim=True)
    for tau in (0.5, 0.8, 0.9, 0.95, 0.99):
        r = threshold_ranks(ev, tau)
        for layer in range(3):
            k = int(r[layer])
            assert frac[layer, :k].sum() >= tau - 1e-9  # enough energy …
            assert k == 1 or frac[layer, : k - 1].sum() < tau + 1e-9  # … and the smallest such rank
    taus = [0.3, 0.6, 0.9, 0.97, 0.999, 1.0]
    ranks = torch.stack([threshold_ranks(ev, t) for t in taus])
    assert (ranks[1:] >= ranks[:-1]).all()  # never fewer dims for a higher threshold
    assert threshold_ranks(ev, 1.0).tolist() == [8, 8, 8]
    assert threshold_ranks(ev, 0.45).tolist() == [1, 4, 1]
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        threshold_ranks(ev, 0.0)


def test_budget_ranks_caps_total_and_prefers_relative_energy():
    ev = _spectra()
    cap = threshold_ranks(ev, 0.999)
    for total in (3, 6, 10, 14):
        r = budget_ranks(ev, cap, total)
        assert int(r.sum()) == min(total, int(cap.sum())) and (r >= 1).all() and (r <= cap).all()
    # The flat layer (every direction 1/8 of its energy) gets dims before the peaked layers' small tails.
    r = budget_ranks(ev, cap, 10)
    assert r[1] >= r[0] and r[1] >= r[2]
    assert torch.equal(energy_ranks(ev, 0.9, total=100), threshold_ranks(ev, 0.9))  # budget not binding
    with pytest.raises(ConfigError, match="≥ 1 dim"):
        budget_ranks(ev, cap, 2)


@pytest.mark.parametrize("bad,match", [
    (dict(rank="energy:0"), r"\(0, 1\]"), (dict(rank="energy:1.5"), r"\(0, 1\]"), (dict(rank="energy:x"), "energy"),
    (dict(rank="95%"), "energy"), (dict(rank=1.5), "rank"), (dict(rank=0.25, rank_budget=0.5), "rank_budget"),
    (dict(rank="energy:0.9", rank_budget=0), "rank_budget"), (dict(rank="energy:0.9", rank_budget=2.0), "rank_budget"),
])
def test_energy_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        SALSConfig(**bad)


def test_energy_config_roundtrip_and_options():
    cfg = SALSConfig(rank="energy:0.95", rank_budget=0.5)
    assert BaseConfig.from_json(cfg.to_json()) == cfg and cfg.energy == 0.95
    assert config_from_options(SALSConfig, {"rank": "energy:0.99", "rank_budget": "0.5"}) == \
        SALSConfig(rank="energy:0.99", rank_budget=0.5)
    with pytest.raises(ConfigError, match="layer_ranks"):
        cfg.ranks(32)


@pytest.fixture
def model():
    from compactlm.models import tiny_model

    m = tiny_model("llama", seed=0, num_hidden_layers=4).eval()
    calibrate_sals(m, torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(0)))
    return m


def test_layer_ranks_on_a_model(model):
    proj = projections_for(model, None)
    width = proj.width  # 2 KV heads x 16 = 32
    fixed = SALSConfig(rank=0.25, dense_first=1, dense_last=0).layer_ranks(proj, 4)
    assert fixed == {1: (8, 4), 2: (8, 4), 3: (8, 4)}
    full = SALSConfig(rank="energy:1.0", dense_first=0, dense_last=0).layer_ranks(proj, 4)
    assert all(r == (width, width // 2) for r in full.values())
    taus = (0.5, 0.8, 0.9, 0.99)
    per = [SALSConfig(rank=f"energy:{t}", dense_first=0, dense_last=0).layer_ranks(proj, 4) for t in taus]
    for lo, hi in zip(per, per[1:], strict=False):
        assert all(lo[i][0] <= hi[i][0] for i in lo)
    for i, (r, _) in per[2].items():  # each layer keeps ≥ 90 % of its own calibration energy
        assert proj.energy(i, r) >= 0.9 - 1e-6 and (r == 1 or proj.energy(i, r - 1) < 0.9)
    capped = SALSConfig(rank="energy:0.99", rank_budget=4, dense_first=0, dense_last=0).layer_ranks(proj, 4)
    assert sum(r for r, _ in capped.values()) <= 16



def _decode(model, ids, new, cfg):
    """Prefill ``ids`` then decode ``new`` one token at a time (under ``cfg``, or dense when None): logits, cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    scope = sparse_attention(model, cfg) if cfg is not None else contextlib.nullcontext()
    with torch.no_grad(), scope:
        model(ids, cache=cache)
        out = torch.cat([model(new[:, j:j + 1], cache=cache).logits for j in range(new.shape[1])], 1)
    return out, cache

def test_energy_rank_full_is_exact_and_bytes_follow_ranks(model):
    ids, new = torch.randint(3, 256, (1, 40)), torch.randint(3, 256, (1, 3))
    base = dict(score_dims=1.0, keep=1.0, sink=0, recent=1, dense_first=0, dense_last=0)

    def run(cfg):
        return _decode(model, ids, new, cfg)

    ref, _ = _decode(model, ids, new, None)
    out, _ = run(SALSConfig(rank="energy:1.0", **base))
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()

    cfg = SALSConfig(rank="energy:0.8", **base)
    _, cache = run(cfg)
    ranks = cfg.layer_ranks(projections_for(model, None), 4)
    assert len({r for r, _ in ranks.values()}) >= 1
    tokens = ids.shape[1] + 3
    for i, (r, _) in ranks.items():
        layer = cache.layers[i]
        assert isinstance(layer, SALSLayer) and layer.latent_view().shape[-1] == r
        # latent (r, fp32) + values (2 heads x 16, fp32) + int32 position, per token
        assert layer.nbytes() == tokens * (r * 4 + 32 * 4 + 4)
    expected = sum(tokens * (r * 4 + 32 * 4 + 4) for r, _ in ranks.values()) / tokens
    assert kv_bytes_per_token(cache) == pytest.approx(expected)


def test_method_description_lists_layer_ranks(model):
    m = sals_method(model, SALSConfig(rank="energy:0.9", rank_budget=0.25, dense_first=0, dense_last=0))
    assert "rank=energy:0.9 budget=0.25" in m.description and "r per layer" in m.description


def test_exact_sink_and_recent_keys(model):
    """Compressed mode at a tiny rank, every token kept: exact keys for all slots give dense attention back."""
    g = torch.Generator().manual_seed(0)  # fixed inputs: the test must not depend on the RNG state other tests leave
    ids, new = torch.randint(3, 256, (1, 30), generator=g), torch.randint(3, 256, (1, 4), generator=g)

    def run(cfg):
        return _decode(model, ids, new, cfg)

    ref, _ = _decode(model, ids, new, None)
    base = dict(rank=2, score_dims=1.0, keep=1.0, sink=0, recent=1, dense_first=0, dense_last=0)
    lossy, plain_cache = run(SALSConfig(**base))
    assert not torch.allclose(lossy, ref, atol=1e-3)
    for exact in (dict(exact_sink=64), dict(exact_recent=64), dict(exact_sink=10, exact_recent=30)):
        out, cache = run(SALSConfig(**base, **exact))
        assert torch.allclose(out, ref, atol=1e-4), (exact, (out - ref).abs().max())
    part, cache = run(SALSConfig(**base, exact_sink=4, exact_recent=8))
    assert (part - ref).abs().mean() < (lossy - ref).abs().mean()  # 12 of 30 slots exact: less error overall
    layer, plain = cache.layers[1], plain_cache.layers[1]
    assert layer.nbytes() - plain.nbytes() == 2 * 16 * 12 * 4 + 4 * 8  # (S + R) exact keys + S int64 slots
    with pytest.raises(ConfigError, match="compressed"):
        SALSConfig(mode="index", exact_sink=4)
    with pytest.raises(ConfigError, match="exact_recent"):
        SALSConfig(exact_recent=-1)
