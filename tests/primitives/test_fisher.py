"""Loss-gradient moments at linear outputs: equal to autograd's, parameters untouched, clear errors."""

import pytest
import torch

from compactlm.errors import CalibrationError, DataError
from compactlm.models import get_adapter, tiny_model
from compactlm.primitives.fisher import output_gradient_moments


def _targets(model):
    a = get_adapter(model)
    return {f"{a.layer_prefix(i)}.{n}": m for i in range(a.num_layers) for n, m in a.linears(i).items()}


def test_moments_equal_a_direct_autograd_computation():
    model = tiny_model("llama", seed=0).float()
    calib = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    targets = _targets(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = output_gradient_moments(model, calib, targets, batch_size=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # no weight gradients are kept
    # Reference: retain the outputs of one linear, backprop each sequence's mean NLL, average g² over tokens.
    name = "model.layers.1.self_attn.v_proj"
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    h = targets[name].register_forward_hook(keep)
    try:
        model.zero_grad()
        logits = model(input_ids=calib, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), calib[:, 1:].flatten(),
                                                reduction="none").view(3, -1).mean(1).sum()
        nll.backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    g = outs[0].grad.reshape(-1, outs[0].shape[-1])
    torch.testing.assert_close(got[name], g.pow(2).mean(0), rtol=1e-4, atol=1e-12)
    assert all(v.shape == (targets[n].out_features,) and bool((v > 0).all()) for n, v in got.items())


def test_missing_calibration_is_a_clear_error():
    model = tiny_model("llama", seed=0)
    with pytest.raises(DataError, match="calibration"):
        output_gradient_moments(model, None, _targets(model))
    with pytest.raises(DataError, match="T >= 2"):
        output_gradient_moments(model, torch.zeros(2, 1, dtype=torch.long), _targets(model))


def test_a_non_finite_loss_is_a_clear_error_and_the_model_is_restored():
    model = tiny_model("llama", seed=0).float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(CalibrationError, match="not finite"):
        output_gradient_moments(model, torch.randint(3, 256, (2, 8)), _targets(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bf16_autocast_moments_track_fp32_and_leave_the_model_fp32():
    model = tiny_model("llama", seed=0).float()
    calib = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    targets = _targets(model)
    exact = output_gradient_moments(model, calib, targets, batch_size=2)
    cast = output_gradient_moments(model, calib, targets, batch_size=2, autocast_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name in targets:
        assert cast[name].dtype == torch.float32 and torch.isfinite(cast[name]).all()
        rel = float((cast[name] - exact[name]).norm() / exact[name].norm())
        assert 0 < rel < 0.1, (name, rel)  # bf16 rounding shows (not bit-equal) but stays small
