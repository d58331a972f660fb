"""Mask utilities, config validation and round-trips for the pruning configs."""

import pytest
import torch

from compactlm.config import BaseConfig
from compactlm.errors import ConfigError
from compactlm.prune import Barber, Magnitude, SparseGPT, Wanda, is_nm, nm_mask, topk_mask
from compactlm.prune.barber import rebuild_masks
from compactlm.prune.common import n_pruned, parse_pattern


@pytest.mark.parametrize("shape", [(8, 64), (5, 37)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_topk_mask_is_exact_per_row_and_per_layer(shape, sparsity):
    scores = torch.randn(shape)
    keep = topk_mask(scores, sparsity, "row")
    assert ((~keep).sum(1) == n_pruned(shape[1], sparsity)).all()
    keep = topk_mask(scores, sparsity, "layer")
    assert int((~keep).sum()) == n_pruned(scores.numel(), sparsity)
    if 0 < sparsity:  # the pruned weights are the lowest-scoring ones
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    scores = torch.randn(6, 32)
    keep = nm_mask(scores, n, m)
    assert is_nm(keep, n, m)
    groups = scores.view(6, -1, m)
    kept = keep.view(6, -1, m)
    assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, float("-inf")).amax(-1)).all()


def test_nm_mask_rejects_widths_not_multiple_of_m():
    with pytest.raises(ConfigError, match="multiple of 4"):
        nm_mask(torch.randn(2, 6), 2, 4)


@pytest.mark.parametrize("config", [
    Magnitude(sparsity=0.3), Wanda(pattern="2:4", ignore=("mlp",)),
    SparseGPT(sparsity=0.6, scope="layer", blocksize=64),
    Barber(init=Wanda(pattern="4:8"), rebuild_ratio=0.02, group="block", objective="block"),
    Barber(init=SparseGPT(sparsity=0.5)),  # the default objective ("lm") and its resolved step ladder
    Wanda(targets=("self_attn",)),
])
def test_configs_round_trip_through_json(config):
    again = BaseConfig.from_json(config.to_json())
    assert again == config and type(again) is type(config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.5), "sparsity must be a fraction"),
    (dict(sparsity=-0.1), "sparsity must be a fraction"),
    (dict(pattern="5:4"), "0 < N < M"),
    (dict(pattern="2-4"), "N:M"),
    (dict(sparsity=0.5, pattern="2:4"), "not both"),
    (dict(scope="column"), "scope"),
    (dict(ignore="mlp"), "tuple of regexes"),
    (dict(targets=("(",)), "not a valid regex"),
])
def test_bad_prune_configs_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Wanda(**kwargs)


def test_bad_method_specific_fields():
    with pytest.raises(ConfigError, match="blocksize"):
        SparseGPT(pattern="4:8", blocksize=12)
    with pytest.raises(ConfigError, match="dampening"):
        SparseGPT(dampening=0)
    with pytest.raises(ConfigError, match="rebuild_ratio"):
        Barber(rebuild_ratio=0.0)
    with pytest.raises(ConfigError, match="group"):
        Barber(group="column")
    with pytest.raises(ConfigError, match="init"):
        Barber(init=Barber())


def test_defaults_and_pattern_sparsity():
    assert Wanda().sparsity == 0.5 and Wanda().target_sparsity == 0.5
    assert Wanda(pattern="4:8").target_sparsity == 0.5 and parse_pattern("2:4") == (2, 4)
    assert Barber(init=Wanda(pattern="2:4")).nm == (2, 4)


@pytest.mark.parametrize("group", ["row", "layer", "block"])
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_rebuild_masks_never_changes_sparsity_and_improves_the_score(group, nm):
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(16, 64, generator=g) for n in ("a", "b")}
    keeps = {n: (nm_mask(torch.rand(16, 64, generator=g), *nm) if nm else
                 topk_mask(torch.rand(16, 64, generator=g), 0.5)) for n in scores}
    new, swaps = rebuild_masks(keeps, scores, 0.5, group, nm)
    assert swaps > 0
    if group == "block":
        assert sum(int(new[n].sum()) for n in new) == sum(int(keeps[n].sum()) for n in keeps)
    for n in new:
        if nm:
            assert is_nm(new[n], *nm)
        elif group == "row":
            assert (new[n].sum(1) == keeps[n].sum(1)).all()
        elif group == "layer":
            assert int(new[n].sum()) == int(keeps[n].sum())
    kept_score = sum(float(scores[n][new[n]].sum()) for n in new)
    assert kept_score > sum(float(scores[n][keeps[n]].sum()) for n in keeps)
    assert sum(int((new[n] != keeps[n]).sum()) for n in new) == 2 * swaps
