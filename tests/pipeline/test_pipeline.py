"""`compactlm compress` end to end on a tiny model: folder contents, kill + resume, the recipe's runtime."""

import json

import pytest
import torch
import yaml

from compactlm.errors import ConfigError
from compactlm.models import tiny_model
from compactlm.pipeline import compress_to_folder, load_compressed
from compactlm.recipes import parse_recipe
from compactlm.recipes.runtime import cache_bytes, recipe_method

TINY = yaml.safe_dump({"name": "tiny-aptq+kv4+sals", "steps": [
    {"type": "APTQ", "avg_bits": 3.0, "bits_menu": [2, 4], "group_size": 32, "probes": 2, "batch_size": 2},
    {"type": "kv", "bits": 4, "group_size": 16, "residual": 16},
    {"type": "sals", "rank": 0.5, "keep": 0.5, "sink": 2, "recent": 4, "dense_first": 0, "dense_last": 1},
    {"type": "export", "format": "compactlm"}]})


class Interrupt(Exception):
    pass


def _calib():
    return torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_compress_writes_the_folder_and_a_killed_run_resumes_identically(tmp_path):
    recipe = parse_recipe(TINY)
    quiet = lambda _m: None  # noqa: E731
    ref = compress_to_folder("tiny-llama", recipe, tmp_path / "ref", calib=_calib(), log=quiet)
    for name in ("model/model.safetensors", "model/sals_projections.safetensors", "recipe.yaml", "choices.json",
                 "report.json", "report.html"):
        assert (tmp_path / "ref" / name).is_file(), name
    choices = json.loads((tmp_path / "ref" / "choices.json").read_text())
    assert choices["avg_bits"] == pytest.approx(3.0) and set(choices["bits"].values()) == {2, 4}
    assert ref["evaluation"]["weights_MiB"]["compressed"] < ref["evaluation"]["weights_MiB"]["base"]

    calls = {"n": 0}

    def kill(i):
        calls["n"] += 1
        if calls["n"] == 3:  # after layer 0 of the second driver call (APTQ's GPTQ pass)
            raise Interrupt

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        compress_to_folder("tiny-llama", recipe, out, calib=_calib(), after_layer=kill, log=quiet)
    assert not out.exists() and (tmp_path / "run.partial").is_dir()  # nothing half-written
    report = compress_to_folder("tiny-llama", recipe, out, calib=_calib(), log=quiet)
    assert report["resumed"] and not (tmp_path / "run.partial").exists()
    assert (out / "model/model.safetensors").read_bytes() == (tmp_path / "ref/model/model.safetensors").read_bytes()

    with pytest.raises(ConfigError, match="different model/recipe"):
        (tmp_path / "x.partial").mkdir()
        (tmp_path / "x.partial" / "run.json").write_text("{}")
        compress_to_folder("tiny-llama", recipe, tmp_path / "x", calib=_calib(), log=quiet)

    model, _, method = load_compressed(out)
    ids = torch.randint(3, 256, (1, 40))
    with torch.no_grad(), method.attach(model):
        cache = method.make_cache(model, None)
        out1 = model(ids, cache=cache, use_cache=True)
        step = model(ids[:, -1:], cache=out1.past_key_values, use_cache=True)
    assert torch.isfinite(step.logits).all()


def test_hybrid_cache_is_smaller_and_decodes_close_to_dense():
    from compactlm.attention.sals_calib import calibrate_sals
    from compactlm.evaluation.generate import prefill

    model = tiny_model("llama", seed=0, num_hidden_layers=3).eval()
    calibrate_sals(model, _calib())
    recipe = parse_recipe(yaml.safe_dump({"steps": [
        {"type": "kv", "bits": 8, "group_size": 16, "residual": 16},
        {"type": "sals", "rank": 1.0, "score_dims": 1.0, "keep": 1.0, "sink": 2, "recent": 4, "dense_first": 1,
         "dense_last": 1}]}))
    method = recipe_method(model, recipe)
    ids = torch.randint(3, 256, (1, 64))
    full, _ = prefill(model, ids[:, :-1])
    dense_bytes = cache_bytes(full)
    with torch.no_grad():
        ref = model(ids[:, -1:], cache=full, use_cache=True).logits
        with method.attach(model):
            cache = method.make_cache(model, prefill(model, ids[:, :-1])[0])
            assert [type(layer).__name__ for layer in cache.layers] == ["QuantizedKVLayer", "SALSLayer",
                                                                       "QuantizedKVLayer"]
            assert cache_bytes(cache) < dense_bytes
            got = model(ids[:, -1:], cache=cache, use_cache=True).logits
    # full rank, keep everything, 8-bit KV on the dense layers: close to the dense decode
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.default_model
def test_report_measures_every_figure_on_the_default_model(tmp_path):
    """The report path that needs a tokenizer (PPL, RULER-syn on bf16 copies, KV bytes, speed) end to end, small."""
    recipe = parse_recipe(yaml.safe_dump({
        "name": "smoke-rtn4+kv4", "steps": [{"type": "rtn", "bits": 4, "group_size": 64},
                                           {"type": "kv", "bits": 4, "group_size": 32, "residual": 32}],
        "evaluate": {"ppl_windows": 2, "ruler_lengths": [256], "ruler_samples": 1, "ruler_tasks": ["passkey"],
                     "speed_prefill": 128, "speed_decode": 4}}))
    report = compress_to_folder("smollm2-135m", recipe, tmp_path / "out", log=lambda _m: None)
    ev = report["evaluation"]
    assert ev["ppl"]["base"] < ev["ppl"]["compressed"] < 10 * ev["ppl"]["base"]
    assert ev["ruler"]["dtype"] == "bf16" and set(ev["ruler"]["methods"]) == {"base", "weights_only", "compressed"}
    assert all(0 <= m["score"] <= 100 for m in ev["ruler"]["methods"].values())
    speed = ev["speed"]
    # 96 of the 128 prefilled tokens are stored in 4 bits (the last 32 stay in bf16): well under 0.6x of bf16's bytes
    assert speed["compressed"]["kv_bytes_per_token"] < 0.6 * speed["base"]["kv_bytes_per_token"]
    assert all(speed[k]["decode_tok_s"] > 0 for k in ("base", "weights_only", "compressed"))
    assert (tmp_path / "out" / "report.html").is_file()
