"""The layer-wise driver's memory savings change nothing: packing each layer as it finishes, replacing the
calibration activations in place and stopping the kwargs probe before the LM head give bit-identical results."""

import pytest
import torch

import compactlm
from compactlm import layerwise
from compactlm.models import get_adapter, tiny_model
from compactlm.modules.packed_linear import PackedLinear
from compactlm.quant import GPTQ
from compactlm.quant.common import layer_filter, pack_into, quant_targets
from compactlm.quant.gptq import GPTQRun


def _calib(n=6, t=16):
    return torch.randint(3, 200, (n, t), generator=torch.Generator().manual_seed(0))


def _pack_at_the_end(model, cfg, calib):
    """The previous flow: calibrate the whole model dense, then pack every linear after the run."""
    targets = quant_targets(model, cfg)
    runner = GPTQRun(cfg)  # no pack_target: the driver leaves every layer dense
    layerwise.run(model, calib, runner, batch_size=cfg.batch_size, filter_fn=layer_filter(targets))
    for name, (res, spec) in runner.results.items():
        pack_into(model, name, targets[name], res.codes, res.scale, res.zero, spec)
    return model


@pytest.mark.parametrize("family,cfg", [
    ("llama", GPTQ(bits=4, group_size=16, batch_size=2)),
    ("qwen2_moe", GPTQ(bits=3, group_size=16, act_order=False, batch_size=4)),
    ("gemma3", GPTQ(bits=2, group_size=-1, true_sequential=False, batch_size=3)),
])
def test_packing_each_layer_as_it_finishes_is_bit_identical(family, cfg):
    calib = _calib()
    ours = compactlm.quantize(tiny_model(family, seed=0), cfg, calib=calib)
    ref = _pack_at_the_end(tiny_model(family, seed=0), cfg, calib)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert any(k.endswith("qdata") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_finished_layers_are_packed_and_their_codes_dropped_during_the_run():
    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    seen = []
    orig = GPTQRun.finish_layer

    def spy(self, ctx):
        orig(self, ctx)
        # After layer i: its linears are PackedLinear, later layers are still dense, no codes are held.
        seen.append((ctx.index, len(self.results),
                     all(isinstance(m, PackedLinear) for m in adapter.linears(ctx.index).values()),
                     any(isinstance(m, PackedLinear) for j in range(ctx.index + 1, adapter.num_layers)
                         for m in adapter.linears(j).values())))

    GPTQRun.finish_layer = spy
    try:
        compactlm.quantize(model, GPTQ(bits=4, group_size=16, batch_size=2), calib=_calib())
    finally:
        GPTQRun.finish_layer = orig
    assert seen == [(i, 0, True, False) for i in range(adapter.num_layers)]


def test_forward_in_place_matches_forward_all():
    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    inputs, kwargs = layerwise.capture_inputs(model, adapter, _calib(), 4, torch.device("cpu"))
    ctx = layerwise.LayerContext(0, adapter.layers[0], adapter.layer_prefix(0), adapter, list(inputs), kwargs[0],
                                 torch.device("cpu"))
    expected = ctx.forward_all()
    ctx.forward_in_place()
    assert len(ctx.inputs) == len(expected) == 2
    for x, y in zip(ctx.inputs, expected, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(ctx.inputs[0], inputs[0])  # the list was rewritten, not the captured tensors


def test_kwargs_probe_stops_before_the_lm_head():
    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    calls = []
    adapter.lm_head.register_forward_hook(lambda *a: calls.append(1))
    inputs, kwargs = layerwise.capture_inputs(model, adapter, _calib(), 4, torch.device("cpu"))
    assert calls == []
    assert len(kwargs) == adapter.num_layers and all("position_embeddings" in kw for kw in kwargs)
    # Still the full model's layer-0 inputs: the embeddings of every batch.
    with torch.no_grad():
        assert torch.equal(torch.cat(inputs), adapter.embed_tokens(_calib()))


def test_gptq_groups_stop_before_their_last_linear_runs():
    """GPTQ reads only inputs: a group's forward ends in the pre-hook of its last linear, so the down projection
    runs only in the kwargs probe (one sample) and in the final propagation (one call per batch)."""
    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    calls = []
    adapter.linears(0)["mlp.down_proj"].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    compactlm.quantize(model, GPTQ(bits=4, group_size=16, batch_size=2), calib=_calib())
    assert calls == [1, 2, 2, 2]


@pytest.mark.parametrize("family,cfg", [
    ("llama", GPTQ(bits=4, group_size=16, batch_size=2)),
    ("qwen2_moe", GPTQ(bits=3, group_size=16, act_order=False, batch_size=4)),
    ("gemma3", GPTQ(bits=2, group_size=-1, true_sequential=False, batch_size=3)),
])
def test_linears_fed_the_same_input_share_one_hessian(family, cfg, monkeypatch):
    """q/k/v and gate/up read one input tensor: one accumulator serves them, with the same packed result."""
    calib = _calib()
    adds = []
    orig_add = GPTQRun.add_batch

    def counting_add(self, stats, name, module, inp, out):
        adds.append(name)
        orig_add(self, stats, name, module, inp, out)

    monkeypatch.setattr(GPTQRun, "add_batch", counting_add)
    shared = compactlm.quantize(tiny_model(family, seed=0), cfg, calib=calib)
    shared_adds = list(adds)
    adds.clear()
    monkeypatch.setattr(GPTQRun, "shares_input_stats", False)
    separate = compactlm.quantize(tiny_model(family, seed=0), cfg, calib=calib)
    # Fewer accumulations (k/v and up never accumulate their own Hessian), but every linear still solved.
    assert len(shared_adds) < len(adds)
    assert not any(n.endswith(("k_proj", "v_proj", "up_proj")) for n in shared_adds)
    a, b = shared.state_dict(), separate.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharing_that_changes_between_batches_is_an_error():
    """A linear that shared q_proj's input in the first batch but gets its own tensor later must not silently
    keep using q_proj's Hessian (forward hooks, so every linear's hook runs in every batch)."""
    calls = []

    class PostHookGPTQRun(GPTQRun):
        needs_linear_outputs = True  # forward hooks: the driver does not stop at the first sharer

        def new_stats(self, name, module):
            calls.clear()  # count k_proj's calls from the start of each group's calibration (not the probe's)
            return super().new_stats(name, module)

    model = tiny_model("llama", seed=0)
    k_proj = get_adapter(model).linears(0)["self_attn.k_proj"]

    def clone_after_first_batch(module, args):
        calls.append(1)
        return (args[0].clone(),) if len(calls) > 1 else None

    k_proj.register_forward_pre_hook(clone_after_first_batch)
    cfg = GPTQ(bits=4, group_size=16, batch_size=2)
    with pytest.raises(RuntimeError, match="shared its input with self_attn.q_proj in the first calibration batch"):
        layerwise.run(model, _calib(), PostHookGPTQRun(cfg), batch_size=2,
                      filter_fn=layer_filter(quant_targets(model, cfg)))
