"""Evaluation: perplexity (PPL-wiki-512), long-context runners, lm-eval integration."""

from .ppl import PerplexityResult, nll_sum, paired_ppl_interval, perplexity

__all__ = ["PerplexityResult", "nll_sum", "paired_ppl_interval", "perplexity"]
