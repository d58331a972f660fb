import json

import pytest

from compactlm.cli import build_parser, main


@pytest.fixture(scope="module")
def small_model_with_tokenizer(tmp_path_factory):
    """A tiny Llama with the default model's tokenizer (vocab 49,152), saved as a checkpoint folder."""
    from transformers import AutoTokenizer

    from compactlm.models import default_model_dir, tiny_model

    folder = tmp_path_factory.mktemp("tinyckpt")
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _subcommands(parser):
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            yield [name], sub
            if sub._subparsers is not None:
                for path, subsub in _subcommands(sub):
                    yield [name, *path], subsub


def test_every_command_has_help(capsys):
    paths = [p for p, _ in _subcommands(build_parser())]
    assert ["info"] in paths and ["eval", "ppl"] in paths and ["demo"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0
        assert "usage: compactlm" in capsys.readouterr().out


def test_eval_ppl_writes_the_json(small_model_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["eval", "ppl", small_model_with_tokenizer, "--windows", "2", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"ppl", "tokens", "protocol", "model", "machine"} <= set(data)
    assert data["tokens"] == 2 * 511 and data["ppl"] > 1
    assert data["protocol"] == "PPL-wiki-512 (first 2 windows)"
    assert "perplexity" in capsys.readouterr().out


def test_eval_ppl_on_a_local_text_file(small_model_with_tokenizer, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["eval", "ppl", small_model_with_tokenizer, "--data", str(text), "--windows", "1", "-q"]) == 0
    assert "PPL-file-512" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info", "tiny-qwen3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "qwen3" in out and "kv_heads" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "no-such-model"], "not found"),
        (["info", "/nonexistent/model.gguf"], "not found"),
        (["info", "tiny-llama", "--dtype", "int3"], "unknown dtype"),
        (["info", "tiny-rwkv"], "no tiny test model"),
        (["eval", "ppl", "tiny-llama"], "has no tokenizer"),
        (["demo", "--steps", "nope"], "unknown demo step"),
    ],
)
def test_cli_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("compactlm: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent.txt"], "not found"),
        (["--windows", "100000"], "only"),
        (["--windows", "0"], "must be positive"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_eval_ppl_bad_input(small_model_with_tokenizer, extra, message, capsys):
    assert main(["eval", "ppl", small_model_with_tokenizer, "-q", *extra]) == 2
    assert message in capsys.readouterr().err
