import json

import pytest
import torch

from compactlm.data import adds_bos, calibration_set, essays, eval_windows, load_text, wiki_text
from compactlm.errors import DataError


def test_wiki_text_is_cleaned_and_has_no_redirects():
    text = wiki_text()
    assert len(text) > 1_000_000
    assert "#REDIRECT" not in text.upper()[:100000]
    assert "[[" not in text  # wiki markup removed by filter_wiki


def test_essays_are_49_sorted_files():
    assert len(essays()) == 49


def test_windows_without_bos(char_tokenizer):
    w = eval_windows(char_tokenizer, "essays", seqlen=64, windows=5)
    assert w.shape == (5, 64)
    ids = char_tokenizer(load_text("essays"), add_special_tokens=False)["input_ids"]
    assert w.flatten().tolist() == ids[: 5 * 64]  # non-overlapping, in order


def test_windows_with_bos_prepend_it():
    from tests.conftest import CharTokenizer

    tok = CharTokenizer(add_bos=True)
    assert adds_bos(tok)
    w = eval_windows(tok, "essays", seqlen=32, windows=3)
    assert w.shape == (3, 33) and (w[:, 0] == tok.bos_token_id).all()


def test_calibration_is_deterministic_and_seeded(char_tokenizer):
    a = calibration_set(char_tokenizer, nsamples=8, seqlen=64, seed=0)
    b = calibration_set(char_tokenizer, nsamples=8, seqlen=64, seed=0)
    c = calibration_set(char_tokenizer, nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_never_overlaps_eval_text(char_tokenizer):
    with pytest.raises(DataError, match="never calibrate on the evaluation text"):
        calibration_set(char_tokenizer, source="wiki")
    wiki = wiki_text()
    calib = calibration_set(char_tokenizer, nsamples=32, seqlen=128, seed=0)
    for row in calib:
        snippet = char_tokenizer.decode(row[20:100].tolist())
        assert snippet not in wiki


def test_local_text_and_jsonl(tmp_path, char_tokenizer):
    (tmp_path / "a.txt").write_text("hello " * 200)
    assert load_text(str(tmp_path / "a.txt")).startswith("hello")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    assert load_text(str(tmp_path / "b.jsonl")) == "doc 0\n\ndoc 1\n\ndoc 2"
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="only 1 windows"):
        eval_windows(char_tokenizer, str(tmp_path / "a.txt"), seqlen=1000, windows=2)
