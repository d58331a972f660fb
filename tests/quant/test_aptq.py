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
