"""The report page: valid, self-contained HTML with its plots; renders in headless Chromium with no console errors."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from compactlm.errors import DataError
from compactlm.report.html import render_html, summary_rows, write_report

REPORT = {
    "model": "smollm2-135m", "dtype": "fp32", "compress_seconds": 12.5, "resumed": True, "peak_rss_mib": 900.0,
    "recipe": {"name": "aptq-2.5bit+kv4+sals", "description": "demo <recipe> & co",
               "steps": [{"type": "Wanda"}, {"type": "APTQ"}]},
    "machine": {"cpu": "test cpu", "cores": 2, "torch": "2.13.0"},
    "evaluation": {
        "method": "aptq", "torch_threads": 2,
        "weights_MiB": {"base": 513.0, "compressed": 150.0},
        "ppl": {"protocol": "PPL-wiki-512-q", "tokens": 20440, "base": 22.8, "compressed": 41.3},
        "speed": {"base": {"kv_bytes_per_token": 46080.0, "prefill_tok_s": 600.0, "decode_tok_s": 25.0},
                  "weights_only": {"kv_bytes_per_token": 46080.0, "prefill_tok_s": 500.0, "decode_tok_s": 20.0},
                  "compressed": {"kv_bytes_per_token": 9000.0, "prefill_tok_s": 480.0, "decode_tok_s": None},
                  "note": "one run each"},
        "ruler": {"protocol": "RULER-syn", "lengths": [2048],
                  "methods": {"base": {"score": 100.0, "by_length": {"2048": 100.0}},
                              "weights_only": {"score": 50.0, "by_length": {"2048": 50.0}},
                              "compressed": {"score": 0.0, "by_length": {"2048": 0.0}}}},
        "inspector": [{"name": "model.layers.0.mlp.down_proj", "isolated_sqnr_db": 9.5, "risks": "sqnr"}],
    },
}
CHOICES = {"bits": {f"model.layers.{i}.{n}": b for i in range(3) for n, b in
                    (("self_attn.q_proj", 2), ("mlp.down_proj", 4))},
           "avg_bits": 3.0, "avg_bits_with_metadata": 3.5,
           "sparsity": {"model.layers.0.self_attn.q_proj": 0.5, "model.layers.0.mlp.down_proj": 0.5}}


class Checker(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "line", "rect", "path", "circle"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.errors.append(f"external resource {value}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _folder(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    (tmp_path / "choices.json").write_text(json.dumps(CHOICES))
    return tmp_path


def test_page_is_well_formed_self_contained_and_has_every_plot(tmp_path):
    page = render_html(REPORT, CHOICES)
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    titles = ["Perplexity", "RULER-syn at 2048", "Weights (MiB)", "KV cache", "Prefill", "Decode",
              "Weight bits per linear layer", "Fraction of zero weights", "top offenders"]
    for t in titles:
        assert t in page, t
    assert checker.tags.count("svg") == 8
    assert "demo &lt;recipe&gt; &amp; co" in page  # text is escaped
    rows = summary_rows(REPORT)
    assert [r["ppl"] for r in rows] == [22.8, 41.3, 41.3] and rows[2]["kv_B_per_token"] == 9000.0
    path = write_report(_folder(tmp_path))
    assert path.read_text() == page
    # Without a pruning step the zeros a low-bit grid makes are not drawn as sparsity.
    quant_only = {**REPORT, "recipe": {**REPORT["recipe"], "steps": [{"type": "APTQ"}]}}
    assert "Fraction of zero weights" not in render_html(quant_only, CHOICES)


def test_missing_or_corrupt_report_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no report.json"):
        write_report(tmp_path)
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(tmp_path)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _render(browser, path):
    proc = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc, console


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (apt-get install -y chromium); "
                    "the pure-Python validity test above still runs")
def test_page_renders_in_headless_chromium_without_console_errors(tmp_path):
    browser = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFunction()</script></body></html>")
    _, console = _render(browser, bad)
    assert console, "the console check must see a deliberate error, or it proves nothing"
    path = write_report(_folder(tmp_path))
    proc, console = _render(browser, path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console == []
    assert proc.stdout.count("<svg") == 8 and "Weight bits per linear layer" in proc.stdout


def test_a_zero_score_is_drawn_as_a_measurement_and_a_missing_one_is_not():
    from compactlm.report.html import bar_chart

    svg = bar_chart("RULER-syn at 2048 tokens (score %)", {"base": 50.0, "compressed": 0.0, "other": None}, "%")
    assert svg.count("not measured") == 1 and "0 %" in svg
