import math

import pytest
import torch

from compactlm.errors import DataError
from compactlm.evaluation import paired_ppl_interval, perplexity
from compactlm.models import tiny_model


def test_perplexity_equals_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, input_ids=ids, batch_size=2, show_progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(row[None]).logits[0].double()
            for t in range(row.numel() - 1):
                total -= torch.log_softmax(logits[t], -1)[row[t + 1]].item()
                count += 1
    assert result.tokens == count == 5 * 16
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # Per-window mean NLLs: one per window, each the window's own hand-computed mean, averaging to the total.
    assert len(result.window_nll) == 5 and result.to_dict()["window_nll"] == list(result.window_nll)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[3:4]).logits[0, :-1].double(), -1)
        third = -logp.gather(1, ids[3, 1:, None]).mean().item()
    assert result.window_nll[3] == pytest.approx(third, rel=1e-5)
    assert sum(result.window_nll) / 5 == pytest.approx(result.nll, rel=1e-9)


def test_paired_ppl_interval():
    base = [2.0, 3.5, 2.8, 4.1, 3.0, 2.2, 3.9, 2.6]
    same = paired_ppl_interval(base, base)
    assert same["delta_pct"] == same["low_pct"] == same["high_pct"] == 0.0
    # Worse by 0.05 nats on every window, whatever the window's difficulty: a tight interval at +5.13 %.
    worse = paired_ppl_interval(base, [x + 0.05 for x in base])
    assert worse["delta_pct"] == pytest.approx(100 * (math.exp(0.05) - 1))
    assert worse["low_pct"] == pytest.approx(worse["high_pct"]) and worse["better_share"] == 0.0
    # Better on half the windows and worse on the other half: the interval straddles zero.
    mixed = paired_ppl_interval(base, [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)])
    assert mixed["low_pct"] < 0 < mixed["high_pct"] and mixed["better_share"] == 0.5
    with pytest.raises(DataError, match="paired windows"):
        paired_ppl_interval(base, base[:-1])


def test_perplexity_does_not_depend_on_batch_size():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 256, (6, 12))
    a = perplexity(model, input_ids=ids, batch_size=1, show_progress=False)
    b = perplexity(model, input_ids=ids, batch_size=6, show_progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


@pytest.mark.default_model
def test_default_model_perplexity_matches_the_anchor(default_model):
    """PPL-wiki-512 on the first 32 windows: ANCHORS.md measured 22.79 (fp32) on 16,352 tokens."""
    model, tok = default_model
    result = perplexity(model, tok, windows=32, show_progress=False)
    assert result.tokens == 16_352
    assert math.isfinite(result.ppl) and result.ppl == pytest.approx(22.79, abs=0.05)


def test_ppl_compare_script(tmp_path, capsys):
    """benchmarks/ppl_compare.py: pairs records and quant_quality rows by window; refuses results without windows."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ppl_compare.py"
    spec = importlib.util.spec_from_file_location("ppl_compare", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = [2.0, 3.0, 2.5, 3.5]
    (tmp_path / "a.json").write_text(json.dumps({"ppl": 15.0, "window_nll": base}))
    rows = [{"setting": "gptq:3", "ppl": 16.0, "window_nll": [x + 0.1 for x in base]}]
    (tmp_path / "q.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "old.json").write_text(json.dumps({"ppl": 15.0}))
    assert script.main([str(tmp_path / "a.json"), f"{tmp_path / 'q.json'}:gptq:3"]) == 0
    assert f"+{100 * (math.exp(0.1) - 1):.2f} %" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no window_nll"):
        script.main([str(tmp_path / "a.json"), str(tmp_path / "old.json")])
    (tmp_path / "s.json").write_text(json.dumps({"rows": [{"ours": {"ppl": 15.0, "window_nll": base},
                                                                "llmc": {"ppl": 14.0, "window_nll": base}}]}))
    assert script.main([f"{tmp_path / 's.json'}#rows.0.llmc", f"{tmp_path / 's.json'}#rows.0.ours"]) == 0
    assert "+0.00 %" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no 'theirs' on the key path"):
        script.main([f"{tmp_path / 's.json'}#rows.0.theirs", str(tmp_path / "a.json")])
    with pytest.raises(SystemExit, match="no such file"):
        script.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="at least one to compare"):
        script.main([str(tmp_path / "a.json")])
    with pytest.raises(SystemExit, match="0 rows named 'gptq:4'"):
        script.main([str(tmp_path / "a.json"), f"{tmp_path / 'q.json'}:gptq:4"])


def test_side_by_side_worker_loop_matches_perplexity():
    """The llm-compressor/AutoRound workers' own evaluation loop (no compactlm import there) gives the same PPL and
    per-window NLLs as compactlm's perplexity, so paired intervals across the two harnesses compare like with like."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_llmc_worker.py"
    spec = importlib.util.spec_from_file_location("_llmc_worker", path)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (5, 13), generator=torch.Generator().manual_seed(1))
    ppl, tokens, window_nll = worker.perplexity(model, ids, batch_size=2)
    ours = perplexity(model, input_ids=ids, batch_size=4, show_progress=False)
    assert tokens == ours.tokens == 5 * 12
    assert ppl == pytest.approx(ours.ppl, rel=1e-6)
    assert window_nll == pytest.approx(list(ours.window_nll), rel=1e-6)
