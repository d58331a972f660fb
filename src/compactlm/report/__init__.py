"""The compression report: measurements side by side (:mod:`.measure`) and a self-contained HTML page (:mod:`.html`)."""

from .html import render_html, write_report

__all__ = ["render_html", "write_report"]
