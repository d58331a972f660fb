import contextlib
import copy
import json
import math

import pytest
import torch
from inspector_helpers import candidate, plant, rtn_

import compactlm
from compactlm.errors import ConfigError, DataError
from compactlm.inspector import InspectConfig, inspect
from compactlm.inspector.capture import discover_operators
from compactlm.inspector.impact import consumer_impact, select_units
from compactlm.inspector.metrics import kl_from_logits


def _op(report, name):
    return next(o for o in report.operators if o["name"] == name)


@pytest.mark.parametrize("name,fault", [
    ("model.layers.2.self_attn.q_proj", "rtn2"),
    ("model.layers.0.mlp.down_proj", "rtn2"),
    ("model.layers.3.self_attn.v_proj", "scale100"),
    ("model.layers.1.mlp.gate_proj", "scale100"),
])
def test_planted_fault_ranked_first(tiny4, ids, name, fault):
    report = inspect(tiny4, candidate(tiny4, name, fault), ids, InspectConfig(batch_size=2))
    top = report.top(1)[0]
    assert top["name"] == name and top["rank"] == 1
    assert top["impact"]["kl"] > 0 and "impact_kl" in top["risk"] or top["impact"]["kl"] <= 0.01
    assert report.data["timing"]["impact_units"] == 1  # only the differing operator is swapped


def test_planted_fault_stands_out_over_background_quantization(tiny4, ids):
    cand = copy.deepcopy(tiny4)
    for lin in [m for n, m in cand.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]:
        rtn_(lin.weight, 8)
    plant(cand, "model.layers.1.self_attn.o_proj", "rtn2")
    report = inspect(tiny4, cand, ids, InspectConfig(batch_size=4))
    assert report.data["timing"]["impact_units"] == 28  # every quantized linear differs
    assert report.top(1)[0]["name"] == "model.layers.1.self_attn.o_proj"


def test_isolated_vs_accumulated(tiny4, ids):
    name = "model.layers.0.self_attn.q_proj"
    report = inspect(tiny4, candidate(tiny4, name, "rtn2"), ids, InspectConfig(impact=False))
    down = _op(report, "model.layers.2.mlp.down_proj")
    assert down["isolated"]["sqnr_db"] == math.inf  # unchanged operator: its own error is zero
    assert down["accumulated"]["sqnr_db"] < 80  # but it sees the upstream error
    q = _op(report, name)
    assert q["isolated"]["sqnr_db"] == pytest.approx(q["accumulated"]["sqnr_db"])  # same input before the fault
    probs = _op(report, "model.layers.0.self_attn.probs")
    assert probs["isolated"]["kl"] > 0 and probs["accumulated"]["kl"] > 0
    assert _op(report, "model.layers.0.self_attn.k_proj")["isolated"]["sqnr_db"] == math.inf
    logits = _op(report, "lm_head")
    assert logits["accumulated"]["kl"] > 0 and logits["isolated"]["sqnr_db"] == math.inf
    assert report.top(1)[0]["name"] == name  # without impact, units rank by isolated error


def test_identical_models_have_no_differing_operator(tiny_llama, ids):
    report = compactlm.inspect(tiny_llama, copy.deepcopy(tiny_llama), ids)
    assert not any(o["unit"] for o in report.operators)
    assert report.data["final_logits"]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert "no operator differs" in report.table()


def test_impact_with_skipped_prefix_equals_full_forward(tiny4, ids):
    name = "model.layers.2.mlp.up_proj"
    cand = candidate(tiny4, name, "rtn2")
    ops = discover_operators(tiny4)
    units = select_units(ops, {name: True, "model.layers.2.mlp": True, "model.layers.2": True})
    assert [u.name for u in units] == [name]
    fast = consumer_impact(tiny4, cand, units, ids)[name]
    with torch.no_grad():
        expected = kl_from_logits(tiny4(ids).logits, cand(ids).logits).mean()
    assert fast.kl == pytest.approx(float(expected), rel=1e-4)
    assert tiny4.model.layers[0].forward.__func__ is type(tiny4.model.layers[0]).forward  # restored
    assert tiny4.get_submodule(name) is not cand.get_submodule(name)


@pytest.mark.parametrize("family,name", [
    ("qwen2_moe", "model.layers.1.mlp.experts.experts.2.down_proj"),
    ("mixtral", "model.layers.0.mlp.experts.experts.1.up_proj"),
    ("gemma3", "model.layers.2.mlp.down_proj"),
    ("qwen3", "model.layers.1.self_attn.k_proj"),
])
def test_other_families(family, name, ids):
    from compactlm.models import get_adapter, tiny_model

    ref = tiny_model(family)
    adapter = get_adapter(ref)
    for i in range(adapter.num_layers):
        adapter.linears(i)  # unfuse MoE experts before copying, so the fault lands on a named linear
    report = inspect(ref, candidate(ref, name, "scale100"), ids, InspectConfig(batch_size=4))
    assert report.top(1)[0]["name"] == name
    kinds = {o["kind"] for o in report.operators}
    assert {"linear", "norm", "attention", "attention_probs", "mlp", "layer", "logits"} <= kinds
    if family in ("qwen2_moe", "mixtral"):
        assert {"experts", "router"} <= kinds


def test_runtime_attention_candidate(tiny_llama, ids):
    """A candidate that changes only attention compute (as sparse attention does) is located at that layer."""
    from compactlm.attention.runtime import attention_override

    def scaled(module, q, k, v, mask, scaling, fallback, **kw):
        out, w = fallback(module, q, k, v, mask, scaling=scaling, **kw)
        return out * 1.2, w

    @contextlib.contextmanager
    def ctx(model):
        with attention_override(model, {1: scaled}):
            yield

    with pytest.raises(ConfigError, match="--no-impact"):
        inspect(tiny_llama, tiny_llama, ids, candidate_context=ctx)
    report = inspect(tiny_llama, tiny_llama, ids, InspectConfig(impact=False), candidate_context=ctx)
    assert report.top(1)[0]["name"] == "model.layers.1.self_attn"
    assert _op(report, "model.layers.1.self_attn.o_proj")["isolated"]["sqnr_db"] == math.inf
    assert report.data["attention_probs_available"] == {"reference": True, "candidate": False}
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored


def test_reports_written(tiny4, ids, tmp_path):
    name = "model.layers.1.self_attn.k_proj"
    report = inspect(tiny4, candidate(tiny4, name, "rtn2"), ids)
    report.write_json(tmp_path / "r.json")
    report.write_csv(tmp_path / "r.csv")
    report.write_html(tmp_path / "r.html")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    ops = data["operators"]
    assert ops[0]["name"] == name and set(ops[0]) >= {"name", "isolated", "accumulated", "impact"}
    kls = [o["impact"]["kl"] for o in ops if o["impact"]]
    assert kls == sorted(kls, reverse=True)
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv_lines) == len(ops) + 1 and name in csv_lines[1]
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") >= 3 and name in html
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_bad_inputs(tiny_llama, ids):
    from compactlm.models import tiny_model

    with pytest.raises(ConfigError, match="different architectures"):
        inspect(tiny_llama, tiny_model("qwen2"), ids)
    with pytest.raises(ConfigError, match="different architectures"):
        inspect(tiny_llama, tiny_model("llama", num_hidden_layers=3), ids)
    with pytest.raises(DataError, match="integer tensor"):
        inspect(tiny_llama, tiny_llama, torch.randn(2, 8))
    with pytest.raises(DataError, match="at least one batch"):
        inspect(tiny_llama, tiny_llama, [])
    for bad in (dict(impact_samples=0), dict(batch_size=0), dict(warn_impact_kl=-1.0), dict(impact_top=-2)):
        with pytest.raises(ConfigError):
            InspectConfig(**bad)


def test_config_round_trip():
    from compactlm.config import BaseConfig
    from compactlm.inspector import GateConfig

    for cfg in (InspectConfig(impact=False, warn_sqnr_db=15.0), GateConfig(max_kl=0.1, windows=8)):
        assert BaseConfig.from_json(cfg.to_json()) == cfg


def test_impact_top_swaps_only_the_largest_isolated_errors(tiny_llama):
    cand = copy.deepcopy(tiny_llama)
    for lin in [m for n, m in cand.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]:
        rtn_(lin.weight, 8)
    plant(cand, "model.layers.0.mlp.up_proj", "scale100")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    report = inspect(tiny_llama, cand, ids, InspectConfig(impact_top=3, batch_size=2))
    assert report.data["timing"]["impact_units"] == 3
    assert sum(o["unit"] for o in report.operators) == 14  # every differing linear is still a unit
    assert sum(o["impact"] is not None for o in report.operators) == 3
    assert report.top(1)[0]["name"] == "model.layers.0.mlp.up_proj"
