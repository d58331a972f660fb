"""``compactlm report DIR``: render DIR/report.json as a self-contained HTML page and print the summary."""

from __future__ import annotations

from .common import add_common, print_table


def register(groups) -> None:
    p = groups[""].add_parser("report", help="render a `compress` output folder's report as HTML",
                              description="Write DIR/report.html (inline SVG plots, no network) from DIR/report.json "
                                          "and print the summary table.")
    add_common(p, model=False, json_out=False)
    p.add_argument("folder", metavar="DIR", help="an output folder of `compactlm compress`")
    p.add_argument("--html", metavar="PATH", help="where to write the page (default DIR/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.html import read_folder, summary_rows, write_report

    report, _ = read_folder(args.folder)
    path = write_report(args.folder, args.html)
    print_table(summary_rows(report))
    print(f"wrote {path}")
    return 0
