"""Barber's second-order swap criterion (criterion="taylor"): the math against plain re-computations, and the
rules every rebuild keeps (exact sparsity, valid N:M, block error never above the initial mask's)."""

import pytest
import torch
import torch.nn.functional as F
from prune_helpers import assert_init_sparsity_kept
from torch import nn

import compactlm
from compactlm.errors import ConfigError
from compactlm.models import tiny_model
from compactlm.prune import Barber, SparseGPT, Wanda, topk_mask
from compactlm.prune.barber import BlockCalls, block_taylor_statistics, rebuild_masks, taylor_scores


def _linear_block(seed=0, out=6, inp=10, seqs=4, t=12):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=False)
    dense = torch.randn(out, inp, generator=g)
    keep = topk_mask(torch.rand(out, inp, generator=g), 0.5)
    with torch.no_grad():
        lin.weight.copy_(dense * keep)
    x = torch.randn(seqs, t, inp, generator=g)
    calls = BlockCalls([((x,), {})], [lin(x).detach()])
    targets = [x[j:j + 1] @ dense.T for j in range(seqs)]
    return lin, dense, keep, x, calls, targets


def _loss(lin, weight, x, dense):
    return float(torch.stack([F.mse_loss(x[j:j + 1] @ weight.T, x[j:j + 1] @ dense.T)
                              for j in range(x.shape[0])]).mean())


def test_gradient_is_exact_and_curvature_is_an_unbiased_gauss_newton_diagonal():
    lin, dense, keep, x, calls, targets = _linear_block()
    grad, curv, seen, mse = block_taylor_statistics(lin, {"w": lin}, calls, targets, probes=400, seed=1)
    assert seen == 4 and mse == pytest.approx(_loss(lin, lin.weight.detach(), x, dense), rel=1e-5)
    # For a linear block, L = mean_s ||(W - W_d) X_s||² / n_s: G = mean_s 2/n_s · (W - W_d) X_sᵀX_s and the exact
    # (Gauss-Newton = full) Hessian diagonal is mean_s 2/n_s · Σ_t x_j², the same for every output row.
    n = x.shape[1] * lin.out_features
    e = lin.weight.detach() - dense
    expect_g = torch.stack([2 / n * e @ (x[j].T @ x[j]) for j in range(4)]).mean(0)
    torch.testing.assert_close(grad["w"], expect_g, rtol=1e-4, atol=1e-6)
    expect_d = torch.stack([2 / n * (x[j] ** 2).sum(0) for j in range(4)]).mean(0).expand_as(e)
    rel = ((curv["w"] - expect_d).abs() / expect_d).mean()
    assert rel < 0.1, f"Hutchinson estimate off by {float(rel):.3f} on average"
    assert lin.weight.requires_grad  # flags restored (nn.Linear weights require grad)


def test_single_swap_scores_predict_the_exact_change_of_a_quadratic_block_loss():
    lin, dense, keep, x, calls, targets = _linear_block(seed=2)
    grad, _, _, base = block_taylor_statistics(lin, {"w": lin}, calls, targets)
    n = x.shape[1] * lin.out_features
    exact_d = torch.stack([2 / n * (x[j] ** 2).sum(0) for j in range(4)]).mean(0).expand_as(dense)
    sparse = lin.weight.detach().clone()
    scores = taylor_scores(keep, sparse, dense, grad["w"], exact_d, drop_gradient=True)
    r = 0
    p = int((~keep[r]).nonzero()[0])
    k = int(keep[r].nonzero()[0])
    revived = sparse.clone()
    revived[r, p] = dense[r, p]
    dropped = sparse.clone()
    dropped[r, k] = 0.0
    # one weight changed: the quadratic model with the exact diagonal is exact
    assert -float(scores[r, p]) == pytest.approx(_loss(lin, revived, x, dense) - base, rel=1e-4, abs=1e-7)
    assert float(scores[r, k]) == pytest.approx(_loss(lin, dropped, x, dense) - base, rel=1e-4, abs=1e-7)


def test_default_drop_cost_is_the_obd_saliency_and_never_negative():
    g = torch.Generator().manual_seed(4)
    keep = topk_mask(torch.rand(4, 12, generator=g), 0.5)
    w, grad, d = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g), torch.rand(4, 12, generator=g)
    s = w * keep * 0.7  # kept weights moved by a reconstruction: the drop cost uses their current value
    scores = taylor_scores(keep, s, w, grad, d)
    torch.testing.assert_close(scores[keep], (0.5 * d * s * s)[keep])
    torch.testing.assert_close(scores[~keep], -(grad * w + 0.5 * d * w * w)[~keep])
    full = taylor_scores(keep, s, w, grad, d, drop_gradient=True)
    torch.testing.assert_close(full[keep], (0.5 * d * s * s - grad * s)[keep])


def test_taylor_swaps_only_pairs_the_model_predicts_to_lower_the_loss():
    g = torch.Generator().manual_seed(3)
    keep = topk_mask(torch.rand(5, 16, generator=g), 0.5)
    w = torch.randn(5, 16, generator=g)
    scores = taylor_scores(keep, w * keep, w, torch.randn(5, 16, generator=g), torch.rand(5, 16, generator=g))
    new, swaps = rebuild_masks({"w": keep}, {"w": scores}, 1.0, "row")
    assert swaps > 0
    for r in range(5):
        grown = (new["w"][r] & ~keep[r]).nonzero().flatten()
        dropped = (keep[r] & ~new["w"][r]).nonzero().flatten()
        # every made pair: predicted ΔL_revive + ΔL_drop = -score_grown + score_dropped < 0
        gains = scores[r][grown].sort(descending=True).values - scores[r][dropped].sort().values
        assert (gains > 0).all()


def test_criterion_and_search_ratios_are_validated_and_round_trip():
    with pytest.raises(ConfigError, match="criterion"):
        Barber(objective="block", init=Wanda(sparsity=0.5), criterion="hessian")
    for bad in ((0.0, 0.1), (0.1, 1.5), "0.1", (True,)):
        with pytest.raises(ConfigError, match="search_ratios"):
            Barber(objective="block", init=Wanda(sparsity=0.5), search_ratios=bad)
    cfg = Barber(objective="block", init=Wanda(pattern="2:4"), criterion="taylor", rebuild_ratio=0.1,
                 search_ratios=[0.01, 0.1])
    assert cfg.search_ratios == (0.01, 0.1)
    assert Barber.from_dict(cfg.to_dict()) == cfg
    assert Barber.from_json(cfg.to_json()) == cfg


def test_search_keeps_the_ratio_with_the_lowest_block_error():
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    ratios = (0.01, 0.1, 0.5, 1.0)
    results = {}
    for r in ratios:  # each ratio alone, guard off: the block errors the search compares
        rep = compactlm.prune(tiny_model("llama"), Barber(objective="block", init=Wanda(sparsity=0.5),
                                                          criterion="taylor", rebuild_ratio=r, guard=False),
                              calib=calib, batch_size=4)
        results[r] = rep.layer_records[0]["attention_block_mse"][1]
    rep = compactlm.prune(tiny_model("llama"), Barber(objective="block", init=Wanda(sparsity=0.5), criterion="taylor",
                                                      search_ratios=ratios, guard=False), calib=calib, batch_size=4)
    first = rep.layer_records[0]
    assert first["ratio"]["attention"] == min(results, key=results.get)
    assert first["attention_block_mse"][1] == pytest.approx(min(results.values()), rel=1e-6)


@pytest.mark.parametrize("init", [Wanda(sparsity=0.5), Wanda(pattern="2:4"), Wanda(pattern="4:8"),
                                  SparseGPT(sparsity=0.5, blocksize=32)],
                         ids=["wanda50", "wanda24", "wanda48", "sparsegpt50"])
def test_taylor_rebuild_keeps_sparsity_patterns_and_never_raises_the_block_error(init):
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(objective="block", init=init, criterion="taylor",
                                           search_ratios=(0.01, 0.1, 0.5)), calib=calib, batch_size=4)
    assert sum(sum(r["swaps"].values()) for r in report.layer_records) > 0
    for r in report.layer_records:
        for label in ("attention", "mlp"):
            before, after = r[f"{label}_block_mse"]
            assert after <= before or (label in r.get("reverted", []) and r["swaps"][label] == 0)
    assert_init_sparsity_kept(model, init)
