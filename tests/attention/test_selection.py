"""Selection invariants: budgets, forced tokens, blocks, Quest bounds, StreamingLLM."""

from __future__ import annotations

import pytest
import torch

from compactlm.attention.selection import (
    block_scores,
    page_minmax,
    quest_bounds,
    streaming_tokens,
    topk_blocks,
    topk_tokens,
)
from compactlm.errors import ConfigError


def test_topk_tokens_takes_best_plus_forced():
    s = torch.randn(2, 3, 100)
    idx = topk_tokens(s, 10, sink=4, recent=6)
    assert idx.shape == (2, 3, 20)
    for b in range(2):
        for h in range(3):
            chosen = set(idx[b, h].tolist())
            assert set(range(4)) | set(range(94, 100)) <= chosen
            middle = s[b, h, 4:94]
            best = set((middle.topk(10).indices + 4).tolist())
            assert best <= chosen


def test_oracle_topk_captures_most_mass():
    s = torch.randn(1, 1, 500) * 3
    idx = topk_tokens(s, 50)
    p = torch.softmax(s, -1)
    other = torch.randperm(500)[:50]
    assert p[0, 0, idx[0, 0]].sum() >= p[0, 0, other].sum()


@pytest.mark.parametrize("reduce", ["max", "mean", "logsumexp"])
def test_blocks_are_whole_and_ranked(reduce):
    s = torch.randn(1, 2, 64)
    s[0, 0, 40:48] += 10  # block 5 is the best of head 0
    tokens, ok = topk_blocks(s, 8, 8, reduce)
    assert ok is None and tokens.shape == (1, 2, 8)
    assert tokens[0, 0].tolist() == list(range(40, 48))
    bs = block_scores(s, 8, reduce)
    assert bs.shape == (1, 2, 8)


def test_partial_last_block_is_masked():
    s = torch.randn(1, 1, 21)
    tokens, ok = topk_blocks(s, 8, 8, recent=1)
    assert ok is not None and int(ok.sum()) == len(set(tokens[ok].tolist()))
    assert 20 in tokens[ok].tolist()
    with pytest.raises(ConfigError, match="block_reduce"):
        block_scores(s, 4, "median")


def test_quest_bound_is_an_upper_bound():
    keys = torch.randn(1, 2, 40, 16)
    q = torch.randn(1, 2, 3, 16)
    lo, hi = page_minmax(keys, 8)
    bound = quest_bounds(q, lo, hi)  # (1, 2, 3, 5)
    true = torch.einsum("bhgd,bhld->bhgl", q, keys).view(1, 2, 3, 5, 8).amax(-1)
    assert (bound >= true - 1e-5).all()
    elementwise = torch.maximum(q[:, :, :, None] * lo[:, :, None], q[:, :, :, None] * hi[:, :, None]).sum(-1)
    assert torch.allclose(bound, elementwise, atol=1e-5)  # the GEMM form is Quest's formula, not a looser bound


def test_streaming_tokens_and_padding():
    idx = streaming_tokens(100, 4, 10, 1, 2)
    assert sorted(idx[0, 0].tolist()) == list(range(4)) + list(range(90, 100))
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :6] = False
    pos = valid.long().cumsum(-1) - 1
    idx = streaming_tokens(30, 2, 5, 1, 1, pos, valid)
    assert sorted(idx[0, 0].tolist()) == [6, 7, 25, 26, 27, 28, 29]


def test_sortable_keys_order_like_floats_and_topk_is_exact():
    from compactlm.attention.selection import sortable_keys

    special = torch.tensor([float("-inf"), -3.5, -1e-30, 0.0, 1e-30, 2.0, float("inf")])
    assert torch.equal(torch.argsort(sortable_keys(special)), torch.arange(7))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 500, generator=g).to(dtype)
        k, xf = sortable_keys(x), x.float()
        a, b = torch.randint(0, 500, (2, 5000), generator=g)
        assert torch.equal(k[:, a] > k[:, b], xf[:, a] > xf[:, b])  # same pairwise order
        assert torch.equal(k[:, a] == k[:, b], xf[:, a] == xf[:, b])  # ties kept
        got = x.gather(1, topk_tokens(x[:, None], 37)[:, 0]).float().sort(-1).values
        assert torch.equal(got, x.float().topk(37, dim=-1).values.sort(-1).values)
