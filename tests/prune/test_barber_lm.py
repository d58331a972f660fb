"""Barber's end-to-end objective (objective="lm"): exact sparsity and N:M after the rebuild, the initial mask when
no step is taken, the held-out loss never rises, and the Taylor model predicts single swaps."""

import pytest
import torch
from prune_helpers import assert_init_sparsity_kept

import compactlm
from compactlm.errors import ConfigError, DataError
from compactlm.models import get_adapter, tiny_model
from compactlm.prune import Barber, SparseGPT, Wanda
from compactlm.prune.barber import taylor_scores
from compactlm.prune.barber_lm import pair_gains
from compactlm.prune.lm_statistics import lm_loss, lm_statistics


def _calib(n=12, t=32, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _weights(model):
    a = get_adapter(model)
    return {f"{a.layer_prefix(i)}.{n}": m.weight.detach().clone() for i in range(a.num_layers)
            for n, m in a.linears(i).items()}


def _lm_round(report):
    return report.layer_records[-1]["lm_rounds"]


@pytest.mark.parametrize("init", [Wanda(sparsity=0.5), Wanda(pattern="2:4"), Wanda(pattern="4:8"),
                                  SparseGPT(sparsity=0.5, blocksize=32)],
                         ids=["wanda50", "wanda24", "wanda48", "sparsegpt50"])
def test_lm_rebuild_keeps_exact_sparsity_and_nm_and_never_raises_the_heldout_loss(init):
    calib = _calib()
    model = tiny_model("llama")
    cfg = Barber(init=init, objective="lm", heldout=4, search_ratios=(0.01, 0.1, 0.5, 1.0), rounds=2)
    report = compactlm.prune(model, cfg, calib=calib, batch_size=4)
    rounds = _lm_round(report)
    assert rounds and rounds[0]["profitable_pairs"] > 0
    for r in rounds:  # ratio 0 is a candidate, so the chosen step never raises the held-out loss
        losses = {float(k): v for k, v in r["heldout_loss"].items()}
        assert losses[r["ratio"]] == min(losses.values()) <= losses[0.0]
    # the last round's chosen loss is the final model's loss on the held-out sequences
    assert lm_loss(model, calib[-4:]) == pytest.approx(rounds[-1]["heldout_loss"][str(rounds[-1]["ratio"])],
                                                       rel=1e-5)
    assert_init_sparsity_kept(model, init)


def test_lm_rebuild_lowers_the_heldout_loss_of_a_tiny_model_and_revives_dense_values():
    calib = _calib(n=16)
    dense = _weights(tiny_model("llama"))
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(init=Wanda(sparsity=0.5), objective="lm", heldout=4,
                                           search_ratios=(0.03, 0.1, 0.3)), calib=calib, batch_size=4)
    first = _lm_round(report)[0]
    assert first["swaps"] > 0 and first["heldout_loss"][str(first["ratio"])] < first["heldout_loss"]["0.0"]
    assert sum(sum(r["swaps"].values()) for r in report.layer_records) == first["swaps"]
    # Wanda leaves kept weights dense, so every nonzero weight is its dense value (revived ones too)
    for n, w in _weights(model).items():
        assert torch.equal(w[w != 0], dense[n][w != 0]), n


def test_no_step_keeps_the_initial_mask_exactly():
    calib = _calib()
    init = Wanda(sparsity=0.5)
    ref = tiny_model("llama")
    compactlm.prune(ref, init, calib=calib[:-4], batch_size=4)
    model = tiny_model("llama")
    # rebuild_ratio so small that floor(ratio · #profitable) = 0: the step is ratio 0, the init's mask
    report = compactlm.prune(model, Barber(init=init, objective="lm", heldout=4, rebuild_ratio=1e-9, search_ratios=()),
                             calib=calib, batch_size=4)
    assert _lm_round(report)[0]["swaps"] == 0
    for n, w in _weights(model).items():
        assert torch.equal(w, _weights(ref)[n]), n


def test_taylor_model_of_the_lm_loss_predicts_single_revives():
    calib = _calib(n=8)
    model = tiny_model("llama")
    compactlm.prune(model, Wanda(sparsity=0.5), calib=calib, batch_size=4)
    dense = _weights(tiny_model("llama"))
    name = "model.layers.1.mlp.down_proj"
    lin = dict(model.named_modules())[name]
    grad, curv, base, _ = lm_statistics(model, {name: lin.weight}, calib, seed=0)
    assert base == pytest.approx(lm_loss(model, calib), rel=1e-5)
    keep = lin.weight != 0
    score = taylor_scores(keep, lin.weight.detach(), dense[name], grad[name], curv[name])
    pruned = (~keep).flatten().nonzero().flatten()
    order = pruned[score.flatten()[pruned].argsort()]  # by predicted ΔL of the revive, largest rise first
    mid = len(order) // 2
    picks = torch.cat([order[:8], order[-8:], order[mid - 4: mid + 4]])
    pred, actual = [], []
    for flat in picks.tolist():
        r, c = divmod(flat, keep.shape[1])
        with torch.no_grad():
            lin.weight[r, c] = dense[name][r, c]
            actual.append(lm_loss(model, calib) - base)
            lin.weight[r, c] = 0.0
        pred.append(-float(score[r, c]))
    pred, actual = torch.tensor(pred), torch.tensor(actual)
    corr = torch.corrcoef(torch.stack([pred, actual]))[0, 1]
    assert corr > 0.9, f"predicted {pred.tolist()} vs measured {actual.tolist()}"
    # the largest predicted rises and drops: right sign, and within 10 % (measured: 1-2 % on this model)
    assert torch.equal(pred[:16].sign(), actual[:16].sign())
    assert ((pred[:16] - actual[:16]).abs() <= 0.1 * actual[:16].abs()).all(), (pred.tolist(), actual.tolist())


def test_pair_gains_pair_best_revives_with_cheapest_drops_and_keep_groups():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(4, 16, generator=g) > 0.5
    keep[:, :2] = True  # every row has something kept and something pruned
    keep[:, 2:4] = False
    score = torch.randn(4, 16, generator=g)
    c = pair_gains(keep, score, "row", None)
    assert (c.gain > 0).all() and torch.equal(c.grow[0], c.drop[0])  # swaps stay in their row
    assert (~keep[c.grow]).all() and keep[c.drop].all()
    torch.testing.assert_close(c.gain, score[c.grow] - score[c.drop])
    nm = torch.zeros(4, 16, dtype=torch.bool)
    nm.view(4, 4, 4)[:, :, :2] = True
    c = pair_gains(nm, score, "row", (2, 4))
    assert torch.equal(c.grow[1] // 4, c.drop[1] // 4)  # N:M: inside one group of M


def test_lm_objective_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match="objective"):
        Barber(objective="model")
    with pytest.raises(ConfigError, match="heldout"):
        Barber(objective="lm", heldout=0)
    with pytest.raises(ConfigError, match="rounds"):
        Barber(objective="lm", rounds=True)
    with pytest.raises(ConfigError, match="margin"):
        Barber(objective="lm", margin=-1.0)
    with pytest.raises(ConfigError, match="group"):
        Barber(objective="lm", group="block")
    cfg = Barber(init=Wanda(pattern="2:4"), objective="lm", heldout=4, rounds=2, margin=3, search_ratios=(0.01, 0.1))
    assert Barber.from_json(cfg.to_json()) == cfg
    with pytest.raises(DataError, match="heldout"):
        compactlm.prune(tiny_model("llama"), Barber(objective="lm", heldout=8), calib=_calib(n=8))


def test_noise_is_the_standard_error_of_the_mean_gradient_and_the_margin_is_pessimistic():
    calib = _calib(n=6)
    model = tiny_model("llama")
    compactlm.prune(model, Wanda(sparsity=0.5), calib=calib, batch_size=4)
    name = "model.layers.0.self_attn.v_proj"
    lin = dict(model.named_modules())[name]
    grad, _, _, noise = lm_statistics(model, {name: lin.weight}, calib, with_noise=True)
    per_seq = []
    for j in range(6):
        g, _, _, none = lm_statistics(model, {name: lin.weight}, calib[j:j + 1])
        per_seq.append(g[name])
        assert none is None
    per_seq = torch.stack(per_seq)
    torch.testing.assert_close(grad[name], per_seq.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(noise[name], per_seq.std(0) / 6 ** 0.5, rtol=1e-3, atol=1e-7)
    # a margin only ever removes candidates: fewer profitable pairs, each with a smaller gain
    from compactlm.prune.barber_lm import LMRebuild

    dense = {name: dict(tiny_model("llama").named_modules())[name].weight.detach()}
    keep = {name: lin.weight != 0}
    _, curv, _, _ = lm_statistics(model, {name: lin.weight}, calib)
    plain = LMRebuild({name: lin}, dense, keep).score(grad, curv, "row", None, 1.0)
    careful = LMRebuild({name: lin}, dense, keep).score(grad, curv, "row", None, 1.0, noise, 2.0)
    assert 0 < careful < plain


def test_lm_is_the_default_with_its_step_ladder_and_block_keeps_its_own():
    from compactlm.prune.barber import LM_SEARCH_RATIOS

    cfg = Barber(init=Wanda(sparsity=0.5))
    assert cfg.objective == "lm" and cfg.search_ratios == LM_SEARCH_RATIOS == (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert (cfg.rounds, cfg.margin, cfg.heldout) == (1, 2.0, 8)
    # the block objective a user sets is what it was: the single rebuild_ratio, no search
    block = Barber(init=Wanda(sparsity=0.5), objective="block")
    assert block.search_ratios == () and block.rebuild_ratio == 0.01
    # an explicit () or ladder is kept with either objective; the resolved default round-trips as data
    assert Barber(search_ratios=()).search_ratios == ()
    assert Barber(objective="block", search_ratios=(0.1,)).search_ratios == (0.1,)
    for c in (cfg, block):
        assert Barber.from_json(c.to_json()) == c and Barber.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="objective='block'"):  # group='block' names the fix
        Barber(group="block")
    assert Barber(group="block", objective="block").group == "block"


def test_memory_estimate_counts_the_pruned_weights_two_sums_and_the_backward():
    from compactlm.prune.barber_lm import lm_memory_estimate

    model = tiny_model("llama")
    a = get_adapter(model)
    total = sum(m.weight.numel() for i in range(a.num_layers) for m in a.linears(i).values())
    c = model.config
    est = lm_memory_estimate(model, Barber(init=Wanda(sparsity=0.5)), seqlen=32)
    assert est["pruned_weights"] == total
    # fp32: dense copy 4 + mask 1 + two fp32 sums at a time (G and SE-sums, then G and D) 8 bytes per weight, with or
    # without the margin; logits 4 × 32 × V × 4; layers 2 × 32 × (8·64 + 3.5·128) × 4
    layers = c.num_hidden_layers * 32 * (8 * c.hidden_size + 3.5 * c.intermediate_size) * 4
    assert est["weights_bytes"] == 13 * total and est["activation_bytes"] == 16 * 32 * c.vocab_size + layers
    assert est["total_bytes"] == est["weights_bytes"] + est["activation_bytes"]
    no_margin = lm_memory_estimate(model, Barber(init=Wanda(sparsity=0.5), margin=0.0), seqlen=32)
    assert no_margin == est
    mlp_only = lm_memory_estimate(model, Barber(init=Wanda(sparsity=0.5, targets=("mlp",))), seqlen=32)
    assert 0 < mlp_only["pruned_weights"] < total
    filtered = lm_memory_estimate(model, Barber(init=Wanda(sparsity=0.5)), seqlen=32,
                                  filter_fn=lambda name, _m: "layers.0." in name)
    assert 0 < filtered["pruned_weights"] < total


def test_memory_estimate_layer_term_matches_what_autograd_saves():
    """The per-layer activation term against the bytes autograd really saves (unique storages, weights excluded)
    for one sequence's forward of the gradient pass, at two lengths: within 10 %."""
    import torch.nn.functional as F

    from compactlm.prune.barber_lm import lm_memory_estimate
    from compactlm.prune.lm_statistics import streamed_gradients

    model = tiny_model("llama")
    a = get_adapter(model)
    weights = {f"{a.layer_prefix(i)}.{n}": m.weight for i in range(a.num_layers) for n, m in a.linears(i).items()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for t in (64, 256):
        seen = {}

        def pack(x, seen=seen):
            if x.untyped_storage().data_ptr() not in params:
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        ids = _calib(n=1, t=t)
        with streamed_gradients(model, weights, lambda n, g: None), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            F.cross_entropy(logits, ids[0, 1:])
        saved_layers = sum(seen.values()) - (t - 1) * model.config.vocab_size * 4  # minus the log-softmax
        est = lm_memory_estimate(model, Barber(init=Wanda(sparsity=0.5)), seqlen=t)
        layers = est["activation_bytes"] - 16 * t * model.config.vocab_size
        assert abs(layers - saved_layers) <= 0.1 * saved_layers, (t, layers, saved_layers)


def test_lm_objective_refuses_to_start_when_the_estimate_exceeds_free_memory(monkeypatch):
    from compactlm.prune import barber_lm

    est = {"pruned_weights": 10**8, "weights_bytes": 21 * 10**8, "activation_bytes": 4 * 10**8,
           "total_bytes": 25 * 10**8}
    with pytest.raises(ConfigError, match=r"about 2\.3 GiB.*only 1\.0 GiB is free: pass objective='block'"):
        barber_lm.check_lm_memory(est, torch.device("cpu"), free=2**30)
    barber_lm.check_lm_memory(est, torch.device("cpu"), free=3 * 2**30)  # fits: nothing raised
    # end to end: refused before anything is pruned (no silent fallback to the block objective)
    monkeypatch.setattr(barber_lm, "free_memory_bytes", lambda device: 1024)
    model, untouched = tiny_model("llama"), _weights(tiny_model("llama"))
    with pytest.raises(ConfigError, match="objective='block'"):
        compactlm.prune(model, Barber(init=Wanda(sparsity=0.5), heldout=4), calib=_calib(), batch_size=4)
    for n, w in _weights(model).items():
        assert torch.equal(w, untouched[n]), n
    # the block objective does not hold these copies and is not checked
    compactlm.prune(model, Barber(init=Wanda(sparsity=0.5), objective="block"), calib=_calib(), batch_size=4)


def test_the_report_carries_the_memory_estimate_and_the_host_free_memory_is_read():
    from compactlm.prune.barber_lm import free_memory_bytes

    free = free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(init=Wanda(sparsity=0.5), heldout=4), calib=_calib(), batch_size=4)
    est = report.layer_records[-1]["memory_estimate"]
    assert est["pruned_weights"] == sum(
        m.weight.numel() for i in range(get_adapter(model).num_layers) for m in get_adapter(model).linears(i).values())


# --- memory layout (issue 4): the streamed accumulation and the in-place margin give the old results bit for bit ---
def _all_at_once_statistics(model, weights, seqs, seed=0, with_noise=False):
    """The reference: lm_statistics as it was before the per-weight hooks (every gradient returned at once by
    ``torch.autograd.grad``, another full copy of the weights' size, twice per sequence)."""
    import torch.nn.functional as F

    params = list(weights.values())
    saved = {p: p.requires_grad for p in model.parameters()}
    grad = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    curv = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    sq = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()} if with_noise else {}
    gen, total = torch.Generator().manual_seed(seed), 0.0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for seq in seqs:
            ids = seq.unsqueeze(0)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                loss = F.cross_entropy(logits, ids[0, 1:])
                for n, g in zip(weights, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True),
                                strict=True):
                    if g is not None:
                        grad[n] += g.float()
                        if with_noise:
                            sq[n] += g.float().pow_(2)
                with torch.no_grad():
                    sampled = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
                nll = F.cross_entropy(logits, sampled, reduction="sum")
                for n, h in zip(weights, torch.autograd.grad(nll, params, allow_unused=True), strict=True):
                    if h is not None:
                        curv[n] += h.float().pow_(2).div_(logits.shape[0])
            total += float(loss.detach())
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    k = len(seqs)
    grad = {n: g.div_(k) for n, g in grad.items()}
    noise = {n: v.div_(k).sub_(grad[n] ** 2).clamp_(min=0).div_(k - 1).sqrt_() for n, v in sq.items()} \
        if with_noise else None
    return grad, {n: d.div_(k) for n, d in curv.items()}, total / k, noise


class _ShiftedCopyRebuild:
    """The reference margin: a shifted copy of G for every linear, made before scoring (the old layout)."""

    @staticmethod
    def score(rebuild, grad, curv, group, nm, max_ratio, noise=None, z=0.0):
        if noise is not None and z:
            grad = {n: grad[n] + z * noise[n] * rebuild.dense[n].sign() for n in rebuild.modules}
        from compactlm.prune.barber_lm import LMRebuild

        return _UNPATCHED_SCORE.get("score", LMRebuild.score)(rebuild, grad, curv, group, nm, max_ratio)


_UNPATCHED_SCORE: dict = {}  # LMRebuild.score before a test monkeypatches it


def _pruned_tiny(calib):
    model = tiny_model("llama")
    compactlm.prune(model, Wanda(sparsity=0.5), calib=calib, batch_size=4)
    a = get_adapter(model)
    modules = {f"{a.layer_prefix(i)}.{n}": m for i in range(a.num_layers) for n, m in a.linears(i).items()}
    return model, modules


def test_streamed_statistics_equal_the_all_at_once_gradients_bit_for_bit():
    calib = _calib(n=5)
    model, modules = _pruned_tiny(calib)
    weights = {n: m.weight for n, m in modules.items()}
    marker = torch.full_like(weights[next(iter(weights))], 7.0)
    first = next(iter(weights.values()))
    first.grad = marker  # a gradient the caller had: neither summed into G nor lost
    ref = _all_at_once_statistics(model, weights, calib, seed=3, with_noise=True)
    new = lm_statistics(model, weights, calib, seed=3, with_noise=True)
    assert new[2] == ref[2]  # the mean loss
    for part in (0, 1, 3):  # G, D, SE: exact equality, the same fp32 sums in the same order
        assert set(new[part]) == set(ref[part]) == set(weights)
        for n in weights:
            assert torch.equal(new[part][n], ref[part][n]), (part, n, (new[part][n] - ref[part][n]).abs().max())
    assert first.grad is marker and all(p.grad is None for p in list(weights.values())[1:])
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


def test_in_place_margin_gives_the_shifted_copy_s_candidates_and_frees_the_noise():
    from compactlm.prune.barber_lm import LMRebuild

    calib = _calib(n=6)
    model, modules = _pruned_tiny(calib)
    dense = {n: w for n, w in _weights(tiny_model("llama")).items() if n in modules}
    keep = {n: m.weight != 0 for n, m in modules.items()}
    grad, curv, _, noise = lm_statistics(model, {n: m.weight for n, m in modules.items()}, calib, with_noise=True)
    shifted = {n: grad[n] + 2.0 * noise[n] * dense[n].sign() for n in modules}
    old = LMRebuild(modules, dense, keep)
    n_old = _ShiftedCopyRebuild.score(old, {n: g.clone() for n, g in grad.items()}, curv, "row", None, 0.5,
                                      {n: s.clone() for n, s in noise.items()}, 2.0)
    new = LMRebuild(modules, dense, keep)
    n_new = new.score(grad, curv, "row", None, 0.5, noise, 2.0)
    assert n_new == n_old > 0 and torch.equal(new.best, old.best)
    for n in modules:
        assert torch.equal(grad[n], shifted[n]), n  # folded in place: the caller's G is the shifted one
        for a, b in zip((*new.cands[n].grow, *new.cands[n].drop, new.cands[n].gain),
                        (*old.cands[n].grow, *old.cands[n].drop, old.cands[n].gain), strict=True):
            assert torch.equal(a, b), n
    assert noise == {}  # every linear's standard error was released once folded


@pytest.mark.parametrize("init", [Wanda(sparsity=0.5), Wanda(pattern="2:4")], ids=["wanda50", "wanda24"])
def test_rebuild_masks_are_those_of_the_all_at_once_layout(init, monkeypatch):
    from compactlm.prune import barber_lm

    calib = _calib(n=14)
    cfg = Barber(init=init, heldout=4, search_ratios=(0.01, 0.03, 0.1), rounds=2)
    new_model = tiny_model("llama")
    new = compactlm.prune(new_model, cfg, calib=calib, batch_size=4)
    old_model = tiny_model("llama")
    # the old round: G, D and SE from one all-at-once pass, then a shifted copy of G made inside score
    monkeypatch.setitem(_UNPATCHED_SCORE, "score", barber_lm.LMRebuild.score)
    stash = {"round": 0}

    def old_gradient(model, weights, seqs, desc="", with_noise=False):
        g, d, loss, noise = _all_at_once_statistics(model, weights, seqs, stash["round"], with_noise)
        stash.update(curv=d, noise=noise, round=stash["round"] + 1)
        return g, loss, None  # no fold between the passes: the old score shifts a copy

    monkeypatch.setattr(barber_lm, "lm_gradient", old_gradient)
    monkeypatch.setattr(barber_lm, "lm_curvature", lambda *a, **k: stash["curv"])
    monkeypatch.setattr(barber_lm.LMRebuild, "score", lambda self, grad, curv, group, nm, max_ratio:
                        _ShiftedCopyRebuild.score(self, grad, curv, group, nm, max_ratio, stash["noise"], cfg.margin))
    old = compactlm.prune(old_model, cfg, calib=calib, batch_size=4)
    old_rounds, new_rounds = _lm_round(old), _lm_round(new)
    assert sum(r["swaps"] for r in new_rounds) > 0
    strip = [{k: v for k, v in r.items() if k != "cpu_seconds"} for r in new_rounds]
    assert strip == [{k: v for k, v in r.items() if k != "cpu_seconds"} for r in old_rounds]
    for n, w in _weights(new_model).items():  # the same masks and the same weights, bit for bit
        assert torch.equal(w, _weights(old_model)[n]), n
