"""``compactlm generate`` / ``eval ruler`` / ``eval ppl-decode`` end to end on a tiny model with a real tokenizer."""

from __future__ import annotations

import json

import pytest

from compactlm.cli import main


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny Llama (4K context) with the default model's tokenizer and chat template, as a folder."""
    from transformers import AutoTokenizer

    from compactlm.models import default_model_dir, tiny_model

    folder = tmp_path_factory.mktemp("tinylong")
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_generate_prints_only_the_text(tiny_with_tokenizer, capsys):
    rc = main(["generate", tiny_with_tokenizer, "--kv", "int2", "--prompt", "Hello there", "--max-new-tokens", "4",
               "-q"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.endswith("\n") and out.out.count("\n") <= 5
    assert "kv-int2" in out.err  # what ran is reported on stderr, never stdout


def _ruler_json(model: str, tmp_path, *options: str) -> dict:
    """``compactlm eval ruler`` at 1K on ``model`` with ``options``; its JSON (the run must succeed)."""
    out = tmp_path / "r.json"
    assert main(["eval", "ruler", model, "--lengths", "1k", *options, "--json", str(out), "-q"]) == 0
    return json.loads(out.read_text())


def test_eval_ruler_json_has_full_beside(tiny_with_tokenizer, tmp_path):
    data = _ruler_json(tiny_with_tokenizer, tmp_path, "--kv", "int4", "--samples", "1",
                       "--tasks", "passkey,niah_single", "--max-new-tokens", "3")
    assert set(data["methods"]) == {"full", "kv-int4-g32-r128"}
    for m in data["methods"].values():
        assert 0 <= m["score"] <= 100 and set(m["tasks"]) == {"passkey", "niah_single"}
    assert data["command"].startswith("compactlm eval ruler") and "machine" in data
    assert data["sample_indices"] is None


def test_eval_ruler_sample_indices_runs_a_part(tiny_with_tokenizer, tmp_path):
    data = _ruler_json(tiny_with_tokenizer, tmp_path, "--samples", "4", "--sample-indices", "1::2",
                       "--tasks", "passkey", "--max-new-tokens", "2")
    assert data["sample_indices"] == [1, 3] and sorted(r["index"] for r in data["records"]) == [1, 3]
    assert "--sample-indices 1::2" in data["command"]


def test_eval_ppl_decode_json(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "p.json"
    rc = main(["eval", "ppl-decode", tiny_with_tokenizer, "--kv", "int8", "--windows", "1", "--window-len", "300",
               "--decoded", "8", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    full, q = data["methods"]["full"]["ppl"], data["methods"]["kv-int8-g32-r128"]["ppl"]
    assert data["methods"]["full"]["tokens"] == 8 and abs(q / full - 1) < 0.02


@pytest.mark.parametrize("argv, message", [
    (["eval", "ruler", "tiny-llama", "--lengths", "2q"], "lengths"),
    (["eval", "ruler", "tiny-llama", "--tasks", "bogus"], "task"),
    (["eval", "ruler", "tiny-llama"], "tokenizer"),
    (["eval", "ruler", "tiny-llama", "--samples", "4", "--sample-indices", "4"], "outside 0..3"),
    (["generate", "tiny-llama", "--prompt", "hi", "--kv", "int2,int4"], "one method"),
    (["generate", "tiny-llama", "--prompt-file", "/nonexistent/p.txt"], "does not exist"),
    (["generate", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compactlm: error:") and message in err


def test_unknown_method_names_the_choices(tiny_with_tokenizer, capsys):
    assert main(["generate", tiny_with_tokenizer, "--kv", "int3", "--prompt", "hi", "-q"]) == 2
    err = capsys.readouterr().err
    assert "int3" in err and "int2" in err and "int4" in err
