"""Token windows for evaluation and calibration, per ``../shared/PROTOCOL.md``.

- :func:`eval_windows` (PPL-wiki-512): tokenize once, no special tokens, non-overlapping windows,
  BOS prepended only where the tokenizer adds one by default.
- :func:`calibration_set` (CALIB-pg-512): ``n`` windows at offsets drawn with ``random.Random(seed)``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import tempfile

import torch

from ..errors import DataError
from ..models.loading import cache_dir
from .texts import load_text


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by default (what PPL-wiki-512 keys on)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _tokenizer_fingerprint(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _tokenize_cached(tokenizer, source: str) -> torch.Tensor:
    text = load_text(source)
    # Tokenizing the 3 MB wiki text takes ~10 s: keep the ids on disk, keyed by text and tokenizer.
    fingerprint = _tokenizer_fingerprint(tokenizer)
    path = None
    if fingerprint is not None:
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = cache_dir() / "tokens" / f"{key}-{fingerprint}.pt"
        if path.is_file():
            return torch.load(path).long()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        torch.save(out.to(torch.int32), tmp)
        os.replace(tmp, path)
    return out


def tokenize_source(tokenizer, source: str) -> torch.Tensor:
    """The whole text of ``source`` as one 1-D id tensor (cached per tokenizer and source)."""
    return _tokenize_cached(tokenizer, source)


def eval_windows(tokenizer, source: str = "wiki", seqlen: int = 512, windows: int | None = 200) -> torch.Tensor:
    """(N, seqlen [+1 with BOS]) windows of ``source``; ``windows=None`` takes every full window."""
    if seqlen < 2:
        raise DataError(f"window length must be at least 2 tokens, got {seqlen}")
    ids = tokenize_source(tokenizer, source)
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(f"data {source!r} has {ids.numel()} tokens, fewer than one {seqlen}-token window")
    n = available if windows is None else windows
    if n < 1:
        raise DataError(f"number of windows must be positive, got {n}")
    if n > available:
        raise DataError(f"data {source!r} has only {available} windows of {seqlen} tokens; asked for {n}")
    out = ids[: n * seqlen].view(n, seqlen)
    if adds_bos(tokenizer):
        out = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), out], dim=1)
    return out


def calibration_set(tokenizer, source: str = "essays", nsamples: int = 128, seqlen: int = 512,
                    seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows at offsets drawn with ``random.Random(seed)`` (CALIB-pg-512)."""
    if source == "wiki":
        raise DataError("never calibrate on the evaluation text: pick 'essays' or another source than 'wiki'")
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"calibration needs nsamples ≥ 1 and seqlen ≥ 1, got {nsamples} × {seqlen}")
    ids = tokenize_source(tokenizer, source)
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text {source!r} has {ids.numel()} tokens; need more than {seqlen}")
    rng = random.Random(seed)
    offsets = [rng.randint(0, ids.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[o: o + seqlen] for o in offsets])
