"""APTQ: exact average, fused groups, pins, attention-aware statistics."""

import pytest
import torch

import compactlm
from compactlm.errors import ConfigError
from compactlm.quant import APTQ, quant_summary
from compactlm.quant.aptq import allocate, attention_stats

CALIB = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("avg, share", [(3.0, True), (2.5, False)])
def test_aptq_meets_the_average_exactly(tiny_llama, avg, share):
    report = {}
    compactlm.quantize(tiny_llama, APTQ(avg_bits=avg, group_size=16, share_fused=share), calib=CALIB, report=report)
    s = quant_summary(tiny_llama)
    assert s["avg_bits"] == avg
    assert s["avg_bits_with_metadata"] > avg  # scales (16 bit) and zeros count on top
    bits = s["bits_per_layer"]
    for i in range(2 if share else 0):
        p = f"model.layers.{i}"
        assert len({bits[f"{p}.self_attn.{n}_proj"] for n in "qkv"}) == 1
        assert bits[f"{p}.mlp.gate_proj"] == bits[f"{p}.mlp.up_proj"]
    assert set(bits.values()) <= {2, 4}
    assert set(report["sensitivity"]) == set(bits)


def test_pins_are_honoured(tiny_llama):
    cfg = APTQ(avg_bits=3.0, group_size=16, pin={r".*layers\.0\.mlp\.down_proj": 4})
    compactlm.quantize(tiny_llama, cfg, calib=CALIB)
    s = quant_summary(tiny_llama)
    assert s["bits_per_layer"]["model.layers.0.mlp.down_proj"] == 4 and s["avg_bits"] == 3.0


def test_allocation_prefers_sensitive_items_and_reports_unreachable_targets():
    numel = {"a": 100, "b": 100, "c": 200}
    sens = {"a": {2: 10.0, 4: 1.0}, "b": {2: 2.0, 4: 1.0}, "c": {2: 50.0, 4: 1.0}}
    out = allocate([["a"], ["b"], ["c"]], numel, sens, (2, 4), 3.0, {})
    assert out == {"a": 2, "b": 2, "c": 4}
    with pytest.raises(ConfigError, match="cannot be met exactly|not reachable"):
        allocate([["a"], ["b"], ["c"]], numel, sens, (2, 4), 2.1, {})


def test_v_weights_are_exact_attention_mixing_and_k_weights_match_autograd():
    torch.manual_seed(0)
    B, H, Hkv, T, D, d = 1, 2, 1, 6, 4, 5
    x = torch.randn(B, T, d)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    wq, wk, xv = attention_stats(x, q, k, v, None, D**-0.5, probes=2000, gen=torch.Generator().manual_seed(0))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    A = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * D**-0.5).masked_fill(~mask, -1e9), -1)
    torch.testing.assert_close(xv[0][1], (A[0, 1] @ x[0]), rtol=1e-4, atol=1e-5)

    def attn_out(kk, qq):
        s = (qq @ kk.repeat_interleave(2, 1).transpose(-1, -2) * D**-0.5).masked_fill(~mask, -1e9)
        return torch.softmax(s, -1) @ v.repeat_interleave(2, 1)

    # k: sum over outputs of ||dO_t/dK_j||_F^2, summed over the query heads of the group, / D
    J = torch.autograd.functional.jacobian(lambda kk: attn_out(kk, q), k)  # (B,H,T,D, B,Hkv,T,D)
    ref_k = J.pow(2).sum(dim=(0, 1, 2, 3, 7))[0, 0] / D
    torch.testing.assert_close(wk[0], ref_k, rtol=1e-4, atol=1e-6)
    # q: Hutchinson estimate of ||dO_t/dQ_t||_F^2 / D, close with many probes
    Jq = torch.autograd.functional.jacobian(lambda qq: attn_out(k, qq), q)  # (B,H,T,D, B,H,T,D)
    ref_q = torch.stack([Jq[0, 0, t, :, 0, 0, t, :].pow(2).sum() for t in range(T)]) / D
    torch.testing.assert_close(wq[0], ref_q, rtol=0.15, atol=1e-4)


def test_loss_sensitivity_decreases_with_bits_and_follows_the_output_gradient(tiny_llama):
    """'loss' sensitivity = ½ Σ_i G_ii ΔW_i A ΔW_iᵀ: fewer bits cost more, and a layer whose output the loss cares
    1e6× more about is given the widest width."""
    from compactlm.primitives.fisher import output_gradient_moments
    from compactlm.quant.aptq import SensitivityRun, allocation_items
    from compactlm.quant.common import quant_targets

    cfg = APTQ(avg_bits=3.0, group_size=16, bits_menu=(2, 3, 4))
    targets = quant_targets(tiny_llama, cfg, None)
    grads = output_gradient_moments(tiny_llama, CALIB, targets)
    probe = SensitivityRun(tiny_llama, cfg, grads)
    probe.run(tiny_llama, CALIB, targets, "sens")
    assert all(s[2] > s[3] > s[4] > 0 for s in probe.sens.values())
    hot = "model.layers.1.mlp.down_proj"
    boosted = {**grads, hot: grads[hot] * 1e6}
    probe2 = SensitivityRun(tiny_llama, cfg, boosted)
    probe2.run(tiny_llama, CALIB, targets, "sens")
    torch.testing.assert_close(probe2.sens[hot][2], probe.sens[hot][2] * 1e6, rtol=1e-4, atol=0)
    numel = {n: m.weight.numel() for n, m in targets.items()}
    bits = allocate(allocation_items(tiny_llama, targets, True), numel, probe2.sens, (2, 3, 4), 3.0, {})
    assert bits[hot] == 4


def test_layer_sensitivity_and_bad_sensitivity_names(tiny_llama):
    report = {}
    compactlm.quantize(tiny_llama, APTQ(avg_bits=3.0, group_size=16, sensitivity="layer"), calib=CALIB, report=report)
    assert quant_summary(tiny_llama)["avg_bits"] == 3.0
    with pytest.raises(ConfigError, match="sensitivity must be"):
        APTQ(sensitivity="hessian")
    with pytest.raises(ConfigError, match="sensitivity_quantizer"):
        APTQ(sensitivity_quantizer="awq")
    with pytest.raises(ConfigError, match="gradient_dtype must be"):
        APTQ(gradient_dtype="fp16")
