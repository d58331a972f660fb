
import pytest
import torch
from torch import nn

from compactlm.errors import ModelLoadError, UnsupportedArchitectureError
from compactlm.models import TINY_FAMILIES, UnfusedExperts, get_adapter, load, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_loads_and_adapter_finds_every_module(family):
    model, tok = load(f"tiny-{family}")
    assert tok is None
    a = get_adapter(model)
    assert a.num_layers == len(model.model.layers) >= 2
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size) == (4, 2, 16, 64)
    for i in range(a.num_layers):
        lin = a.linears(i)
        assert all(isinstance(m, nn.Linear) for m in lin.values())
        # every nn.Linear of the layer is reachable through the adapter, exactly once
        layer_linears = {n for n, m in a.layers[i].named_modules() if isinstance(m, nn.Linear)}
        routers = {n for n in layer_linears if n.endswith(("mlp.gate", "shared_expert_gate"))}
        assert set(lin) == layer_linears - routers
        flat = [n for g in a.sequential_groups(i) for n in g]
        assert sorted(flat) == sorted(lin)
        for group in a.fused_groups(i):
            assert all(n in lin for n in group)
        assert isinstance(a.key_pre_rope_module(i), nn.Module)
    # the full-name walk: every linear once, each name resolving to the very module
    named = a.named_linears()
    assert len(named) == sum(len(a.linears(i)) for i in range(a.num_layers))
    assert all(model.get_submodule(n) is m for n, m in named.items())
    info = a.info()
    assert info["layers"] == a.num_layers and info["parameters"] > 0


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_adapter_rotary_reproduces_the_models_keys(family):
    """Pre-RoPE keys from key_pre_rope_module + adapter.rotary + apply_rotary equal the keys the model caches."""
    model = tiny_model(family)
    a = get_adapter(model)
    ids = torch.randint(3, 256, (1, 12))
    captured = {}
    mod = a.key_pre_rope_module(a.num_layers - 1)
    h = mod.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    h.remove()
    k = a.pre_rope_keys(a.num_layers - 1, captured["k"])  # (B, H_kv, T, D)
    cos, sin = a.rotary(k, torch.arange(12)[None], a.num_layers - 1)
    _, k_rot = a.apply_rotary(k, k, cos, sin)
    cached = out.past_key_values.layers[a.num_layers - 1].keys
    torch.testing.assert_close(k_rot, cached)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_unfused_experts_are_numerically_identical(family):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        a = get_adapter(model)
        a.linears(0)
        assert isinstance(a.mlp(0).experts, UnfusedExperts)
        after = model(ids).logits
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_unknown_spec_missing_file_and_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load("no-such-model")
    with pytest.raises(ModelLoadError, match="not found"):
        load(str(tmp_path / "missing.gguf"))
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load(str(txt))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError, match="no tiny test model"):
        load("tiny-rwkv")


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load"):
        load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        load(str(tmp_path))


def test_folder_round_trip(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    loaded, tok = load(str(tmp_path))
    assert tok is None  # weights-only folder
    ids = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)


@pytest.mark.default_model
def test_default_model_geometry(default_model):
    model, tok = default_model
    info = get_adapter(model).info()
    geometry = (info["family"], info["layers"], info["heads"], info["kv_heads"], info["head_dim"])
    assert geometry == ("llama", 30, 9, 3, 64)
    assert info["context_length"] == 8192 and info["hidden_size"] == 576
    assert tok is not None and tok.chat_template
