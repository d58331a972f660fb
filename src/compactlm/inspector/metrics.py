"""Error metrics between a reference tensor and a candidate tensor: pure functions plus streaming accumulators.

Conventions (``ref`` is the reference output, ``cand`` the candidate's, ``e = cand - ref``):

- cosine similarity of the flattened tensors;
- SQNR (dB) = 10·log10(Σref² / Σe²) = 20·log10(‖ref‖ / ‖e‖), the signal-to-quantization-noise ratio of
  torch.ao's ``compute_sqnr`` (``inf`` for identical tensors);
- noise-to-signal ratio NSR = Σe² / Σref² (= 10^(−SQNR/10));
- max abs error max|e|; relative Frobenius error ‖e‖ / ‖ref‖ (= √NSR);
- KL(P_ref ‖ P_cand) of distributions, averaged over rows: next-token distributions from logits, and
  attention probabilities (each query row of each head is one distribution).

The inspector never holds more than one batch of one operator: :class:`ErrorStats` keeps running sums
(fp32 reductions per batch, accumulated in float64), a running max, the summed row KL, and a fixed-bin
histogram of log10|e| over a strided sample of each batch (the error distribution the report plots), so
memory is bounded whatever the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Rows of a distribution are processed in chunks so a (tokens × vocab) KL never materialises three full copies.
_KL_CHUNK_ROWS = 1024
# log10|e| histogram: fixed bins so histograms from different batches (and runs) add up.
HIST_LO, HIST_HI, HIST_BINS = -10.0, 4.0, 56
HIST_SAMPLE = 1 << 16
# Probabilities below this are clamped before log: a candidate that zeroes an entry the reference kept (sparse
# attention) gets a large but finite KL instead of inf.
PROB_FLOOR = 1e-12


def _flat(ref: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}")
    return ref.detach().reshape(-1).double(), cand.detach().reshape(-1).double()


def cosine(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    r, c = _flat(ref, cand)
    denom = r.norm() * c.norm()
    if denom == 0:
        return 1.0 if torch.equal(r, c) else 0.0
    return float((r @ c) / denom)


def sqnr_db(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """SQNR in dB, 20·log10(‖ref‖/‖cand − ref‖); ``inf`` when the tensors are equal."""
    r, c = _flat(ref, cand)
    return _sqnr_from_sums(float(r.square().sum()), float((c - r).square().sum()))


def noise_to_signal(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Σ(cand − ref)² / Σref² (``inf`` if the reference is zero and the candidate is not)."""
    r, c = _flat(ref, cand)
    return _ratio(float((c - r).square().sum()), float(r.square().sum()))


def max_abs(ref: torch.Tensor, cand: torch.Tensor) -> float:
    r, c = _flat(ref, cand)
    return float((c - r).abs().max()) if r.numel() else 0.0


def relative_frobenius(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """‖cand − ref‖_F / ‖ref‖_F."""
    return math.sqrt(noise_to_signal(ref, cand))


def kl_from_logits(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(ref) ‖ softmax(cand)) in nats over the last dim; returns shape ``ref.shape[:-1]``."""
    if ref_logits.shape != cand_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}")
    vocab = ref_logits.shape[-1]
    r = ref_logits.reshape(-1, vocab)
    c = cand_logits.reshape(-1, vocab)
    out = torch.empty(r.shape[0], dtype=torch.float64)
    for s in range(0, r.shape[0], _KL_CHUNK_ROWS):
        lp = F.log_softmax(r[s: s + _KL_CHUNK_ROWS].float(), dim=-1)  # (rows, V)
        lq = F.log_softmax(c[s: s + _KL_CHUNK_ROWS].float(), dim=-1)
        out[s: s + _KL_CHUNK_ROWS] = (lp.exp() * (lp - lq)).sum(-1).double()
    return out.reshape(ref_logits.shape[:-1])


def kl_from_probs(ref_probs: torch.Tensor, cand_probs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(ref ‖ cand) of probability rows (attention probabilities); returns ``ref.shape[:-1]``.

    Terms where the reference is 0 contribute 0 (causal masks); candidate zeros are clamped to
    :data:`PROB_FLOOR` so the KL stays finite (and large) when a sparse candidate drops kept mass.
    """
    if ref_probs.shape != cand_probs.shape:
        raise ValueError(f"shape mismatch: {tuple(ref_probs.shape)} vs {tuple(cand_probs.shape)}")
    n = ref_probs.shape[-1]
    p_all = ref_probs.reshape(-1, n)
    q_all = cand_probs.reshape(-1, n)
    out = torch.empty(p_all.shape[0], dtype=torch.float64)
    for s in range(0, p_all.shape[0], _KL_CHUNK_ROWS):
        p = p_all[s: s + _KL_CHUNK_ROWS].double()
        q = q_all[s: s + _KL_CHUNK_ROWS].double()
        terms = torch.where(p > 0, p * (p.clamp_min(PROB_FLOOR).log() - q.clamp_min(PROB_FLOOR).log()), 0.0)
        out[s: s + _KL_CHUNK_ROWS] = terms.sum(-1).clamp_min(0.0)
    return out.reshape(ref_probs.shape[:-1])


def _sqnr_from_sums(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _ratio(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


@dataclass
class ErrorStats:
    """Streaming accumulator of every metric above for one operator in one mode (bounded memory).

    ``update(ref, cand)`` adds a batch; ``update_kl(rows_kl)`` adds per-row KL values (for distribution
    operators); ``summary()`` returns the metrics as a dict of floats.
    """

    signal: float = 0.0  # Σ ref²
    noise: float = 0.0  # Σ e²
    cand_energy: float = 0.0  # Σ cand²
    dot: float = 0.0  # Σ ref·cand
    max_abs: float = 0.0
    elements: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    kl_rows: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)

    def update(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        if ref.shape != cand.shape:
            raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}")
        # fp32 reductions (BLAS dot, cascaded sums) accumulated into Python floats (float64) per batch: the
        # per-batch relative error is ~1e-6, far below any error worth reporting, and it is 3x cheaper than
        # converting whole activations to float64.
        r = ref.detach().reshape(-1).float()
        c = cand.detach().reshape(-1).float()
        e = c - r
        signal, noise, ref_err = float(torch.dot(r, r)), float(torch.dot(e, e)), float(torch.dot(r, e))
        self.signal += signal
        self.noise += noise
        self.dot += signal + ref_err  # r·c = r·r + r·e
        self.cand_energy += signal + 2.0 * ref_err + noise  # ‖c‖² = ‖r‖² + 2 r·e + ‖e‖²
        self.elements += r.numel()
        if noise > 0.0:
            self.max_abs = max(self.max_abs, float(e.abs().max()))
            # The error distribution is a plot, not a metric: a strided sample of at most HIST_SAMPLE
            # elements per batch keeps its cost flat for (tokens × vocab) logits.
            step = max(1, e.numel() // HIST_SAMPLE)
            sample = e[::step].abs()
            nz = sample[sample > 0]
            if nz.numel():
                logs = nz.log10().clamp(HIST_LO, HIST_HI - 1e-9)
                counts = torch.histc(logs, bins=HIST_BINS, min=HIST_LO, max=HIST_HI)
                self.hist = [a + int(b) for a, b in zip(self.hist, counts.tolist(), strict=True)]

    def add_exact(self, ref: torch.Tensor, kl_rows: int = 0) -> None:
        """Count a batch in which the candidate equals ``ref`` exactly (no error), without comparing tensors."""
        r = ref.detach().reshape(-1).float()
        signal = float(torch.dot(r, r))
        self.signal += signal
        self.dot += signal
        self.cand_energy += signal
        self.elements += r.numel()
        self.kl_rows += kl_rows

    def update_kl(self, rows_kl: torch.Tensor) -> None:
        if rows_kl.numel():
            self.kl_sum += float(rows_kl.double().sum())
            self.kl_max = max(self.kl_max, float(rows_kl.max()))
            self.kl_rows += rows_kl.numel()

    def merge(self, other: ErrorStats) -> None:
        for name in ("signal", "noise", "cand_energy", "dot", "elements", "kl_sum", "kl_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs = max(self.max_abs, other.max_abs)
        self.kl_max = max(self.kl_max, other.kl_max)
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]

    @property
    def differs(self) -> bool:
        return self.noise > 0.0

    def summary(self) -> dict[str, Any]:
        denom = math.sqrt(self.signal * self.cand_energy)
        cos = self.dot / denom if denom > 0 else (1.0 if self.noise == 0 else 0.0)
        nsr = _ratio(self.noise, self.signal)
        out: dict[str, Any] = {
            "cosine": cos,
            "sqnr_db": _sqnr_from_sums(self.signal, self.noise),
            "nsr": nsr,
            "max_abs": self.max_abs,
            "rel_fro": math.sqrt(nsr),
            "elements": self.elements,
        }
        if self.kl_rows:
            out["kl"] = self.kl_sum / self.kl_rows
            out["kl_max"] = self.kl_max
        return out


def hist_edges() -> list[float]:
    """The log10|e| bin edges of :attr:`ErrorStats.hist` (``HIST_BINS + 1`` values)."""
    step = (HIST_HI - HIST_LO) / HIST_BINS
    return [HIST_LO + i * step for i in range(HIST_BINS + 1)]
