"""CLI: compactlm recipes / compress (validation paths) / report."""

import json

from compactlm.cli import main

from .test_report import CHOICES, REPORT


def test_recipes_lists_the_shipped_ones(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "aptq-2.5bit+kv4+sals: APTQ -> KVQuant -> SALSConfig -> Export" in out


def test_compress_validates_before_loading(capsys, tmp_path):
    assert main(["compress", "smollm2-135m", "--recipe", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [{type: kv, bits: 4}, {type: gptq, bits: 4}]\n")
    assert main(["compress", "no-such-model", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "quantize step after a kv step" in capsys.readouterr().err  # the model is never looked at
    assert main(["compress", "smollm2-135m", "--recipe", "w4-g64", "--validate-only"]) == 0
    assert main(["compress", "tiny-llama", "--recipe", "w4-g64", "--out", str(tmp_path / "t")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_report_command_writes_the_page(capsys, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    (tmp_path / "choices.json").write_text(json.dumps(CHOICES))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recipe aptq-2.5bit+kv4+sals" in out and (tmp_path / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
