"""The quantized KV cache on tiny in-process models: window bookkeeping, accuracy, fused attention vs
reference, pre-RoPE keys, padding, memory accounting, generate, the kv:intN methods and the config."""

from __future__ import annotations

import pytest
import torch

import compactlm
from compactlm.config import BaseConfig
from compactlm.errors import ConfigError
from compactlm.evaluation.methods import build_method
from compactlm.evaluation.ppl_decode import run_ppl_decode
from compactlm.kv import (
    KVQuant,
    QuantizedKVCache,
    QuantizedKVLayer,
    full_cache_bytes,
    kv_cache,
    quantized_decode_attention,
    reference_attention,
)
from compactlm.models import tiny_model

from .helpers import fused_matches_reference


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, cache, prefix):
    """Prefill ``prefix`` tokens into ``cache``, then feed the rest one by one; all logits (B, T, V)."""
    with torch.no_grad():
        outs = [model(ids[:, :prefix], cache=cache).logits]
        for t in range(prefix, ids.size(1)):
            outs.append(model(ids[:, t: t + 1], cache=cache).logits)
    return torch.cat(outs, 1)


def test_window_keeps_residual_to_residual_plus_group():
    cfg = KVQuant(bits=4, group_size=8, residual=16, sinks=3)
    layer = QuantizedKVLayer(cfg)
    k = torch.randn(1, 2, 1, 16)
    for n in range(1, 120):
        layer.update(k, k)
        window = layer.keys.shape[-2]
        assert layer.get_seq_length() == n
        assert layer.sink_k.shape[-2] == min(3, n)
        assert layer.quantized_length % 8 == 0
        assert layer.sink_k.shape[-2] + layer.quantized_length + window == n
        if n >= 3 + 16 + 8:
            assert 16 <= window < 16 + 8


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_int8_cache_tracks_the_full_model(family):
    model = tiny_model(family)
    ids = _ids(1, 48)
    with torch.no_grad():
        ref = model(ids).logits
    got = _run(model, ids, QuantizedKVCache(model, KVQuant(bits=8, group_size=8, residual=8)), 24)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_fewer_bits_more_error():
    model = tiny_model("llama")
    ids = _ids(1, 48)
    with torch.no_grad():
        ref = model(ids).logits
    errs = [(_run(model, ids, QuantizedKVCache(model, KVQuant(bits=b, group_size=8, residual=0)), 32) - ref)
            .abs().mean().item() for b in (8, 4, 2)]
    assert errs[0] < errs[1] < errs[2], errs


@pytest.mark.parametrize("meta_dtype", ["fp16", "int8"])
@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_decode_attention_matches_reference(pre_rope, masked, meta_dtype):
    """Chunked dequantization + online softmax == dequantize everything + plain softmax."""
    model = tiny_model("llama")
    cfg = KVQuant(bits=2, group_size=8, residual=8, sinks=2, pre_rope=pre_rope, chunk_tokens=16,
                  meta_dtype=meta_dtype)
    cache = QuantizedKVCache(model, cfg)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)
    layer.update(torch.randn(2, 2, 70, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g))
    assert layer.quantized_length == 56
    fused_matches_reference(layer, g, masked)


def test_pre_rope_keys_round_trip_through_rotation():
    model = tiny_model("llama")
    cache = QuantizedKVCache(model, KVQuant(bits=8, group_size=8, residual=0, pre_rope=True))
    layer = cache.layers[0]
    k = torch.randn(1, 2, 32, 16)
    layer.update(k, k)
    keys, _ = layer.materialize()
    assert (keys - k).abs().max() < 0.05
    ids = _ids(1, 40)
    with torch.no_grad():
        ref = model(ids).logits
    got = _run(model, ids, QuantizedKVCache(model, KVQuant(bits=8, group_size=8, residual=0, pre_rope=True)), 20)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_kv_cache_scope_fused_equals_dequantized_path_and_restores():
    model = tiny_model("llama")
    ids = _ids(1, 40)
    cfg = KVQuant(bits=2, group_size=8, residual=8)
    plain = _run(model, ids, QuantizedKVCache(model, cfg), 16)
    impl = model.config._attn_implementation
    with kv_cache(model, cfg) as session:
        fused = _run(model, ids, QuantizedKVCache(model, cfg), 16)
        assert session.cache.layers[0].fused_pending
    assert model.config._attn_implementation == impl
    assert torch.allclose(fused, plain, atol=1e-5), (fused - plain).abs().max()


def test_kv_cache_scope_converts_a_plain_forward_and_generate():
    model = tiny_model("llama")
    ids = _ids(1, 30)
    cfg = KVQuant(bits=4, group_size=8, residual=8)
    with kv_cache(model, cfg) as session, torch.no_grad():
        out = model(ids, use_cache=True)
        assert isinstance(out.cache, QuantizedKVCache) and out.cache is session.cache
        gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert isinstance(session.cache, QuantizedKVCache) and session.cache.get_seq_length() == 30 + 5
    explicit = model.generate(ids, max_new_tokens=6, do_sample=False,
                              past_key_values=QuantizedKVCache(model, cfg))
    assert torch.equal(gen, explicit)


def test_left_padded_batch_matches_rows_alone():
    model = tiny_model("llama")
    cfg = KVQuant(bits=8, group_size=4, residual=4)
    a, b = _ids(1, 20, 1), _ids(1, 14, 2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with kv_cache(model, cfg), torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        alone = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
    batched_logits = torch.stack([lg[1] for lg in out.logits])
    alone_logits = torch.stack([lg[0] for lg in alone.logits])
    assert (batched_logits - alone_logits).abs().max() < 0.05 * alone_logits.abs().max()


def test_memory_accounting_counts_every_tensor():
    model = tiny_model("llama")
    ids = _ids(1, 64)
    q = QuantizedKVCache(model, KVQuant(bits=2, group_size=16, residual=16))
    _run(model, ids, q, 64)
    layer = q.layers[0]
    assert layer.quantized_length == 48 and layer.keys.shape[-2] == 16
    # per layer: codes 2×(2 heads·48·16·2/8) + key meta 2×(2·3·16)·2 + value meta 2×(2·48·1)·2 + window 2×(2·16·16)·4
    expected = 2 * (2 * 48 * 4) + 2 * (2 * 3 * 16) * 2 + 2 * (2 * 48 * 1) * 2 + 2 * (2 * 16 * 16) * 4
    assert layer.nbytes() == expected
    assert q.kv_bytes() == 2 * expected
    from transformers import DynamicCache

    full = DynamicCache(config=model.config)
    _run(model, ids, full, 64)
    assert full_cache_bytes(full) == 2 * 2 * 2 * 64 * 16 * 4


def test_int8_metadata_halves_the_metadata_bytes_and_tracks_fp16_metadata():
    """meta_dtype="int8" stores 1 + 1 byte per group instead of 2 + 2, at nearly the fp16-metadata error."""
    model = tiny_model("llama")
    ids = _ids(1, 64)
    with torch.no_grad():
        ref = model(ids).logits
    caches = {m: QuantizedKVCache(model, KVQuant(bits=2, group_size=16, residual=16, meta_dtype=m))
              for m in ("fp16", "int8")}
    errs = {m: (_run(model, ids, c, 32) - ref).abs().mean().item() for m, c in caches.items()}
    layer = caches["int8"].layers[0]
    assert layer.qk.scale.dtype == torch.uint8 and layer.qk.zero.dtype == torch.int8
    assert layer.qv.scale.dtype == torch.uint8 and layer.qv.zero.dtype == torch.int8
    # per layer: codes 2×(2·48·4) + key meta 2×(2·3·16)·1 + value meta 2×(2·48·1)·1 + window 2×(2·16·16)·4
    assert layer.nbytes() == 2 * (2 * 48 * 4) + 2 * (2 * 3 * 16) + 2 * (2 * 48) + 2 * (2 * 16 * 16) * 4
    meta16 = sum(q.scale.numel() * 2 + q.zero.numel() * 2 for q in (caches["fp16"].layers[0].qk,
                                                                    caches["fp16"].layers[0].qv))
    assert caches["fp16"].layers[0].nbytes() - layer.nbytes() == meta16 // 2
    assert errs["int8"] < 1.25 * errs["fp16"], errs


def test_kv_method_options_from_strings():
    """``--kv int2@sinks=4@pre_rope=true`` passes strings; they are converted to the field types."""
    model = tiny_model("llama")
    m = build_method(model, "kv", "int2", {"group_size": "8", "residual": "16", "sinks": "4", "pre_rope": "true",
                                           "value_group_size": "8", "meta_dtype": "int8"})
    assert m.name == "kv-int2-g8-r16-vg8-s4-prerope-m8"
    with pytest.raises(ConfigError, match="sinks"):
        build_method(model, "kv", "int2", {"sinks": "four"})


def test_kv_methods_are_registered_and_decode_quality_orders_by_bits():
    model = tiny_model("llama")
    methods = [build_method(model, "kv", f"int{b}", {"group_size": 8, "residual": 8}) for b in (8, 2)]
    assert [m.name for m in methods] == ["kv-int8-g8-r8", "kv-int2-g8-r8"]
    res = run_ppl_decode(model, methods=methods, input_ids=_ids(2, 40), decoded=12)
    full = res.methods["full"]["ppl"]
    assert abs(res.methods["kv-int8-g8-r8"]["ppl"] / full - 1) < 0.01
    assert abs(res.methods["kv-int2-g8-r8"]["ppl"] / full - 1) > abs(res.methods["kv-int8-g8-r8"]["ppl"] / full - 1)
    with pytest.raises(ConfigError, match="option"):
        build_method(model, "kv", "int4", {"bogus": 1})
    with pytest.raises(ConfigError, match="head dim"):
        build_method(model, "kv", "int4", {"value_group_size": 12})  # does not divide head dim 16
    assert build_method(model, "kv", "int2", {}).name == "kv-int2-g32-r128"  # value groups capped at 16


def test_config_round_trip_and_validation():
    cfg = KVQuant(bits=4, group_size=16, residual=64, sinks=4, pre_rope=True)
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    assert compactlm.KVQuant is KVQuant
    for bad, match in [({"bits": 3}, "bits"), ({"group_size": 0}, "group_size"), ({"residual": -1}, "residual"),
                       ({"sinks": -2}, "sinks"), ({"meta_dtype": "fp8"}, "meta_dtype"),
                       ({"chunk_tokens": 33}, "chunk_tokens"), ({"value_group_size": 0}, "value_group_size")]:
        with pytest.raises(ConfigError, match=match):
            KVQuant(**bad)
    with pytest.raises(ConfigError, match="KVQuant"):
        with kv_cache(tiny_model("llama"), "int4"):
            pass


def test_sliding_window_models_are_refused():
    from compactlm.errors import UnsupportedArchitectureError

    model = tiny_model("gemma3")
    with pytest.raises((UnsupportedArchitectureError, ConfigError)):
        QuantizedKVCache(model, KVQuant(bits=4, group_size=8))


@pytest.mark.parametrize("masked", [False, True])
def test_dense_grouped_attention_matches_reference(masked):
    from compactlm.kv import dense_grouped_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 6, 1, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), \
        torch.randn(2, 2, 40, 16, generator=g)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[1, ..., :7] = False
    ref = reference_attention(q, k, v, 0.3, mask)
    got = dense_grouped_attention(q, k, v, 0.3, mask)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_hf_hqq_baseline_method_runs_when_hqq_is_installed():
    pytest.importorskip("hqq")
    model = tiny_model("llama")
    m = build_method(model, "kv", "hf-hqq-int4", {"group_size": 16, "residual": 8})
    res = run_ppl_decode(model, methods=[m], input_ids=_ids(1, 40), decoded=16)
    assert abs(res.methods[m.name]["ppl"] / res.methods["full"]["ppl"] - 1) < 0.2
    with pytest.raises(ConfigError, match="takes only"):
        build_method(model, "kv", "hf-hqq-int2", {"bits": 3})


def test_fused_decode_attention_in_bf16_tracks_the_fp32_reference():
    model = tiny_model("llama")
    cache = QuantizedKVCache(model, KVQuant(bits=4, group_size=8, residual=8, chunk_tokens=16))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(2)
    layer.update(torch.randn(1, 2, 60, 16, generator=g).bfloat16(), torch.randn(1, 2, 60, 16, generator=g).bfloat16())
    query = torch.randn(1, 4, 1, 16, generator=g).bfloat16()
    k, v = layer.materialize()
    ref = reference_attention(query.float(), k.float(), v.float(), 0.25)
    got = quantized_decode_attention(query, layer, 0.25)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 3e-2


def test_demo_bytes_per_token_counts_the_quantized_cache():
    from transformers import DynamicCache

    from compactlm.demo import STEPS
    from compactlm.kv.demo_step import bytes_per_token

    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(1, 1024), cache=cache)
    full = bytes_per_token(model, None, cache, 1024)
    assert full == 2 * 2 * 2 * 16 * 4  # layers × (K, V) × kv heads × head dim × fp32 bytes
    assert bytes_per_token(model, KVQuant(bits=2, group_size=16), cache, 1024) / full < 0.25
    mixed = KVQuant(bits=2, group_size=16, key_allocation="importance")
    assert bytes_per_token(model, mixed, cache, 1024) / full < 0.25
    assert "kv" in STEPS


def test_demo_prefill_cache_refuses_a_text_shorter_than_the_context(monkeypatch):
    import compactlm.data.calib as calib
    from compactlm.errors import DataError
    from compactlm.kv.demo_step import prefill_cache

    monkeypatch.setattr(calib, "tokenize_source", lambda tokenizer, source: torch.arange(3, 103))
    model = tiny_model("llama")
    with pytest.raises(DataError, match="100 tokens, fewer than the 200"):
        prefill_cache(model, None, 200)
    cache, tokens = prefill_cache(model, None, 64)
    assert tokens == 64 and cache.layers[0].keys.shape[-2] == 64


@pytest.mark.parametrize("masked", [False, True])
def test_value_rotation_fused_attention_matches_reference_and_helps_outlier_channels(masked):
    """value_rotation: the store holds V·H; fused attention rotates its sum back == reference over materialize()."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 2, 70, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g)
    v[..., 5] *= 20  # an outlier value channel: per-token groups spend their range on it
    errs = {}
    for rot in (False, True):
        cfg = KVQuant(bits=2, group_size=8, residual=8, sinks=2, chunk_tokens=16, value_rotation=rot,
                      value_group_size=16)  # one value group per head (QuaRot's setting)
        layer = QuantizedKVCache(model, cfg).layers[0]
        layer.update(k, v)
        kk, vv = fused_matches_reference(layer, g, masked)
        errs[rot] = (vv - v)[..., 2:58, :].pow(2).mean().item()  # the quantized store's tokens
    assert errs[True] < 0.7 * errs[False], errs


def test_value_rotation_is_exact_at_high_precision_and_needs_a_power_of_two_head_dim():
    from compactlm.kv.quantizer import hadamard

    h = hadamard(16)
    assert torch.allclose(h @ h, torch.eye(16), atol=1e-6) and torch.equal(h, h.T)
    layer = QuantizedKVCache(tiny_model("llama"), KVQuant(bits=8, group_size=8, residual=0,
                                                          value_rotation=True)).layers[0]
    v = torch.randn(1, 2, 32, 16)
    layer.update(torch.randn(1, 2, 32, 16), v)
    _, vv = layer.materialize()
    assert (vv - v).abs().max() < 0.02 * v.abs().max()
    with pytest.raises(ConfigError, match="power-of-two"):
        KVQuant(bits=2, value_rotation=True, value_group_size=16).check_model(48)


def test_per_tensor_bit_widths_store_keys_and_values_at_their_own_width():
    """K4V2: 4-bit keys and 2-bit values; bytes counted per tensor; keys-only error matches the int4 keys."""
    model = tiny_model("llama")
    ids = _ids(1, 64)
    with torch.no_grad():
        ref = model(ids).logits
    cfgs = {"int2": KVQuant(bits=2, group_size=16, residual=16),
            "k4v2": KVQuant(bits=2, key_bits=4, group_size=16, residual=16),
            "k2v4": KVQuant(bits=4, key_bits=2, group_size=16, residual=16),
            "int4": KVQuant(bits=4, group_size=16, residual=16)}
    caches = {n: QuantizedKVCache(model, c) for n, c in cfgs.items()}
    errs = {n: (_run(model, ids, c, 32) - ref).abs().mean().item() for n, c in caches.items()}
    layer = caches["k4v2"].layers[0]
    assert layer.qk.bits == 4 and layer.qv.bits == 2
    assert caches["k2v4"].layers[0].qk.bits == 2 and caches["k2v4"].layers[0].qv.bits == 4
    # per layer: key codes 2·48·16·4/8, value codes 2·48·16·2/8, key meta 2×(2·3·16)·2, value meta 2×(2·48·1)·2,
    # window 2×(2·16·16)·4
    assert layer.nbytes() == 2 * 48 * 8 + 2 * 48 * 4 + 2 * (2 * 3 * 16) * 2 + 2 * (2 * 48) * 2 + 2 * (2 * 16 * 16) * 4
    sizes = {n: c.kv_bytes() for n, c in caches.items()}
    assert sizes["int2"] < sizes["k4v2"] == sizes["k2v4"] < sizes["int4"]
    assert errs["int4"] < errs["k4v2"] < errs["int2"], errs
    assert errs["int4"] < errs["k2v4"] < errs["int2"], errs
    assert cfgs["k4v2"].label == "k4v2-g16-r16" and cfgs["int4"].label == "int4-g16-r16"
    assert KVQuant(bits=4, key_bits=4, value_bits=4).label == KVQuant(bits=4).label


def test_per_tensor_bit_widths_fused_attention_matches_reference():
    model = tiny_model("llama")
    cfg = KVQuant(bits=2, key_bits=4, group_size=8, residual=8, sinks=2, chunk_tokens=16)
    cache = QuantizedKVCache(model, cfg)
    _run(model, _ids(1, 60), cache, 40)
    layer = cache.layers[0]
    q = torch.randn(1, 4, 1, 16)
    k, v = layer.materialize()
    ref = reference_attention(q, k, v, 0.25)
    got = quantized_decode_attention(q, layer, 0.25)
    assert (got - ref).abs().max() < 1e-4


def test_per_tensor_bit_widths_options_round_trip_and_validation():
    model = tiny_model("llama")
    m = build_method(model, "kv", "int2", {"key_bits": "4", "sinks": "16"})
    assert m.name == "kv-k4v2-g32-r128-s16"
    cfg = KVQuant(bits=2, key_bits=4, value_bits=2)
    assert BaseConfig.from_json(cfg.to_json()) == cfg and (cfg.k_bits, cfg.v_bits) == (4, 2)
    for bad in ({"key_bits": 3}, {"value_bits": 16}, {"key_bits": "4"}):
        with pytest.raises(ConfigError, match="key_bits|value_bits"):
            KVQuant(**bad)


@pytest.mark.parametrize("spec", [dict(meta_dtype="int4"), dict(meta_dtype="int4", value_rotation=True),
                                  dict(meta_dtype="int8", clip_search=True),
                                  dict(meta_dtype="fp16", clip_search=True, value_rotation=True)])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_fused_decode_attention_matches_reference_with_fitted_ranges(spec, pre_rope):
    """Error-fitted ranges and the 1-byte metadata change only the stored numbers: the chunked path still
    equals dequantize-everything + plain softmax, also after decode-time flushes reuse the first base."""
    model = tiny_model("llama")
    cfg = KVQuant(bits=2, group_size=8, residual=8, sinks=2, pre_rope=pre_rope, chunk_tokens=16, **spec)
    layer = QuantizedKVCache(model, cfg).layers[0]
    g = torch.Generator().manual_seed(2)
    layer.update(torch.randn(2, 2, 50, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g))
    for _ in range(20):  # two more flushes of one group each
        layer.update(torch.randn(2, 2, 1, 16, generator=g) * 2, torch.randn(2, 2, 1, 16, generator=g) * 2)
    assert layer.quantized_length == 56
    query = torch.randn(2, 4, 1, 16, generator=g)
    k, v = layer.materialize()
    ref = reference_attention(query, k, v, 0.25)
    got = quantized_decode_attention(query, layer, 0.25)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


def test_fitted_ranges_lower_the_cache_error_and_one_byte_metadata_stays_close():
    """On the tiny model, 2-bit caches with searched ranges track the full model better than min-max."""
    model = tiny_model("llama")
    ids = _ids(1, 64)
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for name, kw in {"minmax": {}, "clip": dict(clip_search=True), "m4": dict(meta_dtype="int4")}.items():
        cache = QuantizedKVCache(model, KVQuant(bits=2, group_size=8, residual=8, **kw))
        errs[name] = (_run(model, ids, cache, 32) - ref).square().mean().item()
    assert errs["clip"] < errs["minmax"] and errs["m4"] < errs["minmax"], errs


def test_pre_rope_positions_are_held_once_per_group_and_irregular_ones_per_token():
    model = tiny_model("llama")
    cfg = KVQuant(bits=8, group_size=8, residual=8, pre_rope=True)
    k = torch.randn(1, 2, 40, 16)
    layer = QuantizedKVCache(model, cfg).layers[0]
    layer.update(k, k)
    assert layer.qpos_grouped and layer.qpos.shape == (1, 32 // 8)  # 4 bytes per group, not per token
    keys, _ = layer.materialize()
    assert (keys - k).abs().max() < 0.05
    odd = QuantizedKVCache(model, cfg).layers[0]
    pos = torch.arange(40)[None] * 2  # position ids that skip: not consecutive within a group
    odd.update(k, k, position_ids=pos)
    odd.update(k[..., :8, :], k[..., :8, :], position_ids=torch.arange(80, 88)[None])
    assert not odd.qpos_grouped and odd.qpos.shape == (1, 40)
    assert torch.equal(odd.qpos[0, :32], pos[0, :32].int())
    rope = odd.rope
    ref = rope(rope(k[..., :32, :], pos[:, :32].int(), True), pos[:, :32].int(), False)
    assert (odd.dequantized_keys(0, 32, torch.float32) - ref).abs().max() < 0.05


def test_left_padded_batch_matches_rows_alone_with_pre_rope_positions_per_group():
    model = tiny_model("llama")
    cfg = KVQuant(bits=8, group_size=4, residual=4, pre_rope=True)
    a, b = _ids(1, 20, 1), _ids(1, 14, 2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with kv_cache(model, cfg) as session, torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        assert session.cache.layers[0].qpos_grouped  # padded positions do not count as irregular
        alone = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
    batched_logits = torch.stack([lg[1] for lg in out.logits])
    alone_logits = torch.stack([lg[0] for lg in alone.logits])
    assert (batched_logits - alone_logits).abs().max() < 0.05 * alone_logits.abs().max()


def test_fit_options_validate_label_and_parse():
    cfg = KVQuant(bits=2, sinks=16, pre_rope=True, meta_dtype="int4", clip_search=True)
    assert cfg.label == "int2-g32-r128-s16-prerope-m4-clip"
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="clip_search"):
        KVQuant(clip_search="yes")
    with pytest.raises(ConfigError, match="int4"):
        KVQuant(meta_dtype="int3")
    with pytest.raises(ConfigError, match="2-bit"):
        KVQuant(bits=2, key_bits=4, meta_dtype="int4")
    m = build_method(tiny_model("llama"), "kv", "int2", {"meta_dtype": "int4", "clip_search": "true",
                                                         "group_size": "8", "residual": "8"})
    assert "m4-clip" in m.name
