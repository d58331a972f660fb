"""``compactlm report DIR``: one self-contained HTML page (inline SVG plots, no scripts, no network).

Reads ``DIR/report.json`` (and ``DIR/choices.json`` for the per-layer plots) written by ``compactlm compress``
and draws: the summary table, PPL, RULER-syn by length, memory (weights and KV bytes per token), speed
(prefill and decode), bits and sparsity per linear layer, and the inspector's top offenders where present.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import DataError

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")


PRUNE_TYPES = ("Magnitude", "Wanda", "SparseGPT", "Barber")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return _e(v)


def bar_chart(title: str, series: dict[str, float | None], unit: str = "", width: int = 460,
              log_scale: bool = False) -> str:
    """Horizontal bars, one per entry; missing values are labelled, not drawn."""
    rows = list(series.items())
    bar_h, gap, left, top = 22, 8, 130, 28
    height = top + len(rows) * (bar_h + gap) + 10
    vals = [v for _, v in rows if isinstance(v, int | float) and math.isfinite(v) and v > 0]
    vmax = max(vals) if vals else 1.0

    def scale(v: float) -> float:
        if log_scale:
            lo = min(vals) / 2
            return (math.log10(v) - math.log10(lo)) / max(math.log10(vmax) - math.log10(lo), 1e-9)
        return v / vmax

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
             f'<text x="4" y="18" font-size="13" font-weight="bold">{_e(title)}</text>']
    span = width - left - 90
    for k, (label, v) in enumerate(rows):
        y = top + k * (bar_h + gap)
        parts.append(f'<text x="{left - 6}" y="{y + 15}" font-size="12" text-anchor="end">{_e(label)}</text>')
        if isinstance(v, int | float) and math.isfinite(v) and v >= 0:  # 0 is a measurement (a RULER score)
            w = max(1.0, span * scale(v)) if v > 0 else 1.0
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                         f'fill="{PALETTE[k % len(PALETTE)]}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="12">{_num(v)} {_e(unit)}</text>')
        else:
            parts.append(f'<text x="{left + 4}" y="{y + 15}" font-size="12" fill="#888">not measured</text>')
    parts.append("</svg>")
    return "".join(parts)


def layer_chart(title: str, values: dict[str, float], unit: str, vmax: float | None = None,
                width: int = 880) -> str:
    """One thin bar per linear layer in model order, coloured by its role (q/k/v/o/gate/up/down)."""
    names = list(values)
    if not names:
        return ""
    roles: list[str] = []
    for n in names:
        r = n.rsplit(".", 1)[-1]
        if r not in roles:
            roles.append(r)
    top, h, bottom = 28, 120, 36
    height = top + h + bottom
    vmax = vmax or max(max(values.values()), 1e-9)
    bw = (width - 50) / len(names)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
             f'<text x="4" y="18" font-size="13" font-weight="bold">{_e(title)}</text>',
             f'<line x1="40" y1="{top + h}" x2="{width - 6}" y2="{top + h}" stroke="#333"/>',
             f'<text x="36" y="{top + 10}" font-size="11" text-anchor="end">{_num(vmax)}</text>',
             f'<text x="36" y="{top + h}" font-size="11" text-anchor="end">0</text>']
    for k, n in enumerate(names):
        v = values[n]
        bh = h * max(0.0, min(v / vmax, 1.0))
        color = PALETTE[roles.index(n.rsplit(".", 1)[-1]) % len(PALETTE)]
        parts.append(f'<rect x="{40 + k * bw:.2f}" y="{top + h - bh:.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
                     f'height="{bh:.2f}" fill="{color}"><title>{_e(n)}: {_num(v)} {_e(unit)}</title></rect>')
    for k, r in enumerate(roles):
        x = 40 + k * 90
        parts.append(f'<rect x="{x}" y="{top + h + 14}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="{top + h + 23}" font-size="11">{_e(r)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary table (also printed by ``compactlm compress`` / ``report``): base vs compressed."""
    ev = report.get("evaluation") or {}
    ppl, speed, ruler = ev.get("ppl") or {}, ev.get("speed") or {}, (ev.get("ruler") or {}).get("methods", {})
    weights = ev.get("weights_MiB") or {}
    rows = []
    for key, label in (("base", "base (uncompressed)"), ("weights_only", "compressed weights, full cache"),
                       ("compressed", f"recipe {report.get('recipe', {}).get('name', '')}")):
        sp = speed.get(key) or {}
        row = {"model": label,
               "ppl": ppl.get("compressed" if key != "base" else "base") if ppl else None,
               "weights_MiB": weights.get("base" if key == "base" else "compressed"),
               "kv_B_per_token": sp.get("kv_bytes_per_token"),
               "prefill_tok_s": sp.get("prefill_tok_s"), "decode_tok_s": sp.get("decode_tok_s"),
               "ruler": (ruler.get(key) or {}).get("score")}
        if key == "compressed" and not sp and not ruler.get(key):
            continue
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No rows.</p>"
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:960px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:16px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}.note{color:#666;font-size:12px}"""


def render_html(report: dict[str, Any], choices: dict[str, Any] | None = None) -> str:
    """The whole page as one string (no external resources)."""
    ev = report.get("evaluation") or {}
    recipe = report.get("recipe") or {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>compactlm report: {_e(recipe.get('name', ''))} on {_e(report.get('model', ''))}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>{_e(recipe.get('name', 'recipe'))} on {_e(report.get('model', ''))}</h1>",
           f"<p>{_e(recipe.get('description', ''))}</p>", "<h2>Summary</h2>", _table(summary_rows(report))]
    plots = []
    if ev.get("ppl"):
        p = ev["ppl"]
        plots.append(bar_chart(f"Perplexity, {p['protocol']} (lower is better)",
                               {"base": p.get("base"), "compressed": p.get("compressed")}, log_scale=True))
    if ev.get("ruler"):
        r = ev["ruler"]
        for n in r["lengths"]:
            plots.append(bar_chart(f"RULER-syn at {n} tokens (score %)",
                                   {k: v["by_length"].get(str(n)) for k, v in r["methods"].items()}, "%"))
    if ev.get("weights_MiB"):
        plots.append(bar_chart("Weights (MiB)", ev["weights_MiB"], "MiB"))
    if ev.get("speed"):
        s = {k: v for k, v in ev["speed"].items() if isinstance(v, dict)}
        plots.append(bar_chart("KV cache (bytes per token)", {k: v.get("kv_bytes_per_token") for k, v in s.items()},
                               "B"))
        plots.append(bar_chart("Prefill (tokens/s)", {k: v.get("prefill_tok_s") for k, v in s.items()}, "tok/s"))
        plots.append(bar_chart("Decode (tokens/s)", {k: v.get("decode_tok_s") for k, v in s.items()}, "tok/s"))
    if plots:
        out += ["<h2>Measurements</h2>", '<div class="plots">', *plots, "</div>"]
        if ev.get("speed", {}).get("note"):
            out.append(f'<p class="note">{_e(ev["speed"]["note"])}; torch threads: {_e(ev.get("torch_threads"))}</p>')
    if choices:
        out.append("<h2>Per-layer choices</h2>")
        if choices.get("bits"):
            out.append(f"<p>average weight bits {_num(choices.get('avg_bits'))} (with scales and zeros "
                       f"{_num(choices.get('avg_bits_with_metadata'))})</p>")
            out.append(layer_chart("Weight bits per linear layer", choices["bits"], "bits", vmax=8))
        sparsity = {k: v for k, v in (choices.get("sparsity") or {}).items()}
        # Only for recipes that prune: low-bit grids round many weights to exactly 0 without any pruning.
        prunes = any(st.get("type") in PRUNE_TYPES for st in recipe.get("steps", []))
        if prunes and sparsity and any(v > 0.01 for v in sparsity.values()):
            out.append(layer_chart("Fraction of zero weights per linear layer", sparsity, "", vmax=1.0))
    if ev.get("inspector"):
        out += ["<h2>Precision inspector: top offenders</h2>", _table(ev["inspector"])]
    out += ["<h2>Recipe as run</h2>", f"<pre>{_e(json.dumps(recipe, indent=1))}</pre>",
            "<h2>Machine</h2>", _table([report.get("machine") or {}]),
            f'<p class="note">compress took {_num(report.get("compress_seconds"))} s'
            f'{" (resumed after an interruption)" if report.get("resumed") else ""}; '
            f'peak RSS {_num(report.get("peak_rss_mib"))} MiB.</p>',
            "</body></html>"]
    return "\n".join(out)


def read_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise DataError(f"{folder} has no report.json; run `compactlm compress MODEL --recipe R --out {folder}` first")
    try:
        report = json.loads(path.read_text())
        choices = json.loads((folder / "choices.json").read_text()) if (folder / "choices.json").is_file() else None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); the folder is corrupt: run compress again") from None
    return report, choices


def write_report(folder: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Render ``folder``'s report.json to ``path`` (default ``folder/report.html``), atomically."""
    report, choices = read_folder(folder)
    path = Path(path) if path is not None else Path(folder) / "report.html"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(render_html(report, choices), encoding="utf-8")
    os.replace(tmp, path)
    return path
