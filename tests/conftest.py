"""Shared fixtures: tiny random models built in-process (no network), a char-level fake tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("COMPACTLM_QUIET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _same_rng_state_per_test():
    """Every test starts from one RNG state: unseeded draws then do not depend on which tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    from compactlm.models import tiny_model

    return tiny_model("llama")


class CharTokenizer:
    """A minimal tokenizer: one id per byte, optional BOS, enough for the windowing and PPL code paths."""

    def __init__(self, add_bos: bool = False):
        self.bos_token_id = 1 if add_bos else None
        self._add_bos = add_bos

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [3 + (b % 250) for b in text.encode("utf-8")]
        if add_special_tokens and self._add_bos:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def default_model():
    from compactlm.models import load

    return load("smollm2-135m")
