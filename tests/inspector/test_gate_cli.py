import copy
import json

import pytest
import torch
from inspector_helpers import plant

from compactlm.cli import main
from compactlm.errors import ConfigError
from compactlm.inspector import GateConfig, auto_eval


def _ids():
    return torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(3))


def test_auto_eval_pass_and_fail(tiny_llama):
    cand = copy.deepcopy(tiny_llama)
    plant(cand, "model.layers.0.self_attn.v_proj", "scale100")
    same = auto_eval(tiny_llama, copy.deepcopy(tiny_llama), config=GateConfig(max_kl=0.0, max_ppl_delta=0.0),
                     input_ids=_ids())
    assert same.passed and same.figures["logit_kl"] == pytest.approx(0.0, abs=1e-12)
    bad = auto_eval(tiny_llama, cand, config=GateConfig(max_kl=1e-3, max_ppl_ratio=10.0), input_ids=_ids())
    assert not bad.passed
    by_name = {c.name: c for c in bad.checks}
    assert not by_name["logit_kl"].passed and by_name["logit_kl"].value > 1e-3
    assert by_name["ppl_ratio"].passed  # a loose check passes while the strict one fails


def test_ruler_check_is_skipped_with_a_reason(tiny_llama):
    result = auto_eval(tiny_llama, tiny_llama, config=GateConfig(max_ruler_drop=5.0), input_ids=_ids())
    check = result.checks[0]
    assert check.skipped and "skipped" in check.message
    assert not result.passed  # a gate whose every check was skipped certifies nothing


def test_gate_config_errors():
    with pytest.raises(ConfigError, match="no check"):
        GateConfig()
    with pytest.raises(ConfigError, match="max_kl"):
        GateConfig(max_kl=-1.0)
    with pytest.raises(ConfigError, match="max_ppl_ratio"):
        GateConfig(max_ppl_ratio=0.0)


def _save(model, path):
    """A checkpoint folder with a word-level tokenizer built offline, so `compactlm.models.load` reads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0").save_pretrained(path)
    return str(path)


@pytest.fixture
def folders(tiny_llama, tmp_path):
    ref = _save(tiny_llama, tmp_path / "ref")
    cand = copy.deepcopy(tiny_llama)
    plant(cand, "model.layers.1.mlp.up_proj", "scale100")
    return ref, _save(cand, tmp_path / "cand")


def test_gate_cli_exit_codes(folders, tmp_path, capsys):
    ref, cand = folders
    common = ["--data", "random", "--windows", "4", "--seqlen", "32", "-q"]
    assert main(["gate", ref, ref, "--max-kl", "1e-9", *common]) == 0
    assert main(["gate", ref, cand, "--max-kl", "1e-3", "--json", str(tmp_path / "g.json"), *common]) == 1
    out = json.loads((tmp_path / "g.json").read_text())
    assert out["passed"] is False and out["checks"][0]["name"] == "logit_kl"
    assert out["command"].startswith(f"compactlm gate {ref} {cand} --dtype fp32 --max-kl 0.001 --data random")
    assert "gate: FAIL" in capsys.readouterr().out
    assert main(["gate", ref, cand, *common]) == 2  # no threshold
    assert "no check" in capsys.readouterr().err


def test_inspect_cli(folders, tmp_path, capsys):
    ref, cand = folders
    rc = main(["inspect", ref, cand, "--data", "random", "--samples", "2", "--seqlen", "32", "-q",
               "--json", str(tmp_path / "i.json"), "--csv", str(tmp_path / "i.csv"),
               "--html", str(tmp_path / "i.html")])
    assert rc == 0
    assert "model.layers.1.mlp.up_proj" in capsys.readouterr().out
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["operators"][0]["name"] == "model.layers.1.mlp.up_proj"
    assert (tmp_path / "i.csv").is_file() and (tmp_path / "i.html").is_file()


def test_cli_bad_inputs(folders, tmp_path, capsys):
    ref, _ = folders
    assert main(["inspect", ref, str(tmp_path / "missing"), "--data", "random", "-q"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["inspect", "tiny-llama", "tiny-qwen2", "--data", "random", "--samples", "1", "--seqlen", "8",
                 "-q"]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert main(["inspect", "tiny-llama", "tiny-llama", "--samples", "1", "-q"]) == 2  # no tokenizer for text
    assert "tokenizer" in capsys.readouterr().err


def test_gate_refuses_different_vocabularies(tiny_llama):
    from compactlm.models import tiny_model

    with pytest.raises(ConfigError, match="different vocabularies"):
        auto_eval(tiny_llama, tiny_model("llama", vocab_size=300), config=GateConfig(max_kl=1.0), input_ids=_ids())
