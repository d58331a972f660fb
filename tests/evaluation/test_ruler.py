"""RULER-syn: generator determinism and lengths, scoring, and the runner on a tiny model."""

from __future__ import annotations

import contextlib

import pytest

from compactlm.errors import ConfigError, DataError
from compactlm.evaluation.methods import FULL, RuntimeMethod
from compactlm.evaluation.ruler import (
    TASKS,
    RulerGenerator,
    parse_lengths,
    parse_sample_indices,
    protocol_name,
    run_ruler,
    string_match_all,
)
from compactlm.models import tiny_model


class ByteTokenizer:
    """Byte-level ids in [3, 253): fits the tiny models' 256-token vocabulary; no chat template."""

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        return {"input_ids": [3 + (b % 250) for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token):
        return None


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ("123", "456")) == 1.0
    assert string_match_all("only 123", ("123", "456")) == 0.5
    assert string_match_all("ABC", ("abc",)) == 1.0
    with pytest.raises(DataError):
        string_match_all("x", ())


def test_parse_lengths():
    assert parse_lengths("2k,4k") == [2048, 4096]
    assert parse_lengths("1000, 8k") == [1000, 8192]
    for bad in ("", "2q", "12"):
        with pytest.raises(ConfigError, match="lengths"):
            parse_lengths(bad)


def test_generator_is_seeded_and_places_answers():
    tok = ByteTokenizer()
    gen = RulerGenerator(tok, seed=0)
    for task in TASKS:
        a = gen.sample(task, 1024, 1, 3)
        b = RulerGenerator(tok, seed=0).sample(task, 1024, 1, 3)
        c = RulerGenerator(tok, seed=1).sample(task, 1024, 1, 3)
        assert a == b, task
        assert a.input_ids != c.input_ids, task
        assert abs(len(a.input_ids) - 1024) <= 0.03 * 1024, (task, len(a.input_ids))
        text = tok.decode(list(a.input_ids))
        for answer in a.answers:
            assert answer in text, (task, answer)
    assert [gen.sample("passkey", 1024, i, 3).depth for i in range(3)] == [0.0, 0.5, 1.0]


def test_needle_depth_moves_the_needle():
    tok = ByteTokenizer()
    gen = RulerGenerator(tok)
    positions = []
    for i in range(3):
        s = gen.sample("niah_essay", 2048, i, 3)
        positions.append(tok.decode(list(s.input_ids)).find(s.answers[0]))
    assert positions[0] < positions[1] < positions[2]


def test_generator_rejects_bad_input():
    with pytest.raises(DataError, match="tokenizer"):
        RulerGenerator(None)
    gen = RulerGenerator(ByteTokenizer())
    with pytest.raises(ConfigError, match="task"):
        gen.sample("nope", 1024, 0, 1)
    with pytest.raises(ConfigError, match="too short"):
        gen.sample("niah_single", 300, 0, 1)


def test_run_ruler_scores_every_method_beside_full():
    model = tiny_model("llama", max_position_embeddings=2048)
    calls = []

    @contextlib.contextmanager
    def attach(m):
        calls.append("attach")
        yield m

    copy = RuntimeMethod("copy", attach=attach, make_cache=FULL.make_cache)
    res = run_ruler(model, ByteTokenizer(), [copy], lengths=[512], samples=2, tasks=("passkey", "vt"),
                    max_new_tokens=4)
    assert list(res.methods) == ["full", "copy"]
    assert len(res.records) == 2 * 2 * 2 and calls.count("attach") == 4
    # Same prefill, same decode path: identical outputs.
    full = [r["output"] for r in res.records if r["method"] == "full"]
    assert full == [r["output"] for r in res.records if r["method"] == "copy"]
    assert set(res.methods["full"]["tasks"]) == {"passkey", "vt"}
    assert 0.0 <= res.methods["full"]["score"] <= 100.0
    assert protocol_name([2048, 4096], 5, TASKS) == "RULER-syn-q"
    with pytest.raises(ConfigError, match="context"):
        run_ruler(model, ByteTokenizer(), lengths=[4096], samples=1)


def test_run_ruler_reuses_full_records_after_reproducing_some():
    model = tiny_model("llama", max_position_embeddings=2048)
    copy = RuntimeMethod("copy", attach=lambda m: contextlib.nullcontext(m), make_cache=FULL.make_cache,
                         shares_prefill=False)
    kw = dict(lengths=[512], samples=3, tasks=("passkey", "vt"), max_new_tokens=4)
    first = run_ruler(model, ByteTokenizer(), [copy], **kw)
    again = run_ruler(model, ByteTokenizer(), [copy], full_records=first.records, full_check=1, **kw)
    assert (again.full_reused, again.full_checked) == (4, 2)
    full = [r for r in again.records if r["method"] == "full"]
    assert [r.get("reused", False) for r in full] == [False, True, True] * 2
    assert [r["output"] for r in full] == [r["output"] for r in first.records if r["method"] == "full"]
    assert again.methods["full"]["score"] == first.methods["full"]["score"]
    assert again.to_dict()["full_reused"] == 4

    def edited(index, **change):
        return [{**r, **change} if r["method"] == "full" and r["index"] == index else r for r in first.records]

    with pytest.raises(DataError, match="reused record"):  # a checked prompt that full attention does not reproduce
        run_ruler(model, ByteTokenizer(), [copy], full_records=edited(0, output="something else"), **kw)
    with pytest.raises(DataError, match="different prompt"):
        run_ruler(model, ByteTokenizer(), [copy], full_records=edited(2, answers=["0"]), **kw)
    with pytest.raises(DataError, match="no full-attention row"):
        run_ruler(model, ByteTokenizer(), [copy], full_records=first.records[:-2], **kw)
    with pytest.raises(DataError, match="twice"):
        run_ruler(model, ByteTokenizer(), [copy], full_records=first.records + first.records[:1], **kw)
    with pytest.raises(ConfigError, match="full_check"):
        run_ruler(model, ByteTokenizer(), [copy], full_records=first.records, full_check=0, **kw)


def test_parse_sample_indices():
    assert parse_sample_indices("0::4", 20) == [0, 4, 8, 12, 16]
    assert parse_sample_indices("3::4", 20) == [3, 7, 11, 15, 19]
    assert parse_sample_indices("2:5", 20) == [2, 3, 4]
    assert parse_sample_indices("9, 1,5", 20) == [1, 5, 9]
    for spec, message in [("20", "outside 0..19"), ("-1", "outside"), ("1,1", "repeat"), ("5:2", "select no"),
                          ("a::2", "expected a slice"), ("1:2:3:4", "expected a slice")]:
        with pytest.raises(ConfigError, match=message):
            parse_sample_indices(spec, 20)


def _ruler_table():
    """benchmarks/results/longctx/ruler_table.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "longctx" / "ruler_table.py"
    spec = importlib.util.spec_from_file_location("ruler_table", root)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def test_sample_subsets_are_parts_of_the_whole_run(tmp_path):
    """Two stride parts make exactly the records of the whole run: the same prompts (depth from the whole run's
    sample count), the same outputs; and the ruler_table merge of the two parts is complete only with both."""
    import json

    model = tiny_model("llama", max_position_embeddings=2048)
    kw = dict(lengths=[512], samples=4, tasks=("passkey", "niah_single"), max_new_tokens=3)
    whole = run_ruler(model, ByteTokenizer(), **kw)
    even = run_ruler(model, ByteTokenizer(), sample_indices=[0, 2], **kw)
    odd = run_ruler(model, ByteTokenizer(), sample_indices=[3, 1], **kw)
    key = lambda r: (r["task"], r["index"])  # noqa: E731
    assert sorted(even.records + odd.records, key=key) == sorted(whole.records, key=key)
    assert {r["index"] for r in even.records} == {0, 2} and even.to_dict()["sample_indices"] == [0, 2]
    assert whole.to_dict()["sample_indices"] is None
    with pytest.raises(ConfigError, match="sample_indices"):
        run_ruler(model, ByteTokenizer(), sample_indices=[4], **kw)
    # Reusing full attention's records on a part checks the part's own first index.
    again = run_ruler(model, ByteTokenizer(), sample_indices=[1, 3], full_records=whole.records, **kw)
    assert (again.full_checked, again.full_reused) == (2, 2)

    table = _ruler_table()

    def part(res, path):
        d = {**res.to_dict(), "command": "test", "machine": {}, "chunks_done": [[512, t] for t in kw["tasks"]]}
        path.write_text(json.dumps(d))
        return str(path)

    a, b = part(even, tmp_path / "a.json"), part(odd, tmp_path / "b.json")
    merged = table.merge([a, b])
    assert merged["complete"] and merged["sample_indices"] == [0, 1, 2, 3]
    assert not table.merge([a])["complete"]
    assert "2 of 4 samples each" in table.tables(table.merge([a]), "a")
    assert "4 samples each" in table.tables(merged, "ab")
    with pytest.raises(SystemExit, match="overlap"):
        table.merge([a, a])


@pytest.mark.default_model
def test_default_tokenizer_lengths_and_chat_template(default_model):
    _, tok = default_model
    gen = RulerGenerator(tok)
    for task in TASKS:
        s = gen.sample(task, 2048, 0, 5)
        assert abs(len(s.input_ids) - 2048) <= 0.05 * 2048, (task, len(s.input_ids))
        text = tok.decode(list(s.input_ids))
        assert text.startswith("<|im_start|>") and "<|im_start|>assistant" in text


def test_ruler_table_pools_lengths_and_checks_the_runs(tmp_path):
    """--pool: lengths from separate runs scored together (mean over lengths of the task means), a method kept only
    where it ran every prompt; a length's runs must be complete, and two runs that disagree on a prompt stop it."""
    import json
    from pathlib import Path

    table = _ruler_table()

    def run(path, length, methods, scores, samples=2, tasks=("a", "b")):
        # a method that scores like full on a prompt writes full's text there
        recs = [{"method": m, "task": t, "length": length, "index": i, "score": scores[m](t, i),
                 "output": f"full{t}{i}" if scores[m](t, i) == scores["full"](t, i) else f"{m}{t}{i}"}
                for m in methods for t in tasks for i in range(samples)]
        d = {"protocol": f"test {length}", "command": "test", "machine": {}, "seconds": 1.0, "samples": samples,
             "lengths": [length], "tasks": list(tasks), "methods": {m: None for m in methods}, "records": recs,
             "chunks_done": [[length, t] for t in tasks], "complete": True}
        path.write_text(json.dumps(d))
        return str(path)

    full = lambda t, i: 100.0 if i == 0 else 0.0  # noqa: E731
    half = lambda t, i: 50.0 if i == 0 else 0.0  # noqa: E731
    a = run(tmp_path / "a.json", 512, ["full", "q"], {"full": full, "q": half})
    b = run(tmp_path / "b.json", 1024, ["full", "q", "only_here"], {"full": full, "q": full, "only_here": full})
    c = run(tmp_path / "c.json", 1024, ["full", "extra"], {"full": full, "extra": half})  # a second run, same prompts
    pooled = table.pool([a, b, c])
    assert pooled["methods"] == ["full", "q"] and set(pooled["left_out"]) == {"only_here", "extra"}
    assert len(pooled["full"]) == 8 and pooled["samples"] == {512: 2, 1024: 2}
    text = table.pooled_table(pooled)
    # full: 50 at both lengths; q: 25 at 512, 50 at 1024 -> 37.5, Δ -12.5; 2 of 8 prompts differ, both down.
    assert "| full | 50.0 | 50.0 | 50.0 |" in text and "| q | 25.0 | 50.0 | 37.5 | -12.50 |" in text
    assert "2/8 (0 up, 2 down)" in text and "Not at every length (left out)" in text

    bad = run(tmp_path / "bad.json", 1024, ["full", "extra"], {"full": half, "extra": half})
    with pytest.raises(SystemExit, match="disagree"):
        table.pool([a, b, bad])
    partial = json.loads(Path(a).read_text())
    partial["chunks_done"] = partial["chunks_done"][:1]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(SystemExit, match="not complete"):
        table.pool([str(tmp_path / "partial.json"), b])
    other_tasks = run(tmp_path / "t.json", 2048, ["full", "q"], {"full": full, "q": full}, tasks=("a", "c"))
    with pytest.raises(SystemExit, match="different tasks"):
        table.pool([a, other_tasks])
    no_full = run(tmp_path / "n.json", 512, ["q"], {"full": full, "q": half})
    with pytest.raises(SystemExit, match="no full-attention records"):
        table.pool([no_full])
