"""The llm-compressor pruning side-by-side driver's own logic: setting parsing and the N:M validity count."""

import importlib.util
from pathlib import Path

import pytest

import compactlm
from compactlm.errors import ConfigError
from compactlm.prune import Magnitude

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "llmc_prune_side_by_side.py"
_spec = importlib.util.spec_from_file_location("llmc_prune_side_by_side", _PATH)
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


@pytest.mark.parametrize(("pattern", "llmc_structure", "label", "sparsity"), [
    ("2:4", "2:4", "2of4", 0.5),
    ("4:8", "4:8", "4of8", 0.5),
    ("3:8", "5:8", "3of8", 0.625),  # llm-compressor's "a:b" counts the pruned weights, ours the kept ones
])
def test_pattern_maps_to_llmc_mask_structure(pattern, llmc_structure, label, sparsity):
    s = driver.parse_setting(None, pattern)
    assert s["llmc"] == {"sparsity": sparsity, "mask_structure": llmc_structure}
    assert s["ours"] == {"pattern": pattern} and s["label"] == label and s["nm"] == [int(x) for x in pattern.split(":")]


def test_unstructured_default_and_label():
    assert driver.parse_setting(None, None)["llmc"] == {"sparsity": 0.5, "mask_structure": "0:0"}
    s = driver.parse_setting(0.3, None)
    assert s["label"] == "30pct" and s["ours"] == {"sparsity": 0.3} and s["nm"] is None


@pytest.mark.parametrize(("sparsity", "pattern", "match"), [
    (0.5, "2:4", "not both"), (1.0, None, "--sparsity"), (0.0, None, "--sparsity"),
    (None, "4:2", "0 < N < M"), (None, "2-4", "N:M"),
])
def test_bad_settings_raise(sparsity, pattern, match):
    with pytest.raises(ConfigError, match=match):
        driver.parse_setting(sparsity, pattern)


def test_nm_validity_counts_groups_and_catches_a_broken_one(tiny_llama):
    compactlm.prune(tiny_llama, Magnitude(pattern="2:4"))
    ok = driver.nm_validity(tiny_llama, 2, 4)
    assert ok["all_valid"] and ok["groups"] > 0 and ok["valid_groups"] == ok["groups"]
    assert ok["exact_groups"] == ok["groups"]  # random weights: no kept weight is exactly 0
    assert driver.nm_validity(tiny_llama, 4, 8)["all_valid"]  # 2:4 implies 4:8
    assert abs(driver.decoder_sparsity(tiny_llama) - 0.5) < 1e-9
    w = tiny_llama.model.layers[0].mlp.down_proj.weight
    w.data[0, :4] = 1.0  # one group of 4 now has 4 non-zeros
    broken = driver.nm_validity(tiny_llama, 2, 4)
    assert not broken["all_valid"] and broken["valid_groups"] == ok["groups"] - 1


def _earlier(tmp_path, setting, rows, ppl="PPL-wiki-512-q (40 windows)"):
    path = tmp_path / "earlier.json"
    path.write_text(__import__("json").dumps({
        "command": "python benchmarks/llmc_prune_side_by_side.py ...", "machine": {"date": "2026-12-05"},
        "protocol": {"ppl": ppl, "calibration": "CALIB-pg-512-q (32 x 512)", "sparsity": setting["sparsity"],
                     "structure": setting["structure"]},
        "rows": [{"method": m, "ours": {"tool": "compactlm", "ppl": p}} for m, p in rows.items()]}))
    return str(path)


def test_ours_from_reuses_matching_rows_and_says_so(tmp_path):
    setting = driver.parse_setting(None, "2:4")
    args = driver.argparse.Namespace(windows=40, nsamples=32)
    path = _earlier(tmp_path, setting, {"wanda": 206.44, "sparsegpt": 124.54})
    rows = driver._earlier_ours(path, setting, ["sparsegpt"], args)
    assert list(rows) == ["sparsegpt"] and rows["sparsegpt"]["ppl"] == 124.54
    assert rows["sparsegpt"]["reused_from"]["json"] == path


def test_ours_from_refuses_another_setting_protocol_or_method(tmp_path):
    args = driver.argparse.Namespace(windows=40, nsamples=32)
    path = _earlier(tmp_path, driver.parse_setting(None, "2:4"), {"wanda": 206.44})
    with pytest.raises(ConfigError, match="protocol differs"):
        driver._earlier_ours(path, driver.parse_setting(None, "4:8"), ["wanda"], args)
    with pytest.raises(ConfigError, match="protocol differs"):
        driver._earlier_ours(path, driver.parse_setting(None, "2:4"), ["wanda"],
                             driver.argparse.Namespace(windows=200, nsamples=32))
    with pytest.raises(ConfigError, match="no compactlm row"):
        driver._earlier_ours(path, driver.parse_setting(None, "2:4"), ["sparsegpt"], args)


def test_head_check_catches_a_pruned_tied_head(tiny_llama):
    before = driver.head_snapshot(tiny_llama)
    compactlm.prune(tiny_llama, Magnitude(sparsity=0.5))  # ours leaves lm_head and embeddings dense
    ok = driver.head_check(tiny_llama, before)
    assert ok["head_unchanged"] == {"output": True, "input": True}
    head = tiny_llama.get_output_embeddings().weight
    with __import__("torch").no_grad():
        head[0, :3] = 0.0  # what llm-compressor did with ignore=["lm_head"]
    bad = driver.head_check(tiny_llama, before)
    assert not bad["head_unchanged"]["output"] and bad["head_zero_fraction"]["output"] > 0
