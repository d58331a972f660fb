"""Data: protocol texts (wiki, essays), local files, calibration and evaluation windows."""

from .calib import adds_bos, calibration_set, eval_windows, tokenize_source
from .texts import essays, essays_text, load_text, wiki_text

__all__ = ["adds_bos", "calibration_set", "eval_windows", "tokenize_source", "essays", "essays_text",
           "load_text", "wiki_text"]
