"""Query-strided captured mass: the profiler's cheap mode agrees with brute force on the sampled queries."""

import math

import pytest
import torch

from compactlm.attention.prefill_profile import captured_mass, kept_key_blocks, profile_layers
from compactlm.attention.prefill_sparse import SparsePrefillConfig, select_blocks
from compactlm.errors import ConfigError

SMALL = dict(share_len=32, block_size=16, dense_head=0, impl="reference")


def qk(q_len, kv_len, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, q_len, 16, generator=gen), torch.randn(1, 2, kv_len, 16, generator=gen)


def brute_force_rows(q, k, layout, scale):
    """(H, Tq) captured mass per query head and query, from the full dense softmax."""
    q_len, kv_len = q.shape[2], k.shape[2]
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale
    pos = torch.arange(q_len) + (kv_len - q_len)
    probs = torch.softmax(s.masked_fill(torch.arange(kv_len)[None, :] > pos[:, None], -math.inf), -1)
    keep = kept_key_blocks(layout)[:, :, (torch.arange(q_len) + layout.pad) // layout.block]
    keep = keep[..., torch.arange(kv_len) // layout.block].repeat_interleave(2, 1)
    return (probs * keep).sum(-1)[0]


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_mass_is_the_mean_over_the_sampled_queries(stride):
    q, k = qk(200, 264, seed=11)
    layout = select_blocks(q, k, SparsePrefillConfig(**SMALL, keep_ratio=0.3))
    per_row = brute_force_rows(q, k, layout, 0.25)
    rows = torch.arange(stride // 2, 200, stride)
    got = captured_mass(q, k, layout, 0.25, rows=7, query_stride=stride)  # chunks that split the sample
    assert got == pytest.approx(float(per_row[:, rows].mean()), rel=1e-5)
    # a systematic sample tracks the full mean (mass varies smoothly over positions here)
    assert got == pytest.approx(float(per_row.mean()), abs=0.05)


def test_stride_larger_than_the_prompt_still_scores_one_query():
    q, k = qk(40, 40, seed=2)
    layout = select_blocks(q, k, SparsePrefillConfig(**SMALL, keep_ratio=0.5))
    got = captured_mass(q, k, layout, 0.25, query_stride=1000)
    assert got == pytest.approx(float(brute_force_rows(q, k, layout, 0.25)[:, 39].mean()), rel=1e-5)


def test_query_stride_is_validated(tiny_llama):
    q, k = qk(64, 64, seed=0)
    layout = select_blocks(q, k, SparsePrefillConfig(**SMALL, keep_ratio=0.5))
    with pytest.raises(ConfigError, match="query_stride"):
        captured_mass(q, k, layout, 0.25, query_stride=0)
    batch = [torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(1))]
    with pytest.raises(ConfigError, match="query_stride"):
        profile_layers(tiny_llama, batch, SparsePrefillConfig(**SMALL, keep_ratio=0.5), query_stride=-2)
    strided = profile_layers(tiny_llama, batch, SparsePrefillConfig(**SMALL, keep_ratio=0.1), query_stride=4)
    full = profile_layers(tiny_llama, batch, SparsePrefillConfig(**SMALL, keep_ratio=0.1))
    assert strided.mass == pytest.approx(full.mass, abs=0.05) and strided.mass != full.mass
