"""SALS calibration: per-layer eigenbasis of the concatenated pre-RoPE keys, saved and loaded with safetensors.

Based on arXiv 2510.24273, §4.1: for layer ℓ, K ∈ R^{N×(n_kv·d)} stacks the pre-RoPE keys of every KV head for
N calibration tokens; the projection is the top-r eigenvectors of KᵀK. We keep the whole eigenbasis (sorted by
eigenvalue) so one calibration serves every rank: the rank-r projection is its first r columns.
Keys are collected one layer at a time through ``adapter.key_pre_rope_module(i)`` (k_norm where the family has
one), accumulated as a (n_kv·d)² Gram matrix in fp64: no activations are stored.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CalibrationError, ConfigError, DataError
from ..utils import progress

FILENAME = "sals_projections.safetensors"
ATTR = "_compactlm_sals_projections"


@dataclass
class SALSProjections:
    """Eigenvectors (L, W, W) (columns sorted by descending eigenvalue) and eigenvalues (L, W) per layer."""

    eigvecs: torch.Tensor
    eigvals: torch.Tensor
    kv_heads: int
    head_dim: int
    meta: dict[str, str]

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    def proj(self, layer: int, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rank-r projection of ``layer`` split per KV head: (n_kv, d, r)."""
        u = self.eigvecs[layer, :, :rank]  # (W, r)
        return u.reshape(self.kv_heads, self.head_dim, rank).to(dtype).contiguous()

    def energy(self, layer: int, rank: int) -> float:
        """Fraction of ‖K‖² the first ``rank`` directions keep on the calibration keys."""
        ev = self.eigvals[layer].clamp(min=0)
        return float(ev[:rank].sum() / ev.sum().clamp(min=1e-30))

    def check(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        if self.eigvecs.shape[0] != num_layers or self.kv_heads != kv_heads or self.head_dim != head_dim:
            raise ConfigError(f"SALS projections were calibrated for {self.eigvecs.shape[0]} layers × {self.kv_heads} "
                              f"KV heads × head dim {self.head_dim}, but the model has {num_layers} × {kv_heads} × "
                              f"{head_dim}: calibrate again for this model")


@torch.no_grad()
def calibrate_sals(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 4, attach: bool = True,
                   meta: dict[str, str] | None = None) -> SALSProjections:
    """Gram matrices of the pre-RoPE keys over ``calib`` (N, T) token ids -> per-layer eigenbases."""
    from ..models import get_adapter

    if calib.ndim != 2 or calib.numel() == 0:
        raise DataError(f"calibration ids must be a non-empty (N, T) tensor, got shape {tuple(calib.shape)}")
    a = get_adapter(model)
    width = a.num_kv_heads * a.head_dim
    grams = torch.zeros(a.num_layers, width, width, dtype=torch.float64)
    device = a.embed_tokens.weight.device

    def hook_for(i: int):
        def hook(module, args, output):
            k = output.reshape(-1, width).double().cpu()  # (tokens, n_kv·d): heads concatenated
            grams[i].addmm_(k.T, k)
        return hook

    handles = [a.key_pre_rope_module(i).register_forward_hook(hook_for(i)) for i in range(a.num_layers)]
    try:
        for start in progress(range(0, calib.shape[0], batch_size), desc="SALS calibration"):
            model(calib[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not torch.isfinite(grams).all():
        raise CalibrationError("SALS calibration: non-finite pre-RoPE keys; check the model's dtype (try fp32)")
    evals, evecs = torch.linalg.eigh(grams)  # ascending
    proj = SALSProjections(evecs.flip(-1).float().contiguous(), evals.flip(-1).float().contiguous(),
                           a.num_kv_heads, a.head_dim,
                           {"format": "compactlm-sals-v1", "tokens": str(calib.numel()), **(meta or {})})
    if attach:
        setattr(model, ATTR, proj)
    return proj


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / FILENAME if p.is_dir() or p.suffix != ".safetensors" else p


def save_projections(proj: SALSProjections, path: str | os.PathLike[str]) -> Path:
    """Write ``proj`` to a .safetensors file, or into a model folder as ``sals_projections.safetensors``."""
    from safetensors.torch import save_file

    out = _resolve_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**proj.meta, "kv_heads": str(proj.kv_heads), "head_dim": str(proj.head_dim)}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file({"eigvecs": proj.eigvecs.contiguous(), "eigvals": proj.eigvals.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_projections(path: str | os.PathLike[str]) -> SALSProjections:
    from safetensors import safe_open

    p = _resolve_path(path)
    if not p.is_file():
        raise DataError(f"no SALS projections at {p}; create them with `compactlm sals calibrate MODEL --out {p}`")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            eigvecs, eigvals = f.get_tensor("eigvecs"), f.get_tensor("eigvals")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{p} is not a readable SALS projection file: {exc}") from None
    if meta.get("format") != "compactlm-sals-v1":
        raise DataError(f"{p} is not a compactlm SALS projection file (format={meta.get('format')!r})")
    kv, hd = int(meta.pop("kv_heads")), int(meta.pop("head_dim"))
    return SALSProjections(eigvecs, eigvals, kv, hd, meta)


def projections_for(model: torch.nn.Module, path: str | None) -> SALSProjections:
    """The projections a SALS config uses: from ``path``, else those attached by :func:`calibrate_sals`."""
    from ..models import get_adapter

    proj = load_projections(path) if path else getattr(model, ATTR, None)
    if proj is None:
        raise ConfigError("SALS needs calibrated projections: call compactlm.attention.sals_calib.calibrate_sals("
                          "model, calib) (attaches them to the model), or run `compactlm sals calibrate MODEL --out "
                          "PATH` and pass SALSConfig(projections=PATH)")
    a = get_adapter(model)
    proj.check(a.num_layers, a.num_kv_heads, a.head_dim)
    return proj


def default_cache_path(model: torch.nn.Module, nsamples: int) -> Path | None:
    """Where projections for a model loaded from a local folder are cached (None for in-memory models)."""
    src = getattr(model.config, "_name_or_path", "") or ""
    if not src or not Path(src).exists():
        return None
    import hashlib

    root = Path(os.environ.get("COMPACTLM_CACHE", Path.home() / ".cache" / "compactlm")) / "sals"
    key = hashlib.sha1(f"{Path(src).resolve()}|{model.dtype}|{nsamples}".encode()).hexdigest()[:16]
    return root / f"{Path(src).name}-{key}.safetensors"


def ensure_projections(model: torch.nn.Module, tokenizer=None, nsamples: int = 32) -> SALSProjections:
    """Attached projections; else cached ones for this model folder; else calibrate on CALIB-pg-512 (quick
    variant, 32 × 512), cache and attach. Without a tokenizer, the model folder's own tokenizer is loaded."""
    proj = getattr(model, ATTR, None)
    if proj is not None:
        return proj
    cached = default_cache_path(model, nsamples)
    if cached is not None and cached.is_file():
        proj = load_projections(cached)
        setattr(model, ATTR, proj)
        return proj
    if tokenizer is None:
        src = getattr(model.config, "_name_or_path", "")
        if cached is None:
            raise ConfigError("SALS needs calibrated projections and this model has no local folder to take a "
                              "tokenizer from: calibrate_sals(model, calib) first, or pass projections=PATH")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    from ..data import calibration_set

    calib = calibration_set(tokenizer, "essays", nsamples=nsamples, seqlen=512, seed=0)
    proj = calibrate_sals(model, calib, meta={"calibration": f"CALIB-pg-512 ({nsamples} x 512)"})
    if cached is not None:
        save_projections(proj, cached)
    return proj
