"""APTQ sensitivity cache: reuse across budgets, bit-identical results, fingerprint errors, corrupt and atomic files."""

import dataclasses
import json

import pytest
import torch

import compactlm
from compactlm.errors import ConfigError, DataError
from compactlm.models import tiny_model
from compactlm.quant import APTQ, aptq_cache
from compactlm.quant import aptq as aptq_mod

CALIB = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
CFG = APTQ(avg_bits=3.0, group_size=16, bits_menu=(2, 3, 4))


@pytest.fixture
def passes(monkeypatch):
    """Counts of the loss-gradient pass and the sensitivity pass (the two steps a cache skips)."""
    calls = {"gradients": 0, "sensitivity": 0}
    grads, run = aptq_mod.output_gradient_moments, aptq_mod.SensitivityRun.run

    def count_grads(*a, **k):
        calls["gradients"] += 1
        return grads(*a, **k)

    def count_run(self, *a, **k):
        calls["sensitivity"] += 1
        return run(self, *a, **k)

    monkeypatch.setattr(aptq_mod, "output_gradient_moments", count_grads)
    monkeypatch.setattr(aptq_mod.SensitivityRun, "run", count_run)
    return calls


def quantized(cfg, calib=CALIB, model=None, **options):
    model = tiny_model("llama") if model is None else model
    report: dict = {}
    compactlm.quantize(model, cfg, calib=calib, report=report, **options)
    return model.state_dict(), report


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_a_cache_is_written_then_reused_with_bit_identical_results(tmp_path, passes):
    path = tmp_path / "sens.json"
    plain_state, plain = quantized(CFG)  # no cache: today's behaviour
    assert plain["sensitivity_source"]["source"] == "computed" and plain["sensitivity_source"]["cache"] is None
    assert passes == {"gradients": 1, "sensitivity": 1}
    first_state, first = quantized(CFG, sensitivity_cache=path)
    assert path.is_file() and first["sensitivity_source"]["source"] == "computed"
    assert passes == {"gradients": 2, "sensitivity": 2}
    again_state, again = quantized(CFG, sensitivity_cache=str(path))
    assert passes == {"gradients": 2, "sensitivity": 2}  # neither pass ran
    src = again["sensitivity_source"]
    assert src["source"] == "loaded" and src["cache"] == str(path) and src["made"]["sensitivity_cpu_seconds"] > 0
    assert plain["sensitivity"] == first["sensitivity"] == again["sensitivity"]  # exact floats through JSON
    assert plain["allocation"] == first["allocation"] == again["allocation"]
    assert plain["estimated_cost"] == again["estimated_cost"]
    assert_same_state(plain_state, first_state)
    assert_same_state(plain_state, again_state)


def test_one_cache_serves_other_budgets_pins_and_fused_sharing(tmp_path, passes):
    path = tmp_path / "sens.json"
    quantized(CFG, sensitivity_cache=path)
    other = dataclasses.replace(CFG, avg_bits=2.5, share_fused=False, pin={r".*layers\.0\.mlp\.down_proj": 4})
    scratch_state, scratch = quantized(other)
    assert passes == {"gradients": 2, "sensitivity": 2}
    cached_state, cached = quantized(other, sensitivity_cache=path)
    assert passes == {"gradients": 2, "sensitivity": 2}
    assert cached["sensitivity_source"]["source"] == "loaded"
    assert cached["allocation"] == scratch["allocation"]
    assert cached["allocation"] != quantized(CFG, sensitivity_cache=path)[1]["allocation"]  # really another budget
    assert_same_state(scratch_state, cached_state)


def test_layer_mode_is_cached_too_and_checks_its_own_fields(tmp_path, passes):
    path = tmp_path / "layer.json"
    cfg = dataclasses.replace(CFG, sensitivity="layer")
    state, rep = quantized(cfg, sensitivity_cache=path)
    state2, rep2 = quantized(dataclasses.replace(cfg, avg_bits=3.0), sensitivity_cache=path)
    assert passes == {"gradients": 0, "sensitivity": 1} and rep2["allocation"] == rep["allocation"]
    assert_same_state(state, state2)
    with pytest.raises(ConfigError, match=r"made with probes 8, this run asks for 4"):
        quantized(dataclasses.replace(cfg, probes=4), sensitivity_cache=path)
    with pytest.raises(ConfigError, match=r"made with sensitivity 'layer', this run asks for 'loss'"):
        quantized(CFG, sensitivity_cache=path)


def test_changed_weights_calibration_or_menu_are_clear_errors(tmp_path, passes):
    path = tmp_path / "sens.json"
    quantized(CFG, sensitivity_cache=path)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(DataError, match=r"other weights: 1 tensor\(s\) differ \(model\.layers\.1\.mlp\.up_proj\.w"):
        quantized(CFG, model=model, sensitivity_cache=path)
    model = tiny_model("llama")
    with torch.no_grad():  # not a target: the loss gradient still goes through it
        model.model.norm.weight[0] = 2.0
    with pytest.raises(DataError, match=r"model\.norm\.weight"):
        quantized(CFG, model=model, sensitivity_cache=path)
    calib = CALIB.clone()
    calib[0, 0] += 1
    with pytest.raises(DataError, match="other calibration data .same shape, other token ids"):
        quantized(CFG, calib=calib, sensitivity_cache=path)
    with pytest.raises(DataError, match=r"other calibration data .shape \[4, 32\] vs \[3, 32\]"):
        quantized(CFG, calib=CALIB[:3], sensitivity_cache=path)
    with pytest.raises(ConfigError, match=r"made with bits_menu \(2, 3, 4\), this run asks for \(2, 4\)"):
        quantized(dataclasses.replace(CFG, bits_menu=(2, 4)), sensitivity_cache=path)
    with pytest.raises(ConfigError, match=r"made with group_size 16, this run asks for 32"):
        quantized(dataclasses.replace(CFG, group_size=32), sensitivity_cache=path)
    with pytest.raises(DataError, match=r"other target linears .made for linears this run does not quantize: "
                                        r"model\.layers\.0\.mlp\.down_proj"):
        quantized(dataclasses.replace(CFG, ignore=(r".*0\.mlp\.down_proj",)), sensitivity_cache=path)
    with pytest.raises(DataError, match=r"another architecture config \(keys rms_norm_eps differ"):
        quantized(CFG, model=tiny_model("llama", rms_norm_eps=1e-3), sensitivity_cache=path)
    assert passes == {"gradients": 1, "sensitivity": 1}  # every mismatch failed before any pass ran
    # A field that does not change the 'loss' sensitivity is shared: q/k/v Hessians only matter in the GPTQ pass.
    rep = quantized(dataclasses.replace(CFG, attention_aware=False, probes=2), sensitivity_cache=path)[1]
    assert rep["sensitivity_source"]["source"] == "loaded"


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "cannot be read .JSONDecodeError.*corrupt or truncated"),
    (lambda text: "", "cannot be read"),
    (lambda text: json.dumps({"hello": 1}), "is not an APTQ sensitivity cache"),
    (lambda text: text.replace('"version": 1', '"version": 99'), "format version 99"),
    (lambda text: json.dumps({**json.loads(text), "fingerprint": []}), "is incomplete"),
    (lambda text: json.dumps({**json.loads(text), "sensitivity": {"x": {"2": "a"}}}), "malformed entry for x"),
    (lambda text: json.dumps({**json.loads(text), "sensitivity": {}}), "lacks the sensitivities of model.layers.0"),
])
def test_a_corrupt_file_is_a_clear_error_naming_it(tmp_path, damage, message):
    path = tmp_path / "sens.json"
    quantized(CFG, sensitivity_cache=path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(DataError, match=message) as err:
        quantized(CFG, sensitivity_cache=path)
    assert str(path) in str(err.value)


def test_the_file_is_written_atomically(tmp_path, monkeypatch, passes):
    path = tmp_path / "cache" / "sens.json"

    def failing_dump(obj, fh, **kwargs):
        fh.write('{"format": "compactlm.aptq-sensitivity", "sensi')  # a partial write, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("compactlm.utils.json.dump", failing_dump)
    with pytest.raises(OSError, match="No space left"):
        quantized(CFG, sensitivity_cache=path)
    assert not path.exists() and list(path.parent.iterdir()) == []  # no partial file, no temporary left behind
    monkeypatch.undo()
    quantized(CFG, sensitivity_cache=path)
    assert json.loads(path.read_text())["format"] == aptq_cache.FORMAT


def test_a_folder_or_unwritable_place_fails_before_any_pass(tmp_path, passes):
    with pytest.raises(ConfigError, match="is a folder"):
        quantized(CFG, sensitivity_cache=tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="folder cannot be created"):
        quantized(CFG, sensitivity_cache=blocker / "sub" / "sens.json")
    assert passes == {"gradients": 0, "sensitivity": 0}


def test_every_aptq_field_is_classified_for_the_fingerprint():
    """A new APTQ field must be placed in aptq_cache's lists: otherwise a cache could serve a run it does not fit."""
    listed = (set(aptq_cache.NOT_SENSITIVITY) | set(aptq_cache.SENSITIVITY_ALWAYS) | set(aptq_cache.SENSITIVITY_LOSS)
              | set(aptq_cache.SENSITIVITY_LOSS_GPTQ) | set(aptq_cache.SENSITIVITY_LAYER))
    assert listed == {f.name for f in dataclasses.fields(APTQ)}
    assert set(aptq_cache.NOT_SENSITIVITY).isdisjoint(listed - set(aptq_cache.NOT_SENSITIVITY))
    assert "avg_bits" not in aptq_cache.sensitivity_fields(CFG) and "pin" not in aptq_cache.sensitivity_fields(CFG)
    assert "damp" not in aptq_cache.sensitivity_fields(dataclasses.replace(CFG, sensitivity_quantizer="rtn"))


def test_quantize_cli_sensitivity_cache(tmp_path, monkeypatch):
    from compactlm.cli import build_parser, main
    from compactlm.cli.quantize import build_config

    with pytest.raises(ConfigError, match="--sensitivity-cache is for --method aptq"):
        build_config(build_parser().parse_args(["quantize", "m", "--out", "x", "--method", "gptq",
                                                "--sensitivity-cache", "s.json"]))

    class Tok:  # just enough tokenizer for the CLI: calibration is replaced below, saving writes nothing
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr("compactlm.models.load", lambda spec, dtype=None: (tiny_model("llama"), Tok()))
    monkeypatch.setattr("compactlm.data.calibration_set", lambda *a, **k: CALIB)
    cache = tmp_path / "sens.json"
    sources = []
    for avg in ("3.0", "2.5"):
        js = tmp_path / f"r{avg}.json"
        rc = main(["quantize", "tiny-llama", "--method", "aptq", "--avg-bits", avg, "--bits-menu", "2,3,4",
                   "--group-size", "16", "--sensitivity-cache", str(cache), "--out", str(tmp_path / avg),
                   "--json", str(js), "-q"])
        assert rc == 0
        data = json.loads(js.read_text())
        assert data["avg_bits"] == float(avg)
        sources.append(data["sensitivity_source"])
    assert [s["source"] for s in sources] == ["computed", "loaded"] and sources[1]["cache"] == str(cache)
