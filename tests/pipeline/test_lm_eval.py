"""lm-eval runs a compactlm model in process on local-file tasks (no downloads), with a KV-cache method."""

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval==0.4.13 is an optional test dependency (pip install lm-eval accelerate)")

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " banana"], "label": 0, "answer": "Paris"},
    {"question": "Two plus two equals", "choices": [" purple", " four"], "label": 1, "answer": "four"},
    {"question": "The opposite of hot is", "choices": [" cold", " seven"], "label": 0, "answer": "cold"},
]


def _tasks(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: '{{question}}'\n")
    (tmp_path / "mc.yaml").write_text(
        "task: compactlm_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: compactlm_gen\n" + common + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tmp_path


@pytest.mark.default_model
def test_local_tasks_through_the_adapter_with_a_kv_method(tmp_path, monkeypatch):
    for var, sub in (("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "ds")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from compactlm.evaluation import generate
    from compactlm.evaluation.lm_eval import CompactLMEval, evaluate
    from compactlm.models import load

    model, tok = load("smollm2-135m")
    tasks = _tasks(tmp_path)
    calls = []
    real = generate.run_method
    monkeypatch.setattr(generate, "run_method", lambda m, meth, *a, **k: calls.append(meth.name) or real(m, meth, *a,
                                                                                                           **k))
    lm = CompactLMEval(model, tokenizer=tok, kv="int4")
    out = evaluate(lm, ["compactlm_mc", "compactlm_gen"], include_path=tasks)
    res = out["results"]
    assert res["compactlm_mc"]["acc,none"] >= 2 / 3  # the base model gets these right; a broken adapter would not
    assert 0.0 <= res["compactlm_gen"]["exact_match,none"] <= 1.0
    assert calls and all(name.startswith("kv-int4") for name in calls)  # generation went through the KV method
    assert len(calls) == len(QUESTIONS)
