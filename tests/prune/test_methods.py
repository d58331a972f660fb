"""Pruning methods on random data and on tiny in-process models: exact sparsity, N:M validity, error ordering."""

import pytest
import torch

import compactlm
from compactlm.errors import DataError
from compactlm.models import get_adapter, tiny_model
from compactlm.prune import Barber, Magnitude, PruneReport, SparseGPT, Wanda, is_nm, mask_from_scores
from compactlm.prune.common import n_pruned
from compactlm.prune.magnitude import magnitude_scores
from compactlm.prune.sparsegpt import sparsegpt_prune
from compactlm.prune.wanda import wanda_scores


def _random_layer(seed: int, out_f: int = 48, in_f: int = 96, tokens: int = 1024):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    # Correlated inputs whose channels differ in scale, as LLM activations do (Wanda §2: outlier features).
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    scale = torch.exp(torch.randn(in_f, generator=g))
    x = (torch.randn(tokens, in_f, generator=g) @ mix + 0.3 * torch.randn(tokens, in_f, generator=g)) * scale
    return w, x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [dict(sparsity=0.5), dict(pattern="2:4"), dict(sparsity=0.7, scope="layer")])
def test_layer_output_error_sparsegpt_below_wanda_below_magnitude(seed, spec):
    w, x = _random_layer(seed)

    def err(w_pruned):
        return float(((x @ w.t() - x @ w_pruned.t()) ** 2).sum())

    w_mag = w * mask_from_scores(magnitude_scores(w), Magnitude(**spec))
    w_wanda = w * mask_from_scores(wanda_scores(w, (x * x).sum(0)), Wanda(**spec))
    h = 2 * x.t() @ x / x.shape[0]
    w_sgpt, keep, record = sparsegpt_prune(w, h, SparseGPT(blocksize=32, **spec))
    assert (w_sgpt[~keep] == 0).all() and record["loss"] > 0
    e_mag, e_wanda, e_sgpt = err(w_mag), err(w_wanda), err(w_sgpt)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


def _calib(n=8, t=32, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _linears(model):
    a = get_adapter(model)
    return {f"{a.layer_prefix(i)}.{n}": m for i in range(a.num_layers) for n, m in a.linears(i).items()}


CONFIGS = [Magnitude(sparsity=0.5), Wanda(sparsity=0.3), SparseGPT(sparsity=0.5, blocksize=32),
           Barber(objective="block", init=Wanda(sparsity=0.5), rebuild_ratio=0.5),
           Barber(objective="block", init=SparseGPT(sparsity=0.4, blocksize=32), rebuild_ratio=0.5, guard=False)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}-{c.describe()}")
def test_exact_unstructured_sparsity_per_row(config):
    model = tiny_model("llama")
    report = compactlm.prune(model, config, calib=_calib(), batch_size=4)
    s = config.target_sparsity
    for name, m in _linears(model).items():
        zeros = (m.weight == 0).sum(1)
        assert (zeros == n_pruned(m.in_features, s)).all(), name
    assert len(report.sparsity) == 14 and report.seconds > 0
    weights = _linears(model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in weights)
    assert report.overall_sparsity == pytest.approx(zeros / sum(m.weight.numel() for m in weights), abs=1e-12)


def test_overall_sparsity_weights_each_linear_by_its_size():
    # A 3x larger linear at 50 % beside a dense one: 0.375 of all weights are zero (the unweighted mean is 0.25).
    report = PruneReport({}, [], [], {"a": 0.5, "b": 0.0}, {"a": 300, "b": 100, "unpruned": 10_000}, 1.0)
    assert report.overall_sparsity == pytest.approx(0.375)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "barber"])
def test_nm_patterns_are_valid(method, pattern):
    model = tiny_model("qwen2")
    config = compactlm.prune.METHODS[method](pattern=pattern) if method != "barber" else \
        Barber(objective="block", init=Wanda(pattern=pattern), rebuild_ratio=0.5)
    compactlm.compress(model, config, calib=_calib(), batch_size=4)
    n, m = map(int, pattern.split(":"))
    for name, lin in _linears(model).items():
        assert is_nm(lin.weight != 0, n, m), name


@pytest.mark.parametrize("init, group", [
    (Wanda(sparsity=0.5), "row"), (Wanda(sparsity=0.5), "layer"), (Wanda(sparsity=0.5), "block"),
    (Wanda(pattern="2:4"), "row"), (Wanda(pattern="2:4"), "block"), (SparseGPT(sparsity=0.5, blocksize=32), "row"),
], ids=["wanda50-row", "wanda50-layer", "wanda50-block", "wanda24-row", "wanda24-block", "sparsegpt50-row"])
def test_barber_never_changes_sparsity_and_does_swap(init, group):
    calib = _calib()
    base = tiny_model("llama")
    compactlm.prune(base, init, calib=calib, batch_size=4)
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(objective="block", init=init, rebuild_ratio=0.5, group=group, guard=False),
                             calib=calib, batch_size=4)
    swaps = sum(sum(r["swaps"].values()) for r in report.layer_records)
    assert swaps > 0
    before, after = _linears(base), _linears(model)
    a = get_adapter(model)
    blocks = [[f"{a.layer_prefix(i)}.{n}" for n in part(i)] for i in range(a.num_layers)
              for part in (a.attention_linears, a.mlp_linears)]
    for block in blocks:
        zeros_before = sum(int((before[n].weight == 0).sum()) for n in block)
        assert zeros_before == sum(int((after[n].weight == 0).sum()) for n in block)
        for n in block:
            if group != "block":  # per-matrix (and for rows, per-row) counts are fixed too
                assert torch.equal((before[n].weight == 0).sum(1), (after[n].weight == 0).sum(1)) or group == "layer"
                assert int((before[n].weight == 0).sum()) == int((after[n].weight == 0).sum())
            if init.nm:
                assert is_nm(after[n].weight != 0, *init.nm)
    assert any(not torch.equal(before[n].weight != 0, after[n].weight != 0) for n in before)


def test_barber_guard_never_worsens_the_layer_error():
    model = tiny_model("llama")
    report = compactlm.prune(model, Barber(objective="block", init=Wanda(sparsity=0.5), rebuild_ratio=0.5),
                             calib=_calib(), batch_size=4)
    for r in report.layer_records:
        for label in ("attention", "mlp"):
            before, after = r[f"{label}_block_mse"]
            assert after <= before or label in r.get("reverted", [])


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "qwen2_moe"])
def test_barber_runs_on_other_families(family):
    model = tiny_model(family)
    report = compactlm.prune(model, Barber(objective="block", init=Wanda(pattern="2:4"), rebuild_ratio=0.5),
                             calib=_calib(), batch_size=4)
    assert all(is_nm(m.weight != 0, 2, 4) for m in _linears(model).values())
    assert report.layer_records and all("attention_block_mse" in r for r in report.layer_records)


@pytest.mark.parametrize("config", [Wanda(), SparseGPT(), Barber(), Barber(objective="block")],
                         ids=["Wanda", "SparseGPT", "Barber-lm", "Barber-block"])
def test_calibrated_methods_without_calibration_data_raise(config):
    with pytest.raises(DataError, match="calibration data"):
        compactlm.prune(tiny_model("llama"), config)


def test_magnitude_needs_no_calibration_and_targets_select_linears():
    model, dense = tiny_model("llama"), tiny_model("llama")
    report = compactlm.prune(model, Magnitude(sparsity=0.5, targets=(r"mlp\.",), ignore=("down_proj",)))
    assert set(report.sparsity) == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")}
    for name, m in _linears(model).items():
        assert ((m.weight == 0).float().mean() == 0.5) == (name in report.sparsity)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_filter_fn_and_bad_config_type():
    model = tiny_model("llama")
    report = compactlm.prune(model, Wanda(), calib=_calib(), filter_fn=lambda n, m: "layers.0." in n, batch_size=4)
    assert all(n.startswith("model.layers.0.") for n in report.sparsity)
    with pytest.raises(compactlm.CompactLMError, match="pruning config"):
        compactlm.prune(model, compactlm.PerLayer({"_default": Wanda()}))


def test_sparsegpt_hessian_damping_retries_and_fails_loudly():
    import warnings

    from compactlm.errors import CalibrationError

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(4, 16, generator=g)
    h = 2 * x.t() @ x / 4  # rank 4 of 16, plus a never-firing input: damping makes it invertible
    h[3] = 0
    h[:, 3] = 0
    new_w, keep, record = sparsegpt_prune(w, h, SparseGPT(sparsity=0.5, blocksize=16))
    assert torch.isfinite(new_w).all() and record["damping"] >= 0.01 and record["damping_retries"] >= 0
    assert (h[3] == 0).all()  # the caller's Hessian is left as it was
    assert int((~keep).sum()) == 8 * 8  # exact 50 % sparsity with a dead input present
    v = torch.randn(16, 1, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, record = sparsegpt_prune(w, v @ v.t() - 0.5 * torch.eye(16), SparseGPT(sparsity=0.5, blocksize=16))
    assert record["damping_retries"] >= 1 and record["damping"] == pytest.approx(0.01 * 10 ** record["damping_retries"])
    assert any("not positive definite" in str(c.message) for c in caught)
    with pytest.raises(CalibrationError, match="layer.q.*singular"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsegpt_prune(w, -1e6 * torch.eye(16), SparseGPT(sparsity=0.5, blocksize=16), name="layer.q")
