"""Position-averaged RoPE scoring for SALS: the closed form against brute force, and the decode path."""

from __future__ import annotations

import pytest
import torch

from compactlm.attention.runtime import sparse_attention
from compactlm.attention.sals import SALSConfig
from compactlm.attention.sals_calib import calibrate_sals
from compactlm.attention.sals_scoring import averaged_query_rope, mean_rotation, rope_frequencies
from compactlm.errors import ConfigError
from compactlm.kernels.sparse_decode import rope, unrope


def _tables(d: int = 16, base: float = 100.0, scale: float = 1.0, n: int = 300):
    inv = 1.0 / (base ** (torch.arange(0, d, 2).double() / d))
    ang = torch.arange(n).double()[:, None] * torch.cat([inv, inv])[None]
    return scale * ang.cos(), scale * ang.sin(), torch.cat([inv, inv])


def test_mean_rotation_matches_brute_force():
    theta = torch.tensor([0.0, 1e-4, 0.01, 0.3, 1.0, 3.0], dtype=torch.float64)
    for lo, hi in ((0, 0), (5, 140), (64, 4095)):
        rho, phi = mean_rotation(theta, lo, hi)
        d = torch.arange(lo, hi + 1, dtype=torch.float64)[:, None]
        ref = torch.polar(torch.ones_like(d * theta), d * theta).mean(0)
        assert torch.allclose(torch.polar(rho, phi), ref, atol=1e-10)
    rho, _ = mean_rotation(theta, 64, 4095)
    assert rho[0] == pytest.approx(1.0) and rho[-1] < 0.01  # slow pairs kept, fast pairs fade


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_averaged_query_gives_the_mean_logit_over_distances(scale):
    cos, sin, inv = _tables(scale=scale)
    theta, s = rope_frequencies(cos, sin)
    assert torch.allclose(theta, inv) and torch.allclose(s, torch.full_like(s, scale))
    gen = torch.Generator().manual_seed(0)
    q_pre, k_pre = torch.randn(16, dtype=torch.float64, generator=gen), torch.randn(16, dtype=torch.float64,
                                                                                   generator=gen)
    pq, lo, hi = 250, 8, 200
    q_post = rope(q_pre, cos[pq], sin[pq])
    # The logit the model computes for a key at distance Δ (both sides scaled by s), averaged over Δ in [lo, hi],
    # over s² (unrope divides the scale out of the query, as the RoPE-free score does: a constant per step).
    exact = torch.stack([(q_post * rope(k_pre, cos[pq - d], sin[pq - d])).sum()
                         for d in range(lo, hi + 1)]).mean() / scale**2
    c2, s2 = averaged_query_rope(cos[pq][None, None], sin[pq][None, None], theta, lo, hi, min_rho=0.0)
    got = (unrope(q_post, c2[0, 0], s2[0, 0]) * k_pre).sum()
    assert got.item() == pytest.approx(exact.item(), rel=1e-9, abs=1e-9)
    # The RoPE-free score (the paper's) is a different number here: the test can tell them apart.
    free = (unrope(q_post, cos[pq], sin[pq]) * k_pre).sum()
    assert abs(free.item() - exact.item()) > 1e-3
    c3, s3 = averaged_query_rope(cos[pq][None, None], sin[pq][None, None], theta, 5, 4)  # empty range
    assert torch.equal(c3, cos[pq][None, None]) and torch.equal(s3, sin[pq][None, None])


def test_score_rope_config_and_decode():
    from transformers import DynamicCache

    from compactlm.models import tiny_model

    with pytest.raises(ConfigError, match="score_rope"):
        SALSConfig(score_rope="x")
    m = tiny_model("llama", seed=0).eval()
    calibrate_sals(m, torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(0)))
    ids, new = torch.randint(3, 256, (1, 90)), torch.randint(3, 256, (1, 4))

    def run(cfg):
        cache = DynamicCache(config=m.config)
        with torch.no_grad(), sparse_attention(m, cfg):
            m(ids, cache=cache)
            return torch.cat([m(new[:, j:j + 1], cache=cache).logits for j in range(4)], 1)

    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(ids, cache=cache)
        ref = torch.cat([m(new[:, j:j + 1], cache=cache).logits for j in range(4)], 1)
    base = dict(rank=1.0, score_dims=1.0, sink=0, recent=1, dense_first=0, dense_last=0, mode="index")
    # Keeping everything, the score cannot matter: exact.
    assert torch.allclose(run(SALSConfig(keep=1.0, score_rope="averaged", **base)), ref, atol=1e-4)
    sparse = dict(base, keep=8, recent=4)
    free, avg = run(SALSConfig(**sparse)), run(SALSConfig(score_rope="averaged", **sparse))
    assert torch.isfinite(avg).all() and not torch.allclose(free, avg)  # another selection, same machinery


def test_avg_presets_build():
    from compactlm.attention.sals import PRESETS, SALSConfig, config_from_options

    cfg = config_from_options(SALSConfig, dict(PRESETS["sals-avg"]))
    assert (cfg.rank, cfg.score_rope, cfg.exact_sink, cfg.exact_recent, cfg.mode) == (0.25, "averaged", 16, 64,
                                                                                      "compressed")
    assert config_from_options(SALSConfig, dict(PRESETS["sals-index-avg"])).mode == "index"
    tuned = config_from_options(SALSConfig, dict(PRESETS["sals-tuned"]))
    assert (tuned.rank, tuned.rank_budget, tuned.score_dims, tuned.pool, tuned.exact_sink, tuned.exact_recent,
            tuned.score_rope) == ("energy:0.999", 0.5, 1.0, "softmax", 16, 128, "averaged")
