import pytest
import torch

from compactlm import layerwise
from compactlm.errors import CalibrationError, DataError
from compactlm.models import TINY_FAMILIES, get_adapter, tiny_model


class Recorder:
    """A do-nothing calibrated method that records what the driver shows it."""

    true_sequential = True
    needs_reference_outputs = True

    def __init__(self):
        self.solved, self.refined = [], []

    def new_stats(self, name, module):
        return {"rows": 0}

    def add_batch(self, stats, name, module, inp, out):
        stats["rows"] += inp.reshape(-1, inp.shape[-1]).shape[0]

    def solve(self, name, module, stats, ctx):
        self.solved.append((ctx.index, name, stats["rows"]))
        return {"rows": stats["rows"]}

    def refine_layer(self, ctx, targets, reference_outputs):
        self.refined.append((ctx.index, len(reference_outputs)))
        return {"refined": True}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_driver_reproduces_the_models_layer_outputs(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    calib = torch.randint(3, 256, (5, 40))  # 40 > Gemma 3's sliding window of 32
    seen = {}
    h = adapter.layers[-1].register_forward_hook(
        lambda m, a, o: seen.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    method = Recorder()
    report = layerwise.run(model, calib, method, batch_size=2)
    assert [r[0] for r in method.refined] == list(range(adapter.num_layers))
    assert all(n == 3 for _, n in method.refined)  # 5 samples in batches of 2
    dense_linears = 7 * adapter.num_layers
    if family in ("llama", "qwen2", "mistral", "qwen3", "gemma3"):
        assert len(report.records) == dense_linears
        assert all(rows == 5 * 40 for _, _, rows in method.solved)
    # re-run the captured inputs through every layer: equals the model's own last-layer output
    inputs, kwargs = layerwise.capture_inputs(model, adapter, calib, 2, torch.device("cpu"))
    for i in range(adapter.num_layers):
        ctx = layerwise.LayerContext(i, adapter.layers[i], adapter.layer_prefix(i), adapter, inputs, kwargs[i],
                                     torch.device("cpu"))
        inputs = ctx.forward_all()
    torch.testing.assert_close(torch.cat(inputs), seen["y"], atol=1e-5, rtol=1e-5)


def test_filter_fn_limits_the_solved_linears():
    model = tiny_model("llama")
    method = Recorder()
    layerwise.run(model, torch.randint(3, 256, (2, 8)), method, filter_fn=lambda name, m: name.endswith("down_proj"))
    assert [n for _, n, _ in method.solved] == ["mlp.down_proj", "mlp.down_proj"]


def test_nan_in_calibration_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"entering layer 0 \(model.layers.0\)"):
        layerwise.run(model, torch.full((2, 8), 5), Recorder())


def test_non_finite_weight_after_a_solve_names_the_linear():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"weight of model.layers.0.mlp.down_proj"):
        layerwise.run(model, torch.randint(3, 256, (2, 8)), Recorder())


def test_missing_or_bad_calibration_data():
    model = tiny_model("llama")
    with pytest.raises(DataError, match="needs calibration data"):
        layerwise.run(model, None, Recorder())
    with pytest.raises(DataError, match=r"\(N, T\)"):
        layerwise.run(model, torch.randint(3, 256, (8,)), Recorder())


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_stopping_a_group_forward_early_changes_nothing(family):
    """True-sequential groups stop the layer's forward once their linears have fired; the GPTQ result must be
    bit-identical to running every forward to the end (MoE: experts that do not fire keep the full forward)."""
    from compactlm.quant.gptq import GPTQ, GPTQRun

    calib = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))

    class FullForward(GPTQRun):
        needs_full_layer_forward = True

    weights, mlp_calls = [], []
    for runner_cls in (GPTQRun, FullForward):
        model = tiny_model(family, seed=0)
        calls = [0]
        get_adapter(model).mlp(0).register_forward_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        runner = runner_cls(GPTQ(bits=4, group_size=16, batch_size=2))
        layerwise.run(model, calib, runner, batch_size=2)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")})
        mlp_calls.append(calls[0])
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    if family == "llama":  # the q/k/v and o passes no longer reach the MLP
        assert mlp_calls[0] < mlp_calls[1]
    for n in weights[0]:
        assert torch.equal(weights[0][n], weights[1][n]), n


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@pytest.mark.skipif(layerwise._MADVISE is None or not layerwise._file_mappings(), reason="needs Linux procfs")
def test_release_file_pages_drops_clean_mapped_pages_and_keeps_every_value(tmp_path):
    import numpy as np

    def mapped_copy(name):
        path = tmp_path / name
        data.tofile(path)
        mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=data.shape))  # private, as HF
        assert torch.equal(mapped, torch.from_numpy(data))  # every page read, so resident
        return mapped

    data = np.random.default_rng(0).standard_normal((4, 256, 1024), dtype=np.float32)  # 4 x 1 MiB
    clean = mapped_copy("clean.bin")
    before = _rss_file_kib()
    assert layerwise.release_file_pages(list(clean.unbind(0))) > 0
    assert before - _rss_file_kib() >= 2 * 1024  # most of the 4 MiB left the resident set
    assert torch.equal(clean, torch.from_numpy(data))  # faulted in again from the file, unchanged

    written = mapped_copy("written.bin")
    written[3, -1, -1] = 42.0  # that page (or large folio) is now the process's own copy: it must survive
    layerwise.release_file_pages(list(written.unbind(0)))
    expected = torch.from_numpy(data.copy())
    expected[3, -1, -1] = 42.0
    assert torch.equal(written, expected)
    anon = torch.randn(256, 1024)
    assert layerwise.release_file_pages([anon, torch.empty(0), anon[:, ::2]]) == 0  # anonymous, empty, strided


def test_quantizing_a_checkpoint_mapped_from_disk_is_unchanged_by_page_release(tmp_path, monkeypatch):
    import compactlm
    from compactlm.quant import GPTQ

    tiny_model("llama", seed=0, hidden_size=256, intermediate_size=512).save_pretrained(tmp_path / "m")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = GPTQ(bits=4, group_size=64)
    released = []
    real = layerwise.release_file_pages
    monkeypatch.setattr(layerwise, "release_file_pages", lambda ts: released.append(real(ts)) or released[-1])
    ours, _ = compactlm.models.load(str(tmp_path / "m"))
    compactlm.quantize(ours, cfg, calib=calib)
    monkeypatch.setattr(layerwise, "release_file_pages", lambda ts: 0)
    ref, _ = compactlm.models.load(str(tmp_path / "m"))
    compactlm.quantize(ref, cfg, calib=calib)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours.keys() == sd_ref.keys()
    assert all(torch.equal(sd_ours[k], sd_ref[k]) for k in sd_ours)
    if layerwise._file_mappings():
        assert sum(released) > 0  # the checkpoint was mapped, and pages were in fact released


def _count_attention_forwards(monkeypatch, model):
    """Count calls of the attention class's own forward (the memo reuses outputs without calling it)."""
    cls = type(get_adapter(model).attention(0))
    calls = [0]
    original = cls.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return calls


def _compress(kind, model, calib):
    import compactlm
    from compactlm.prune import Barber, SparseGPT, Wanda
    from compactlm.quant.aptq import APTQ
    from compactlm.quant.gptq import GPTQ

    if kind == "gptq":
        return compactlm.quantize(model, GPTQ(bits=3, group_size=16, batch_size=2), calib=calib)
    if kind == "aptq":
        return compactlm.quantize(model, APTQ(avg_bits=3.0, group_size=16, batch_size=2), calib=calib)
    config = {"sparsegpt": SparseGPT(sparsity=0.5, blocksize=16), "wanda": Wanda(pattern="2:4"),
              "barber_lm": Barber(init=SparseGPT(sparsity=0.5, blocksize=16), objective="lm", heldout=2,
                                  search_ratios=(0.1, 1.0), rounds=1)}[kind]
    return compactlm.prune(model, config, calib=calib, batch_size=2)


@pytest.mark.parametrize("family,kind", [("llama", "gptq"), ("qwen3", "gptq"), ("gemma3", "gptq"),
                                         ("qwen2_moe", "gptq"), ("llama", "aptq"), ("llama", "sparsegpt"),
                                         ("llama", "wanda"),
                                         ("llama", "barber_lm")])
def test_attention_memo_changes_no_result_and_saves_attention_forwards(monkeypatch, family, kind):
    """Reusing attention outputs across a layer's passes is exact: every weight is bit-identical to recomputing
    them, and true-sequential methods run the attention fewer times (Barber-LM's gradient passes never reuse)."""
    calib = torch.randint(3, 200, (6, 40), generator=torch.Generator().manual_seed(1))
    weights, calls = [], []
    for reuse in (False, True):
        with monkeypatch.context() as m:
            if not reuse:
                m.setattr(layerwise, "_attention_memo", lambda adapter, i: None)
            model = tiny_model(family, seed=0)
            counter = _count_attention_forwards(m, model)
            _compress(kind, model, calib)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        calls.append(counter[0])
    assert weights[0].keys() == weights[1].keys()
    for n in weights[0]:
        assert torch.equal(weights[0][n], weights[1][n]), n
    if kind == "wanda":  # one pass with the dense attention, then the pruned one: nothing to reuse
        assert calls[1] == calls[0]
    else:  # the MLP groups' passes and the final pass reuse the attention of the gate/up pass
        assert calls[1] < calls[0]


def _memo_setup():
    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    calib = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(2))
    inputs, kwargs = layerwise.capture_inputs(model, adapter, calib, 2, torch.device("cpu"))
    ctx = layerwise.LayerContext(0, adapter.layers[0], adapter.layer_prefix(0), adapter, inputs, kwargs[0],
                                 torch.device("cpu"))
    memo = layerwise.AttentionMemo(adapter.layers[0], adapter.attention(0), adapter.mlp(0))
    ctx.memo = memo
    return adapter, ctx, memo


@torch.no_grad()
def test_attention_memo_reuses_only_while_nothing_upstream_changed():
    adapter, ctx, memo = _memo_setup()
    attn = adapter.attention(0)
    with memo:
        first = ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 0
        assert torch.equal(ctx.run(ctx.inputs[0], batch=0), first) and memo.hits == 1
        ctx.run(ctx.inputs[1], batch=1)  # another batch: stored, not reused
        assert memo.hits == 1
        adapter.mlp(0).down_proj.weight.mul_(0.5)  # the MLP does not feed the attention: still reused
        ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 2
        ctx.run(ctx.inputs[0])  # no batch index: the input is not known to be the batch's
        assert memo.hits == 2
        attn.q_proj.weight.mul_(0.5)  # an attention weight changed: recomputed
        changed = ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 2 and not torch.equal(changed, first)
        adapter.layers[0].input_layernorm.weight.add_(1.0)  # the norm before it too
        ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 2
        ctx.inputs[0].mul_(2.0)  # the batch's input modified in place
        ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 2
        ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 3
        handle = attn.k_proj.register_forward_hook(lambda *a: None)  # a hook inside must fire: recomputed
        ctx.run(ctx.inputs[0], batch=0)
        handle.remove()
        assert memo.hits == 3
        with torch.enable_grad():  # gradients need the real graph
            ctx.run(ctx.inputs[0], batch=0)
        assert memo.hits == 3
    assert "forward" not in attn.__dict__  # the patch is removed on exit


def test_attention_reuse_block_and_cli_flags_turn_the_memo_off(monkeypatch):
    calib = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(3))
    calls = []
    for enabled in (True, False):
        with monkeypatch.context() as m:
            model = tiny_model("llama", seed=0)
            counter = _count_attention_forwards(m, model)
            with layerwise.attention_reuse(enabled):
                _compress("gptq", model, calib)
            calls.append(counter[0])
    assert calls[0] < calls[1]
    assert layerwise._REUSE_ATTENTION.get() is True  # restored after the block

    import compactlm.prune
    from compactlm.cli import main

    class Seen(Exception):
        pass

    def record(*args, **kwargs):
        raise Seen(layerwise._REUSE_ATTENTION.get())

    monkeypatch.setattr(compactlm.prune, "prune", record)
    monkeypatch.setattr(compactlm, "quantize", record)
    for argv in (["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5"],
                 ["quantize", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "16"]):
        for flag, expected in (([], True), (["--no-attention-reuse"], False)):
            with pytest.raises(Seen) as seen:
                main([*argv, *flag, "--out", "/nonexistent/x", "-q"])
            assert seen.value.args == (expected,), (argv, flag)
