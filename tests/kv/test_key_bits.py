"""Per-channel key bits (KVQuant(key_allocation='importance')): the allocation, the mixed-width store, the cache
and its fused attention, and the adapter's weight-only query statistics, on random tensors and tiny models."""

from __future__ import annotations

import pytest
import torch

from compactlm.errors import ConfigError
from compactlm.kv import KVQuant, QuantizedKVCache, QuantizedKVLayer
from compactlm.kv.key_bits import MENU, MixedKeyStore, allocate, group_ranges, pair_mean
from compactlm.kv.quantizer import QuantizedKV
from compactlm.models import tiny_model
from compactlm.models.adapter import get_adapter

from .helpers import fused_matches_reference


def test_allocation_meets_the_average_exactly_and_follows_importance():
    g = torch.Generator().manual_seed(0)
    imp = (3 * torch.randn(3, 64, generator=g)).exp()
    bits = allocate(imp, 2)
    assert bits.shape == imp.shape and bits.sum() == 2 * imp.numel()
    assert set(bits.unique().tolist()) <= set(MENU) and set(bits.unique().tolist()) == {0, 2, 4}
    order = imp.flatten().argsort()
    assert bits.flatten()[order[-1]] == 4 and bits.flatten()[order[0]] == 0
    # monotone: a more important channel never gets fewer bits
    b_sorted = bits.flatten()[order]
    assert bool((b_sorted[1:] >= b_sorted[:-1]).all())
    # flat importance: every first step beats every second step, so all channels get 2 bits
    assert bool((allocate(torch.ones(2, 8), 2) == 2).all())
    with pytest.raises(ValueError, match="average 2"):
        allocate(imp, 4)


def test_pair_mean_and_group_ranges_leave_padding_out():
    w = torch.arange(8.0)
    assert torch.equal(pair_mean(w), torch.tensor([2.0, 3, 4, 5, 2, 3, 4, 5]))
    keys = torch.zeros(2, 1, 8, 2)
    keys[0, 0, :, 0] = torch.tensor([0.0, 1, 2, 3, 0, 0, 0, 0])  # row 0: ranges 3 and 0 in channel 0
    keys[1, 0, :2, 0] = 100.0  # padded tokens of row 1: must not count
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :4] = False  # row 1's first group is all padding: left out
    r = group_ranges(keys, 4, valid)
    assert r.shape == (1, 2)
    assert r[0, 0] == pytest.approx((9 + 0 + 0) / 3)  # three seen groups: 3², 0², 0²
    assert group_ranges(keys, 4)[0, 0] > 1000  # without the mask the padding dominates


@pytest.mark.parametrize("meta_dtype", [torch.float16, "int8", "int4"])
def test_mixed_store_reproduces_each_width_class_and_appends(meta_dtype):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 64, 16, generator=g)
    bits = allocate((2 * torch.randn(3, 16, generator=g)).exp(), 2)
    store = MixedKeyStore.quantize(keys[..., :32, :], bits, 16, meta_dtype)
    assert torch.equal(store.bits(), bits)
    more = MixedKeyStore.quantize(keys[..., 32:, :], None, 16, meta_dtype, like=store)
    full = store.append(more)
    assert full.length == 64
    deq = full.dequantize(torch.float32)
    assert deq.shape == keys.shape
    flat_keys = keys.permute(0, 2, 1, 3).reshape(2, 1, 64, 48)
    flat_deq = deq.permute(0, 2, 1, 3).reshape(2, 1, 64, 48)
    for w in (2, 4):
        idx = full.channels[w]
        assert idx.numel()
        err = (flat_deq[..., idx] - flat_keys[..., idx]).abs()
        span = flat_keys[..., idx].amax() - flat_keys[..., idx].amin()
        assert err.max() <= span / (2 ** w - 1) * 0.75  # half a step, with slack for the metadata formats
    idx0 = full.channels[0]
    means = flat_keys[..., idx0].reshape(2, 1, 4, 16, -1).mean(3).repeat_interleave(16, 2)
    torch.testing.assert_close(flat_deq[..., idx0], means.reshape(2, 1, 64, -1), atol=2e-3, rtol=2e-3)
    # a slice on group edges equals the same rows of the whole
    torch.testing.assert_close(full.dequantize(torch.float32, 16, 48), deq[..., 16:48, :])
    # the 2-bit class's codes are packed 4 per byte; bytes are far below the 4-bit store of the same keys
    uniform4 = QuantizedKV.quantize(keys, 4, 16, -2, torch.float16)
    assert full.nbytes < uniform4.nbytes
    with pytest.raises(ValueError, match="like="):
        store.append(MixedKeyStore.quantize(keys[..., 32:, :], bits, 16, meta_dtype))


def test_mixed_store_error_is_lower_than_uniform_two_bits_where_queries_look():
    """The point of the allocation: query-weighted key error at 2 bits on average drops vs uniform 2 bits."""
    g = torch.Generator().manual_seed(2)
    scale = (1.5 * torch.randn(1, 2, 1, 32, generator=g)).exp()  # channels of very different ranges
    keys = torch.randn(1, 2, 256, 32, generator=g) * scale
    weights = (1.5 * torch.randn(2, 32, generator=g)).exp()
    bits = allocate(pair_mean(weights) * group_ranges(keys, 32), 2)
    mixed = MixedKeyStore.quantize(keys, bits, 32, torch.float16).dequantize()
    uniform = QuantizedKV.quantize(keys, 2, 32, -2, torch.float16).dequantize()
    w = pair_mean(weights)[None, :, None, :]

    def weighted(x):
        return ((x - keys) ** 2 * w).sum()

    assert weighted(mixed) < 0.6 * weighted(uniform)


@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_over_mixed_keys_matches_reference(pre_rope, masked):
    model = tiny_model("llama")
    cfg = KVQuant(bits=2, group_size=8, residual=8, sinks=2, pre_rope=pre_rope, chunk_tokens=16,
                  key_allocation="importance", meta_dtype="int4")
    cache = QuantizedKVCache(model, cfg)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(3)
    layer.query_weights = (2 * torch.randn(2, 16, generator=g)).exp()  # spread widths: 0, 2 and 4 bits all used
    layer.update(torch.randn(2, 2, 70, 16, generator=g) * torch.linspace(0.1, 3, 16),
                 torch.randn(2, 2, 70, 16, generator=g))
    assert isinstance(layer.qk, MixedKeyStore) and layer.qk.length == 56
    assert layer.qk.bits().sum() == 2 * layer.qk.bits().numel()
    assert set(layer.qk.bits().unique().tolist()) == {0, 2, 4}  # every width class is exercised
    fused_matches_reference(layer, g, masked)


def test_cache_generates_with_a_padded_batch_and_counts_the_mixed_store():
    model = tiny_model("llama")
    cfg = KVQuant(bits=2, group_size=8, residual=8, sinks=2, pre_rope=True, key_allocation="importance")
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    cache = QuantizedKVCache(model, cfg)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (2, 52)
    layer = cache.layers[0]
    assert isinstance(layer.qk, MixedKeyStore) and layer.quantized_length > 0
    held = sum(t.numel() * t.element_size() for t in (layer.sink_k, layer.sink_v, layer.keys, layer.values,
                                                       layer.qpos, layer.rpos))
    assert layer.nbytes() == held + layer.qk.nbytes + layer.qv.nbytes
    layer.batch_select_indices(torch.tensor([1]))  # batch bookkeeping reaches the mixed store
    assert layer.materialize()[0].shape[0] == 1


def test_key_allocation_config_is_validated_and_labelled():
    cfg = KVQuant(bits=2, key_allocation="importance")
    assert cfg.label.endswith("-kalloc")
    assert KVQuant(bits=4, key_bits=2, key_allocation="importance").k_bits == 2
    with pytest.raises(ConfigError, match="key_allocation"):
        KVQuant(key_allocation="greedy")
    with pytest.raises(ConfigError, match="2-bit keys"):
        KVQuant(bits=4, key_allocation="importance")
    with pytest.raises(ValueError, match="query weights"):
        QuantizedKVLayer(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_query_channel_weights_follow_the_query_projection(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    attn = adapter.attention(0)
    h, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    with torch.no_grad():
        if family == "qwen3":
            attn.q_norm.weight.copy_(torch.linspace(0.5, 2.0, d))
            expect = attn.q_norm(torch.ones(1, d)).pow(2).reshape(1, d).expand(hkv, d)
        else:
            attn.q_proj.weight[:d].mul_(10)  # head 0 (KV group 0) much louder
            gain = adapter.layers[0].input_layernorm.weight
            w = (attn.q_proj.weight * gain).pow(2).sum(-1).view(h, d)
            expect = w.view(hkv, h // hkv, d).mean(1)
    got = adapter.query_channel_weights(0)
    assert got.shape == (hkv, d)
    torch.testing.assert_close(got, expect.float(), rtol=1e-5, atol=1e-6)
    if family == "llama":
        assert got[0].mean() > 10 * got[-1].mean()


def test_int2_mixed_preset_builds_the_recommended_cache_and_takes_overrides():
    from compactlm.evaluation.methods import build_method

    model = tiny_model("llama")
    m = build_method(model, "kv", "int2-mixed", {})
    assert m.name == "kv-int2-g32-r128-s16-m4-kalloc"
    assert build_method(model, "kv", "int2-mixed", {"group_size": "16"}).name == "kv-int2-g16-r128-s16-m4-kalloc"
    with pytest.raises(ConfigError, match="int2-mixed fixes bits"):
        build_method(model, "kv", "int2-mixed", {"bits": "4"})
    cache = m.make_cache(model, None)
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids, cache=cache)
    assert isinstance(cache.layers[0].qk, MixedKeyStore)
