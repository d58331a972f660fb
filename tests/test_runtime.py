import pytest
import torch

from compactlm.attention.runtime import attention_override
from compactlm.models import tiny_model


def test_override_calls_handlers_only_on_chosen_layers_and_restores():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    calls = []

    def handler(module, q, k, v, mask, scaling, fallback, **kw):
        calls.append((module.layer_idx, q.shape[-2]))
        return fallback(module, q, k, v, mask, scaling=scaling, **kw)

    with attention_override(model, {1: handler}), torch.no_grad():
        out = model(ids).logits
        model.generate(ids[:1], max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(out, ref)
    assert {layer for layer, _ in calls} == {1}
    assert (1, 1) in calls  # decode steps reach the handler too
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_compactlm_attention_handler") for m in model.modules())


def test_override_restores_on_error_and_refuses_nesting():
    model = tiny_model("llama")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attention_override(model, {0: broken}):
        model(torch.randint(3, 256, (1, 4)))
    assert model.config._attn_implementation == "sdpa"
    with attention_override(model, {}), pytest.raises(RuntimeError, match="already active"):
        with attention_override(model, {}):
            pass
    with pytest.raises(IndexError):
        with attention_override(model, {7: broken}):
            pass


def test_a_handler_changes_the_output():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 6))

    def zero(module, q, k, v, mask, scaling, fallback, **kw):
        out, w = fallback(module, q, k, v, mask, scaling=scaling, **kw)
        return torch.zeros_like(out), w

    with torch.no_grad():
        ref = model(ids).logits
        with attention_override(model, {0: zero}):
            out = model(ids).logits
    assert not torch.allclose(ref, out)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_override_on_an_eager_model_keeps_its_logits(family):
    """The override hands SDPA-format masks (bool / None) around; an eager model's fallback must still mask."""
    from compactlm.attention.runtime import attention_override
    from compactlm.models import tiny_model

    model = tiny_model(family, seed=0).eval()
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with attention_override(model, {}):
            out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
