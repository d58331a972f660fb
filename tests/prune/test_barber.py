"""LLM-Barber's rules, each checked against a plain re-computation (arXiv 2408.10631 §3 and the authors' code)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import compactlm
from compactlm.layerwise import LayerContext, capture_inputs
from compactlm.models import get_adapter, tiny_model
from compactlm.primitives.hessian import HessianAccumulator
from compactlm.prune import Barber, SparseGPT, Wanda, is_nm, nm_mask, topk_mask
from compactlm.prune.barber import barber_scores, capture_block, rebuild_masks
from compactlm.prune.common import execute
from compactlm.prune.sparsegpt import SparseGPTRun


def _calib(n=8, t=32, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _profitable(keep, score):
    """The authors' count: pairs (i-th best pruned, i-th worst kept) where the pruned one scores higher."""
    p = score[~keep].sort(descending=True).values
    k = score[keep].sort().values
    n = min(p.numel(), k.numel())
    return int((p[:n] > k[:n]).sum())


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_row_rebuild_swaps_floor_ratio_of_the_profitable_pairs_best_first(ratio):
    g = torch.Generator().manual_seed(1)
    score = torch.rand(12, 40, generator=g)
    keep = topk_mask(torch.rand(12, 40, generator=g), 0.5)
    new, swaps = rebuild_masks({"w": keep}, {"w": score}, ratio, "row")
    new = new["w"]
    expected = [int(_profitable(keep[r], score[r]) * ratio) for r in range(12)]
    assert swaps == sum(expected) > 0
    for r in range(12):
        grown = (new[r] & ~keep[r]).nonzero().flatten()
        dropped = (keep[r] & ~new[r]).nonzero().flatten()
        assert len(grown) == len(dropped) == expected[r]
        # the grown ones are the best pruned, the dropped ones the worst kept
        best_pruned = score[r].masked_fill(keep[r], -1).topk(expected[r]).indices
        worst_kept = score[r].masked_fill(~keep[r], 2).topk(expected[r], largest=False).indices
        assert set(grown.tolist()) == set(best_pruned.tolist())
        assert set(dropped.tolist()) == set(worst_kept.tolist())


def test_layer_and_block_rebuild_count_profitable_pairs_over_the_whole_group():
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(8, 16, generator=g) for n in "ab"}
    keeps = {n: topk_mask(torch.rand(8, 16, generator=g), 0.5) for n in "ab"}
    _, swaps = rebuild_masks(keeps, scores, 0.5, "layer")
    assert swaps == sum(int(_profitable(keeps[n].flatten(), scores[n].flatten()) * 0.5) for n in "ab")
    _, swaps = rebuild_masks(keeps, scores, 0.5, "block")
    flat_k = torch.cat([keeps[n].flatten() for n in "ab"])
    assert swaps == int(_profitable(flat_k, torch.cat([scores[n].flatten() for n in "ab"])) * 0.5)


def test_nm_rebuild_takes_floor_ratio_of_the_profitable_groups_and_stays_nm():
    g = torch.Generator().manual_seed(3)
    score = torch.rand(6, 32, generator=g)
    keep = nm_mask(torch.rand(6, 32, generator=g), 2, 4)
    new, swaps = rebuild_masks({"w": keep}, {"w": score}, 0.5, "row", (2, 4))
    s3, k3 = score.view(6, 8, 4), keep.view(6, 8, 4)
    gain = s3.masked_fill(k3, -1).amax(2) - s3.masked_fill(~k3, 2).amin(2)
    assert swaps == sum(int(int((gain[r] > 0).sum()) * 0.5) for r in range(6)) > 0
    assert is_nm(new["w"], 2, 4)


def test_tiny_ratio_swaps_nothing_when_a_group_has_few_profitable_pairs():
    keep = torch.tensor([[True, False, True, False]])
    score = torch.tensor([[0.1, 0.9, 0.5, 0.2]])  # one profitable pair (0.9 vs 0.1)
    new, swaps = rebuild_masks({"w": keep}, {"w": score}, 0.5, "row")
    assert swaps == 0 and torch.equal(new["w"], keep)  # floor(0.5 · 1) = 0, as int() in the authors' code
    new, swaps = rebuild_masks({"w": keep}, {"w": score}, 1.0, "row")
    assert swaps == 1 and new["w"].tolist() == [[False, True, True, False]]


def _layer_ctx(model, calib, i=0):
    adapter = get_adapter(model)
    inputs, kwargs = capture_inputs(model, adapter, calib, 4, torch.device("cpu"))
    return adapter, LayerContext(i, adapter.layers[i], adapter.layer_prefix(i), adapter, inputs, kwargs[i],
                                 torch.device("cpu"))


@pytest.mark.parametrize("block_kind", ["attention", "mlp"])
def test_gradient_is_taken_at_the_dense_weights_against_the_sparse_block_output(block_kind):
    torch.manual_seed(0)
    model = tiny_model("llama")
    adapter, ctx = _layer_ctx(model, _calib())
    block = adapter.attention(0) if block_kind == "attention" else adapter.mlp(0)
    mods = adapter.attention_linears(0) if block_kind == "attention" else adapter.mlp_linears(0)
    dense = {n: m.weight.detach().clone() for n, m in mods.items()}
    dense_block = copy.deepcopy(block)  # the authors' dense copy of the block
    masks = {n: topk_mask(torch.rand_like(w), 0.5) for n, w in dense.items()}
    with torch.no_grad():
        for n, m in mods.items():
            m.weight.mul_(masks[n])
    sparse = {n: m.weight.detach().clone() for n, m in mods.items()}
    flags = {n: m.weight.requires_grad for n, m in mods.items()}
    run = Barber(objective="block", init=Wanda(sparsity=0.5)).make_run()
    run.init.dense, run.init.masks = dense, masks
    captured = capture_block(ctx, block)
    grad_sq, seen, before, dense_out = run._dense_gradients(block, mods, captured)
    assert seen == 8
    for n, m in mods.items():  # the sparse weights are back, and the gradient flags as they were
        assert torch.equal(m.weight, sparse[n]) and m.weight.requires_grad == flags[n]
    # Plain re-computation: per sequence, d/dW_dense MSE(dense_block(x_sparse), sparse_block(x_sparse)).
    params = dict(dense_block.named_parameters())
    expect = {n: torch.zeros_like(w) for n, w in dense.items()}
    losses = []
    for args, kwargs, target in captured.samples():
        out = dense_block(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(out, target)
        grads = torch.autograd.grad(loss, [params[n.split(".", 1)[1] + ".weight"] for n in mods])
        for n, gr in zip(mods, grads, strict=True):
            expect[n] += gr ** 2
        losses.append(float(loss))
    assert before == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    for n in mods:
        torch.testing.assert_close(grad_sq[n], expect[n], rtol=1e-4, atol=1e-12)
        s = barber_scores(dense[n], grad_sq[n] / seen)
        torch.testing.assert_close(s, dense[n].abs() * (expect[n] / seen).sqrt(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("init", [Wanda(sparsity=0.5), Wanda(pattern="2:4"), SparseGPT(sparsity=0.5, blocksize=32)],
                         ids=["wanda50", "wanda24", "sparsegpt50"])
def test_barber_keeps_sparsity_and_block_error_never_above_the_initial_masks(init):
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(objective="block", init=init, rebuild_ratio=0.5), calib=_calib(),
                             batch_size=4)
    swaps = sum(sum(r["swaps"].values()) for r in report.layer_records)
    assert swaps > 0 or isinstance(init, SparseGPT)  # after SparseGPT's reconstruction the guard may revert all
    for r in report.layer_records:
        for label in ("attention", "mlp"):
            before, after = r[f"{label}_block_mse"]
            assert after <= before or (label in r.get("reverted", []) and r["swaps"][label] == 0)
    for name, s in report.sparsity.items():
        assert s == pytest.approx(0.5), name


def test_sparsegpt_shares_one_hessian_between_linears_fed_the_same_input_bit_identically():
    class Unshared(SparseGPTRun):
        def add_batch(self, stats, name, module, inp, out):
            if stats.acc is None:
                stats.acc = HessianAccumulator(stats.in_features, device=stats.device)
            stats.acc.add(inp)
            stats.batches += 1

    calib, config = _calib(), SparseGPT(sparsity=0.5, blocksize=32)
    shared, plain = tiny_model("llama"), tiny_model("llama")
    run = config.make_run()
    seen = []
    orig = run.prune
    run.prune = lambda name, module, stats: (seen.append((name, id(stats.acc))), orig(name, module, stats))[1]
    execute(shared, config, run, calib, None, batch_size=4)
    execute(plain, config, Unshared(config), calib, None, batch_size=4)
    for (n, a), (_, b) in zip(shared.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    first = dict(seen[:7])  # layer 0: q/k/v share one Hessian, gate/up another; o and down their own
    a = get_adapter(shared).family
    qkv = {first[f"{a.attn}.{x}"] for x in (a.q, a.k, a.v)}
    assert len(qkv) == 1 and len(set(first.values())) == 4
