"""GPTQ math and the layer-wise application on tiny models."""

import copy

import pytest
import torch

import compactlm
from compactlm.modules.packed_linear import PackedLinear
from compactlm.primitives.quant import QuantSpec, dequantize, rtn
from compactlm.quant import GPTQ, RTN, gptq_solve, quant_summary


def _data(seed=0, n=1024, d=128):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.4
    X = torch.randn(n, d, generator=g) @ mix + torch.randn(n, d, generator=g)  # correlated inputs
    W = torch.randn(48, d, generator=g)
    return X, W, 2 * X.t() @ X / n


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_layer_output_error(act_order, bits):
    X, W, H = _data()
    spec = QuantSpec(bits=bits, group_size=32)
    res = gptq_solve(W, H, spec, act_order=act_order, block_size=32)
    codes, s, z = rtn(W, spec)
    err_gptq = float(((X @ (W - res.weight).t()) ** 2).mean())
    err_rtn = float(((X @ (W - dequantize(codes, s, z)).t()) ** 2).mean())
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # the returned weight is exactly the dequantized codes (what PackedLinear will compute)
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero))


def test_gptq_keeps_pruned_zeros_zero():
    X, W, H = _data(1)
    W[:, ::2] = 0.0  # a 50% pruned layer
    res = gptq_solve(W, H, QuantSpec(bits=3, group_size=32), keep_zero=W == 0)
    assert bool((res.weight[:, ::2] == 0).all())
    assert float((res.weight[:, 1::2] != 0).float().mean()) > 0.5


def test_gptq_on_tiny_model_is_closer_than_rtn(tiny_llama):
    calib = torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    errs = {}
    for cfg in (RTN(bits=3, group_size=16), GPTQ(bits=3, group_size=16)):
        model = copy.deepcopy(tiny_llama)
        report = {}
        compactlm.quantize(model, cfg, calib=calib, report=report)
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
        with torch.no_grad():
            errs[type(cfg).__name__] = float((model(ids).logits - ref).pow(2).mean())
        assert quant_summary(model)["avg_bits"] == 3.0
    assert errs["GPTQ"] < errs["RTN"], errs
    assert all("damp_retries" in r for r in report["layers"])


def test_gptq_respects_sparsity_on_a_pruned_model(tiny_llama):
    with torch.no_grad():
        for i in range(2):
            w = tiny_llama.model.layers[i].mlp.down_proj.weight
            w[w.abs() < w.abs().median()] = 0.0
    zeros = (tiny_llama.model.layers[0].mlp.down_proj.weight == 0).clone()
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    compactlm.quantize(tiny_llama, GPTQ(bits=4, group_size=16), calib=calib)
    packed = tiny_llama.model.layers[0].mlp.down_proj
    assert bool((packed.dequantize_weight()[zeros] == 0).all())


def test_ignore_keeps_layers_dense(tiny_llama):
    compactlm.quantize(tiny_llama, RTN(bits=4, group_size=16, ignore=(r".*down_proj",)))
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, PackedLinear)


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_gptq_runs_on_other_families(family):
    from compactlm.models import tiny_model

    model = tiny_model(family)
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    compactlm.quantize(model, GPTQ(bits=4, group_size=16), calib=calib)
    assert quant_summary(model)["quantized_layers"] > 0
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1]).logits).all()
