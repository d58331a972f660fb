"""Runtime candidates: a simulated quantized KV cache and sparse prefill attention in the inspector."""

import contextlib
import copy
import json
import math

import pytest
import torch
from inspector_helpers import plant

from compactlm.attention.decode_baselines import OracleConfig, StreamingConfig
from compactlm.attention.decode_common import DecodeBudget
from compactlm.attention.prefill_sparse import SparsePrefillConfig
from compactlm.cli import main
from compactlm.config import PerLayer
from compactlm.errors import ConfigError
from compactlm.evaluation.methods import build_method
from compactlm.inspector import InspectConfig, inspect
from compactlm.inspector.metrics import kl_from_logits
from compactlm.inspector.runtime import resolve_runtime, store_mask
from compactlm.kv.config import KVQuant
from compactlm.kv.runtime import kv_cache


def _op(report, name):
    return next(o for o in report.operators if o["name"] == name)


def _kv(bits, **kw):
    return KVQuant(bits=bits, **{"group_size": 8, "residual": 8, **kw})


def test_store_mask_follows_the_cache_flush_rule():
    cfg = KVQuant(bits=2, group_size=4, residual=3, sinks=2)
    m = store_mask(torch.arange(16), 16, cfg)
    # n = p + 1 tokens held: 2 sinks exact, whole groups of 4 quantized once n - 2 - 3 >= 4
    assert m[7].sum() == 0 and m[8].tolist()[:7] == [False, False, True, True, True, True, False]
    assert m[12].sum() == 8 and not m[:, :2].any()  # sinks never quantized
    for p in range(16):
        window = p + 1 - 2 - int(m[p].sum())
        assert (window < 3 + 4) and (m[p].sum() == 0 or window >= 3)  # KIVI: R ≤ window < R + G once flushed


@pytest.mark.parametrize("kw", [dict(bits=2), dict(bits=4, sinks=3, pre_rope=True, group_size=4, residual=4)])
def test_simulated_store_equals_decoding_through_the_quantized_cache(tiny4, kw):
    """One forward under the simulation = teacher-forced decoding of every token through QuantizedKVCache."""
    cfg = _kv(**{**kw, "fused_attention": False})
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    steps = []
    with kv_cache(tiny4, cfg), torch.no_grad():
        cache = None
        for t in range(ids.size(1)):
            out = tiny4(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    decoded = torch.stack(steps, 1)  # (1, T, V)
    runtime = resolve_runtime(tiny4, cfg)
    with runtime.context(tiny4, eager=False), torch.no_grad():
        simulated = tiny4(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        plain = tiny4(input_ids=ids, use_cache=False).logits
    assert (simulated - plain).abs().max() > 1e-3  # the store's error is there
    diff = (simulated - decoded).abs().max()
    assert diff < 1e-4, f"simulation vs real cache: max |diff| {diff:.3g}"


def test_kv_int2_error_sits_at_the_attention_outputs(tiny4, ids):
    reports = {b: inspect(tiny4, tiny4, ids, InspectConfig(batch_size=2), candidate_runtime=_kv(b)) for b in (2, 8)}
    r2 = reports[2]
    for name in ("model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.self_attn.q_proj",
                 "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        op = _op(r2, name)  # everything before layer 0's attention is untouched
        assert op["accumulated"]["sqnr_db"] == math.inf and op["isolated"]["sqnr_db"] == math.inf, name
    for i in range(4):
        attn = _op(r2, f"model.layers.{i}.self_attn")
        assert attn["isolated"]["sqnr_db"] < 40 and attn["unit"] and attn["impact"]["kl"] > 0
        assert _op(r2, f"model.layers.{i}.self_attn.o_proj")["isolated"]["sqnr_db"] == math.inf
        assert _op(r2, f"model.layers.{i}.self_attn.probs")["isolated"]["kl"] > 0
        assert _op(r2, f"model.layers.{i}.mlp")["isolated"]["sqnr_db"] == math.inf  # downstream ops: own error 0
        int8 = _op(reports[8], f"model.layers.{i}.self_attn")["isolated"]["sqnr_db"]
        assert int8 > attn["isolated"]["sqnr_db"] + 20  # int8: far less error than int2
    assert {o["name"] for o in r2.operators if o["unit"]} == {f"model.layers.{i}.self_attn" for i in range(4)}
    assert reports[8].data["final_logits"]["kl"] < r2.data["final_logits"]["kl"] / 100
    assert r2.data["attention_probs_available"] == {"reference": True, "candidate": True}
    assert r2.data["candidate_runtime"][0]["config"]["bits"] == 2
    assert tiny4.config._attn_implementation == "sdpa"  # restored


def test_planted_kv_layer_is_ranked_first(tiny4, ids):
    per_layer = PerLayer({"model.layers.2.self_attn": _kv(2), "_default": _kv(8)})
    report = inspect(tiny4, tiny4, ids, InspectConfig(batch_size=2), candidate_runtime=per_layer)
    assert report.top(1)[0]["name"] == "model.layers.2.self_attn"
    assert report.data["timing"]["impact_units"] == 4
    assert [d["layers"] for d in report.data["candidate_runtime"]] == [[0, 1, 3], [2]]
    assert ("candidate runtime: KV cache int8 (group 8, residual 8) on layers 0-1,3; KV cache int2 (group 8, "
            "residual 8) on layers 2") in report.table()


def test_runtime_impact_equals_a_forward_with_that_layer_alone(tiny4, ids):
    report = inspect(tiny4, tiny4, ids, InspectConfig(batch_size=4, impact_samples=2), candidate_runtime=_kv(2))
    runtime = resolve_runtime(tiny4, _kv(2))
    with torch.no_grad():
        ref = tiny4(input_ids=ids[:2]).logits
        with runtime.context(tiny4, eager=False, layers=[1]):
            one = tiny4(input_ids=ids[:2]).logits
    expected = float(kl_from_logits(ref, one).mean())
    assert _op(report, "model.layers.1.self_attn")["impact"]["kl"] == pytest.approx(expected, rel=1e-4)


def test_exact_runtime_shows_no_error(tiny4, ids):
    # A window longer than the sequence: nothing is ever quantized, and the eager-exact path is bit-identical.
    report = inspect(tiny4, tiny4, ids, candidate_runtime=KVQuant(bits=2, residual=10_000))
    assert not any(o["unit"] for o in report.operators)
    assert report.data["final_logits"]["kl"] == 0.0 and report.data["final_logits"]["sqnr_db"] == math.inf


def test_sparse_prefill_keep_all_equals_reference(tiny4):
    ids = torch.randint(3, 256, (2, 64), generator=torch.Generator().manual_seed(4))
    dense = inspect(tiny4, tiny4, ids, candidate_runtime=SparsePrefillConfig())  # 64 ≤ dense_head: dense fall-back
    assert dense.data["final_logits"]["sqnr_db"] == math.inf and not any(o["unit"] for o in dense.operators)
    keep_all = SparsePrefillConfig(block_size=16, share_len=16, dense_head=0, keep_ratio=1.0, impl="reference")
    full = inspect(tiny4, tiny4, ids, InspectConfig(impact=False), candidate_runtime=keep_all)
    logits = full.data["final_logits"]
    # every causal block computed by the block kernel: equal up to fp32 summation order (KL 3.4e-9 on an AMD EPYC,
    # below 1e-9 on an Intel Xeon: the BLAS summation order differs)
    assert logits["sqnr_db"] > 100 and logits["kl"] < 1e-7
    sparse = SparsePrefillConfig(block_size=16, share_len=16, dense_head=0, keep_ratio=0.25, sink_blocks=0,
                                 tail_blocks=0, impl="reference")
    report = inspect(tiny4, tiny4, ids, InspectConfig(batch_size=2), candidate_runtime=sparse)
    top = report.top(1)[0]
    assert top["kind"] == "attention" and top["isolated"]["sqnr_db"] < 40
    assert _op(report, "model.layers.0.self_attn.q_proj")["isolated"]["sqnr_db"] == math.inf
    assert _op(report, f"{top['name']}.o_proj")["isolated"]["sqnr_db"] == math.inf


def test_weights_and_runtime_together(tiny4, ids):
    cand = copy.deepcopy(tiny4)
    plant(cand, "model.layers.1.self_attn.q_proj", "rtn2")
    report = inspect(tiny4, cand, ids, InspectConfig(batch_size=4), candidate_runtime=_kv(8))
    units = {o["name"] for o in report.operators if o["unit"]}
    assert units == {"model.layers.1.self_attn.q_proj"} | {f"model.layers.{i}.self_attn" for i in range(4)}
    assert report.top(1)[0]["name"] in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn")


def test_decode_only_and_bad_runtimes_are_refused(tiny4, ids):
    with pytest.raises(ConfigError, match="decode-only"):
        inspect(tiny4, tiny4, ids, candidate_runtime=DecodeBudget())
    with pytest.raises(ConfigError, match="quantized KV cache.*KVQuant config"):
        inspect(tiny4, tiny4, ids, candidate_runtime=build_method(tiny4, "kv", "int4"))
    with pytest.raises(ConfigError, match="decode-only"):
        inspect(tiny4, tiny4, ids, candidate_runtime=build_method(tiny4, "attn", "streaming"))
    with pytest.raises(ConfigError, match="matches no attention module"):
        inspect(tiny4, tiny4, ids, candidate_runtime=PerLayer({"model.layers.9.self_attn": _kv(2)}))
    with pytest.raises(ConfigError, match="PerLayer entry"):
        inspect(tiny4, tiny4, ids, candidate_runtime=PerLayer({"re:.*0.self_attn": _kv(2),
                                                               "_default": SparsePrefillConfig()}))
    with pytest.raises(ConfigError, match="both change attention in layers"):
        inspect(tiny4, tiny4, ids, candidate_runtime=[_kv(2), SparsePrefillConfig()])
    with pytest.raises(ConfigError, match="candidate_runtime got a"):
        inspect(tiny4, tiny4, ids, candidate_runtime=InspectConfig())
    with pytest.raises(ConfigError, match="not both"):
        inspect(tiny4, tiny4, ids, candidate_runtime=_kv(2), candidate_context=lambda m: None)
    with pytest.raises(ConfigError, match="head dim"):
        inspect(tiny4, tiny4, ids, candidate_runtime=KVQuant(bits=2, value_group_size=5))
    opaque = build_method(tiny4, "attn", "sparse-prefill", {"dense_head": 0, "block_size": 16, "share_len": 16})
    with pytest.raises(ConfigError, match="opaque"):
        inspect(tiny4, tiny4, ids, candidate_runtime=opaque)  # impact on by default
    report = inspect(tiny4, tiny4, ids, InspectConfig(impact=False), candidate_runtime=opaque)
    assert report.data["candidate_runtime"][0]["name"] == "sparse-prefill"


def test_cli_kv_and_attn(tmp_path, capsys):
    out = tmp_path / "kv.json"
    rc = main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "2", "--seqlen", "40",
               "--kv", "int2", "--kv-opt", "group_size=8", "--kv-opt", "residual=8", "-q", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["operators"][0]["kind"] == "attention" and data["operators"][0]["impact"]["kl"] > 0
    assert data["candidate_runtime"][0]["config"]["residual"] == 8 and data["kv"] == "int2"
    assert data["command"].endswith("--kv int2 --kv-opt group_size=8 --kv-opt residual=8")
    mixed = tmp_path / "mixed.json"  # the int2-mixed preset: its fields, overridable by --kv-opt
    assert main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "1", "--seqlen", "80",
                 "--kv", "int2-mixed", "--kv-opt", "group_size=8", "--kv-opt", "residual=8", "-q",
                 "--json", str(mixed)]) == 0
    cfg = json.loads(mixed.read_text())["candidate_runtime"][0]["config"]
    assert (cfg["key_allocation"], cfg["sinks"], cfg["meta_dtype"], cfg["group_size"]) == ("importance", 16, "int4", 8)
    assert main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "1", "--seqlen", "16",
                 "--attn", "streaming", "-q"]) == 2
    assert "decode-only" in capsys.readouterr().err
    for bad in (["--kv", "int3"], ["--kv-opt", "residual=8"], ["--kv", "int2", "--kv-opt", "residual"],
                ["--kv", "int2", "--kv-opt", "colour=3"], ["--attn-opt", "keep_ratio=0.5"]):
        assert main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "1", "--seqlen", "16",
                     "-q", *bad]) == 2, bad
    assert main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "1", "--seqlen", "64",
                 "--attn", "sparse-prefill", "--attn-opt", "dense_head=0", "--attn-opt", "block_size=16",
                 "--attn-opt", "share_len=16", "--attn-opt", "impl=reference", "-q",
                 "--json", str(tmp_path / "sp.json")]) == 0
    sp = json.loads((tmp_path / "sp.json").read_text())
    assert sp["candidate_runtime"][0]["kind"] == "attention" and sp["operators"][0]["kind"] == "attention"


# --- decode mode: decode-only sparse attention on its decode path ------------------------------------------

def _budget(cls=StreamingConfig, **kw):
    return cls(**{"keep": 4, "sink": 2, "recent": 4, "dense_first": 0, "dense_last": 0, **kw})


def test_decode_mode_locates_the_sparse_layer(tiny4):
    ids = torch.randint(3, 256, (2, 80), generator=torch.Generator().manual_seed(6))
    report = inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=12), candidate_runtime=_budget(
        OracleConfig, dense_layers=(0, 1, 3)))
    assert {o["name"] for o in report.operators if o["unit"]} == {"model.layers.2.self_attn"}
    top = report.top(1)[0]
    assert top["name"] == "model.layers.2.self_attn" and top["impact"]["kl"] > 0 and top["isolated"]["sqnr_db"] < 60
    for name in ("model.layers.1.self_attn", "model.layers.2.self_attn.q_proj", "model.embed_tokens"):
        assert _op(report, name)["accumulated"]["sqnr_db"] == math.inf  # dense layers run the reference's SDPA
    assert _op(report, "model.layers.3.self_attn")["accumulated"]["sqnr_db"] < 80  # downstream of the sparse one
    assert _op(report, "model.layers.3.self_attn")["isolated"]["sqnr_db"] == math.inf
    assert report.data["mode"].startswith("decode") and report.data["timing"]["impact_tokens"] == 24
    assert "StreamingConfig" not in report.table() and "OracleConfig (decode path, last 12 tokens)" in report.table()


def test_decode_mode_isolated_and_impact_equal_a_run_with_that_layer_alone(tiny4):
    import dataclasses

    from transformers import DynamicCache

    from compactlm.attention.runtime import sparse_attention

    ids = torch.randint(3, 256, (1, 72), generator=torch.Generator().manual_seed(7))
    budget = _budget()
    report = inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=10), candidate_runtime=budget)
    assert report.data["timing"]["impact_units"] == 4

    def decode(cfg):
        cache = DynamicCache(config=tiny4.config)
        with torch.no_grad():
            tiny4(ids[:, :62], cache=cache)
            with sparse_attention(tiny4, cfg) if cfg else contextlib.nullcontext():
                return torch.cat([tiny4(ids[:, j:j + 1], cache=cache).logits for j in range(62, 72)], 1)

    ref = decode(None)
    alone = decode(dataclasses.replace(budget, dense_layers=(0, 2, 3)))
    expected = float(kl_from_logits(ref, alone).mean())
    assert _op(report, "model.layers.1.self_attn")["impact"]["kl"] == pytest.approx(expected, rel=1e-4)
    every = decode(budget)
    assert report.data["final_logits"]["kl"] == pytest.approx(float(kl_from_logits(ref, every).mean()), rel=1e-4)


def test_decode_mode_errors(tiny4, ids):
    with pytest.raises(ConfigError, match="decode_tokens=N"):
        inspect(tiny4, tiny4, ids, candidate_runtime=_budget())
    with pytest.raises(ConfigError, match="decode-only attention config"):
        inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=4))
    with pytest.raises(ConfigError, match="decode-only attention config"):
        inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=4), candidate_runtime=_kv(2))
    cand = copy.deepcopy(tiny4)
    plant(cand, "model.layers.0.mlp.up_proj", "rtn2")
    with pytest.raises(ConfigError, match="weights differ"):
        inspect(tiny4, cand, ids, InspectConfig(decode_tokens=4), candidate_runtime=_budget())
    with pytest.raises(ConfigError, match="leaves no prefix"):
        inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=48), candidate_runtime=_budget())
    with pytest.raises(ConfigError, match="cannot be combined"):
        inspect(tiny4, tiny4, ids, InspectConfig(decode_tokens=4), candidate_runtime=[_budget(), _kv(2)])
    with pytest.raises(ConfigError, match="decode_tokens"):
        InspectConfig(decode_tokens=-1)


def test_cli_decode_mode(tmp_path):
    out = tmp_path / "d.json"
    opts = [x for kv in ("keep=4", "sink=2", "recent=4", "dense_first=1", "dense_last=0") for x in ("--attn-opt", kv)]
    assert main(["inspect", "tiny-llama", "tiny-llama", "--data", "random", "--samples", "1", "--seqlen", "64",
                 "--attn", "quest", *opts, "--decode-tokens", "8", "-q", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"].startswith("decode") and data["decode_tokens"] == 8
    assert {o["name"] for o in data["operators"] if o["unit"]} == {"model.layers.1.self_attn"}


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "gemma3", "qwen2_moe", "mixtral"])
def test_kv_store_on_other_families(family, ids):
    from compactlm.models import get_adapter, tiny_model

    model = tiny_model(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        adapter.linears(i)
    exact = inspect(model, model, ids, InspectConfig(impact=False), candidate_runtime=KVQuant(bits=2, residual=10**6))
    assert exact.data["final_logits"]["sqnr_db"] == math.inf and not any(o["unit"] for o in exact.operators)
    report = inspect(model, model, ids, InspectConfig(impact=False), candidate_runtime=_kv(2))
    names = {f"{adapter.layer_prefix(i)}.self_attn" for i in range(adapter.num_layers)}
    assert {o["name"] for o in report.operators if o["unit"]} == names


@pytest.mark.parametrize("options", [{}, {"meta_dtype": "int8"}, {"value_rotation": True},
                                     {"meta_dtype": "int8", "value_rotation": True, "sinks": 4},
                                     {"key_bits": 4}, {"value_bits": 4, "sinks": 4},
                                     {"clip_search": True}, {"meta_dtype": "int8", "clip_search": True, "sinks": 4},
                                     {"meta_dtype": "int4"}, {"meta_dtype": "int4", "sinks": 4, "pre_rope": False},
                                     {"key_allocation": "importance"},
                                     {"key_allocation": "importance", "meta_dtype": "int4", "sinks": 4}])
def test_simulated_store_equals_what_the_cache_holds(options):
    """The inspector's simulated store reproduces the cache's quantized rows for every storage format."""
    from compactlm.inspector.runtime import simulate_store
    from compactlm.kv.cache import QuantizedKVLayer

    cfg = KVQuant(bits=2, group_size=16, residual=16, **options)
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(1, 2, 84, 16, generator=g), torch.randn(1, 2, 84, 16, generator=g)
    weights = (2 * torch.randn(2, 16, generator=g)).exp() if cfg.key_allocation == "importance" else None
    layer = QuantizedKVLayer(cfg, query_weights=weights)
    layer.update(key, value)
    if weights is not None:
        assert set(layer.qk.bits().unique().tolist()) == {0, 2, 4}  # the widths really differ
    k_cache, v_cache = layer.materialize()
    k_sim, v_sim = simulate_store(key, value, cfg, query_weights=weights)
    stored = cfg.sinks + layer.qk.length  # sinks and the quantized store; the recent window is exact in both
    assert layer.qk.length >= 48
    torch.testing.assert_close(k_sim[..., :stored, :], k_cache[..., :stored, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_sim[..., :stored, :], v_cache[..., :stored, :], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_sim[..., cfg.sinks:stored, :], value[..., cfg.sinks:stored, :])  # it did quantize
