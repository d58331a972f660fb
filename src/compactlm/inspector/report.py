"""Writers for an :class:`~compactlm.inspector.inspector.InspectionReport`: JSON, CSV, HTML (inline SVG), table.

No plotting dependency: the HTML report draws its charts as inline SVG (per-layer SQNR, per-layer
attention-probability KL, the top offenders by impact, and the error distributions of the worst
operators). Every file is written to a temporary name beside the target and renamed into place.
Non-finite floats (SQNR of identical outputs is ``inf``) are written to JSON as the strings
``"inf"``, ``"-inf"``, ``"nan"`` so the file stays standard JSON.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..utils import write_json_atomic

_METRICS = ("cosine", "sqnr_db", "nsr", "max_abs", "rel_fro", "kl")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write_text_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report, path) -> None:
    write_json_atomic(path, _clean(report.data))


def csv_rows(report) -> list[dict[str, Any]]:
    rows = []
    for op in report.operators:
        row: dict[str, Any] = {"rank": op["rank"], "name": op["name"], "kind": op["kind"], "layer": op["layer"],
                               "unit": op["unit"]}
        imp = op["impact"] or {}
        row["impact_kl"] = imp.get("kl")
        row["impact_loss_delta"] = imp.get("loss_delta")
        for mode in ("isolated", "accumulated"):
            m = op[mode] or {}
            for k in _METRICS:
                row[f"{mode}_{k}"] = m.get(k)
        row["risk"] = ";".join(op["risk"])
        rows.append(row)
    return rows


def write_csv(report, path) -> None:
    rows = csv_rows(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_text_atomic(path, buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def runtime_summary(data: dict[str, Any]) -> str:
    """One line naming the candidate's runtime method(s) and their layers ('' when there is none)."""
    parts = []
    for item in data.get("candidate_runtime") or []:
        cfg = item.get("config") or {}
        if item["kind"] == "kv-store":
            what = (f"KV cache int{cfg['bits']} (group {cfg['group_size']}, residual {cfg['residual']}"
                    + (f", sinks {cfg['sinks']}" if cfg.get("sinks") else "") + (", pre-RoPE" if cfg.get("pre_rope")
                                                                                else "") + ")")
        elif item["kind"] == "attention":
            what = cfg.get("type", "attention")
        elif item["kind"] == "decode":
            what = f"{cfg.get('type')} (decode path, last {data['config'].get('decode_tokens')} tokens)"
        else:
            what = f"method {item.get('name')}"
        layers = item.get("layers")
        parts.append(what + (f" on layers {_spans(layers)}" if layers is not None else ""))
    return ("candidate runtime: " + "; ".join(parts)) if parts else ""


def _spans(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def terminal_table(report, top: int = 15) -> str:
    d = report.data
    cols = ("rank", "operator", "kind", "impact_kl", "dloss", "iso_sqnr", "acc_sqnr", "iso_cos", "risk")
    rows = []
    for op in report.top(top):
        iso, acc, imp = op["isolated"] or {}, op["accumulated"] or {}, op["impact"] or {}
        rows.append((str(op["rank"]), op["name"], op["kind"], _fmt(imp.get("kl")), _fmt(imp.get("loss_delta")),
                     _fmt(iso.get("sqnr_db")), _fmt(acc.get("sqnr_db")), _fmt(iso.get("cosine")),
                     ",".join(op["risk"])))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    fl, t = d["final_logits"], d["timing"]
    differing = sum(1 for o in report.operators if o["unit"])
    lines.append(f"final logits: KL {_fmt(fl.get('kl'))} nats/token, SQNR {_fmt(fl.get('sqnr_db'))} dB; "
                 f"{differing} differing operator(s); {d['tokens']:,} tokens; capture {t['capture_s']:.1f} s, "
                 f"impact {t['impact_s']:.1f} s ({t['impact_units']} swaps)")
    if runtime_summary(d):
        lines.append(runtime_summary(d))
    if not rows:
        lines.append("no operator differs: the candidate computes exactly what the reference computes")
    return "\n".join(lines)


# --- SVG charts ---------------------------------------------------------------------------------------------

def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
                w: int = 720, h: int = 260, log_y: bool = False) -> str:
    pts = [(x, y) for s in series.values() for x, y in s if _finite(y) and (not log_y or y > 0)]
    if not pts:
        return f"<p><b>{html.escape(title)}</b>: nothing to plot (all values equal or infinite).</p>"
    tf = (lambda y: math.log10(y)) if log_y else (lambda y: y)  # noqa: E731
    xs, ys = [p[0] for p in pts], [tf(p[1]) for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 + 1 if x1 == x0 else x1), (y1 + 1 if y1 == y0 else y1)
    L, R, T, B = 60, 160, 24, 36

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (w - L - R)

    def sy(y):
        return h - B - (tf(y) - y0) / (y1 - y0) * (h - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11" font-family="sans-serif">',
           f'<text x="{L}" y="14" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="#444"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="#444"/>',
           f'<text x="{(w - R + L) / 2}" y="{h - 4}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="12" y="{(h) / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">'
           f'{html.escape(ylabel)}{" (log)" if log_y else ""}</text>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = f"{10 ** yv:.2g}" if log_y else f"{yv:.3g}"
        ypix = h - B - frac * (h - T - B)
        out.append(f'<text x="{L - 4}" y="{ypix + 4}" text-anchor="end">{label}</text>')
    for frac in (0.0, 0.5, 1.0):
        xv = x0 + frac * (x1 - x0)
        out.append(f'<text x="{sx(xv)}" y="{h - B + 14}" text-anchor="middle">{xv:.3g}</text>')
    for k, (name, s) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        good = [(x, y) for x, y in s if _finite(y) and (not log_y or y > 0)]
        if good:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>' for x, y in good]
        out.append(f'<text x="{w - R + 8}" y="{T + 14 * k + 8}" fill="{color}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _bar_chart(labels: list[str], values: list[float], title: str, unit: str, w: int = 720) -> str:
    pairs = [(lab, v) for lab, v in zip(labels, values, strict=True) if _finite(v)]
    if not pairs:
        return f"<p><b>{html.escape(title)}</b>: nothing to plot.</p>"
    h = 30 + 18 * len(pairs)
    vmax = max(v for _, v in pairs) or 1.0
    L = 330
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11" font-family="sans-serif">',
           f'<text x="4" y="14" font-weight="bold">{html.escape(title)}</text>']
    for k, (lab, v) in enumerate(pairs):
        y = 24 + 18 * k
        bw = max(1.0, v / vmax * (w - L - 90))
        out.append(f'<text x="{L - 6}" y="{y + 11}" text-anchor="end">{html.escape(lab[-52:])}</text>')
        out.append(f'<rect x="{L}" y="{y}" width="{bw:.1f}" height="13" fill="#d62728"/>')
        out.append(f'<text x="{L + bw + 4:.1f}" y="{y + 11}">{_fmt(v)} {html.escape(unit)}</text>')
    out.append("</svg>")
    return "".join(out)


def _per_layer(report, kind: str, mode: str, metric: str) -> list[tuple[float, float]]:
    return [(op["layer"], (op[mode] or {}).get(metric, math.nan)) for op in
            sorted((o for o in report.operators if o["kind"] == kind and o["layer"] is not None),
                   key=lambda o: o["layer"])]


def _worst_linear(report) -> list[tuple[float, float]]:
    worst: dict[int, float] = {}
    for op in report.operators:
        if op["kind"] == "linear" and op["layer"] is not None and op["isolated"]:
            v = op["isolated"]["sqnr_db"]
            worst[op["layer"]] = min(worst.get(op["layer"], math.inf), v)
    return sorted(worst.items())


def write_html(report, path) -> None:
    d = report.data
    charts = [
        _line_chart({"layer output, accumulated": _per_layer(report, "layer", "accumulated", "sqnr_db"),
                     "layer, isolated": _per_layer(report, "layer", "isolated", "sqnr_db"),
                     "attention, isolated": _per_layer(report, "attention", "isolated", "sqnr_db"),
                     "mlp, isolated": _per_layer(report, "mlp", "isolated", "sqnr_db"),
                     "worst linear, isolated": _worst_linear(report)},
                    "Per-layer SQNR (higher is better; identical outputs are infinite and not drawn)",
                    "decoder layer", "SQNR dB"),
        _line_chart({"accumulated": _per_layer(report, "attention_probs", "accumulated", "kl"),
                     "isolated": _per_layer(report, "attention_probs", "isolated", "kl")},
                    "Per-layer KL of attention probabilities (nats per query row)", "decoder layer", "KL",
                    log_y=True),
    ]
    top = report.top(15)
    if any(op["impact"] for op in top):
        charts.append(_bar_chart([op["name"] for op in top], [(op["impact"] or {}).get("kl", math.nan) for op in top],
                                 "Top offenders: final-logit KL with only this operator compressed", "nats/token"))
    else:
        charts.append(_bar_chart([op["name"] for op in top],
                                 [(op["isolated"] or op["accumulated"] or {}).get("nsr", math.nan) for op in top],
                                 "Top offenders: isolated noise-to-signal ratio (impact not computed)", ""))
    edges = d["hist_edges_log10"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    series = {}
    for op in top[:5]:
        counts = op["hist"]["isolated"] or op["hist"]["accumulated"]
        total = sum(counts) or 1
        series[op["name"].removeprefix("model.")[-30:]] = [(c, n / total) for c, n in zip(centers, counts,
                                                                                          strict=True)]
    charts.append(_line_chart(series, "Error distributions of the top offenders (isolated): share of elements",
                              "log10 |candidate − reference|", "share"))
    rows = csv_rows(report)
    cols = ["rank", "name", "kind", "impact_kl", "impact_loss_delta", "isolated_sqnr_db", "accumulated_sqnr_db",
            "isolated_cosine", "accumulated_kl", "risk"]
    table = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for r in rows[:60]:
        style = ' style="background:#fde0dd"' if r["risk"] else ""
        table.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>")
    table.append("</table>")
    fl, t = d["final_logits"], d["timing"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>compactlm inspect</title>
<style>body{{font-family:sans-serif;margin:24px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}</style></head><body>
<h1>compactlm precision inspector</h1>
<p>Reference {html.escape(d['reference']['architecture'])} ({d['reference']['parameters']:,} parameters) vs candidate;
{d['sequences']} sequences, {d['tokens']:,} tokens. Final logits: KL {_fmt(fl.get('kl'))} nats/token,
SQNR {_fmt(fl.get('sqnr_db'))} dB, cosine {_fmt(fl.get('cosine'))}. Capture {t['capture_s']:.1f} s;
consumer-aware impact {t['impact_s']:.1f} s over {t['impact_units']} swapped operators.
{html.escape(runtime_summary(d))}</p>
{''.join(f'<div>{c}</div>' for c in charts)}
<h2>Operators ranked by impact (first 60)</h2>{''.join(table)}
<p>Machine: {html.escape(str(d['machine']))}</p></body></html>"""
    _write_text_atomic(path, doc)
