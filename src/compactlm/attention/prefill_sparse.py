"""Block-sparse prefill attention: shared query-group patterns, KV-block top-k, dense head/tail, bad-layer skip.

Queries are cut into groups of ``share_len`` tokens (``long_share_len`` from ``long_from`` keys on); each
group picks one set of KV blocks (``block_size`` tokens) from pooled queries and keys, shared by all its
queries and, under GQA, by every query head of a KV head, so the kernel reads whole (query block, KV block)
tiles. Ideas from MInference (arXiv 2407.02490,
§3: vertical-slash and block-sparse patterns estimated from pooled or last queries), Quest (arXiv
2406.10774, §3: per-channel key min/max bounds) and StreamingLLM (arXiv 2309.17453, §3: attention sinks).

Score modes (per head, per (query group, KV block), in log-mass units):
  ``mean``  mean-pooled query . mean-pooled key;
  ``max``   the largest score of any query of the group against the mean-pooled key;
  ``lse``   log-sum-exp over the block's keys of the mean-pooled query's scores (block mass estimate);
  ``quest`` Quest's upper bound sum_d max(q_d kmax_d, q_d kmin_d) for the mean-pooled query;
  ``vertical_slash`` MInference's estimate from the last ``last_q`` queries: column (vertical) mass of the
            block plus diagonal (slash) mass of the offsets the (group, block) tile spans.
Always kept: ``sink_blocks`` first blocks, the group's own (diagonal) blocks and ``tail_blocks`` before them.
Groups starting before ``dense_head`` or ending after ``len - dense_tail`` attend densely; layers in
``dense_layers`` keep the model's dense attention (propose them with :mod:`.prefill_profile`).
Budget: ``keep_ratio`` of each group's causal blocks (ranked by the max over the KV head's query heads of
each head's normalised score, a union that respects the budget), or ``threshold``: per head the fewest
blocks holding that share of the estimated mass, unioned over the KV head's query heads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..config import BaseConfig
from ..errors import ConfigError
from ..kernels.block_prefill import IMPLS, BlockLayout, block_attention, layout_from_mask
from ..models.adapter import get_adapter
from .runtime import PhaseHandlers, register_runtime

SCORES = ("mean", "max", "lse", "quest", "vertical_slash")


@dataclass(frozen=True)
class SparsePrefillConfig(BaseConfig):
    """Block-sparse prefill attention (see the module docstring for the fields' meaning)."""

    share_len: int = 128
    long_share_len: int | None = 256
    long_from: int = 16384
    block_size: int = 64
    score: str = "lse"
    keep_ratio: float | None = 0.25
    threshold: float | None = None
    sink_blocks: int = 1
    tail_blocks: int = 2
    dense_head: int = 1024
    dense_tail: int = 0
    dense_layers: tuple[int, ...] = ()
    last_q: int = 64
    impl: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(i) for i in self.dense_layers))))
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16 (e.g. 64), got {self.block_size}")
        if self.share_len < self.block_size or self.share_len % self.block_size:
            raise ConfigError(f"share_len must be a multiple of block_size={self.block_size} (e.g. 128 or 256), "
                              f"got {self.share_len}")
        if self.long_share_len is not None and self.long_share_len > self.share_len and (
                self.long_share_len % self.block_size):
            raise ConfigError(f"long_share_len must be a multiple of block_size={self.block_size} (e.g. 256) or None "
                              f"(share_len at every length), got {self.long_share_len}")
        if self.long_from < 1:
            raise ConfigError(f"long_from is a prompt length in tokens >= 1 (e.g. 16384), got {self.long_from}")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}")
        if (self.keep_ratio is None) == (self.threshold is None):
            raise ConfigError("set exactly one budget: keep_ratio (e.g. 0.25) or threshold (e.g. 0.9), "
                              f"got keep_ratio={self.keep_ratio}, threshold={self.threshold}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold (cumulative score mass) must be in (0, 1], got {self.threshold}")
        for name in ("sink_blocks", "tail_blocks", "dense_head", "dense_tail"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.last_q < 1:
            raise ConfigError(f"last_q must be >= 1 (MInference uses 64), got {self.last_q}")
        if any(i < 0 for i in self.dense_layers):
            raise ConfigError(f"dense_layers are layer indices >= 0, got {self.dense_layers}")
        if self.impl not in IMPLS:
            raise ConfigError(f"impl must be one of {IMPLS}, got {self.impl!r}")


    def at_length(self, kv_len: int) -> SparsePrefillConfig:
        """The config a call over ``kv_len`` keys runs with: from ``long_from`` keys on, query groups of
        ``long_share_len`` tokens when that is larger than ``share_len``.

        Why: on a CPU the gather kernel's calls get more efficient with more query rows, and each group pays
        one selection row and one K/V gather. At 32K, groups of 256 ran 2.66x faster than SDPA against 2.27x
        for 128 (docs/prefill-sparse.md); below 16K the smaller groups keep the selection finer.
        """
        if self.long_share_len is None or kv_len < self.long_from or self.long_share_len <= self.share_len:
            return self
        return dataclasses.replace(self, share_len=self.long_share_len)


SparsePrefill = SparsePrefillConfig  # the short name used in ``sparse_attention(model, SparsePrefill(...))``


# --- block scores -----------------------------------------------------------------------------------------

def _grouped(x: torch.Tensor, front: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, H, T, D) into groups of ``size`` after ``front`` empty rows: (B, H, N, size, D), counts (N,)."""
    t = x.shape[2]
    n = -(-(front + t) // size)
    if front or n * size != t:  # pad only when needed: this is on the hot path at 32K tokens
        x = torch.nn.functional.pad(x, (0, 0, front, n * size - front - t))
    rows = torch.arange(n * size, device=x.device)
    counts = ((rows >= front) & (rows < front + t)).view(n, size).sum(-1)
    return x.view(*x.shape[:2], n, size, x.shape[-1]), counts


def _mean(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # Padded rows are zeros, so the sum over a group is the sum over its real rows. Summing in the input
    # dtype (torch accumulates bf16 reductions in fp32 internally) avoids an fp32 copy of all of q and k.
    return x.sum(-2).float() / counts.clamp_min(1)[:, None].float()


def block_scores(q: torch.Tensor, k: torch.Tensor, cfg: SparsePrefillConfig, scale: float) -> torch.Tensor:
    """Estimated log attention mass (B, H, NG, NK) of each KV block for each query group, per query head.

    Up to a constant per (head, group) row, which the selection's softmax over blocks cancels. Groups are
    ``cfg.at_length(Tk).share_len`` tokens.
    """
    cfg = cfg.at_length(k.shape[2])
    bsz, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    front = (kv_len - q_len) % cfg.share_len
    if cfg.score == "vertical_slash":
        return _vertical_slash(q, k, cfg, scale, front)
    qg, q_counts = _grouped(q, front, cfg.share_len)  # (B, H, NG, L, D)
    kb, k_counts = _grouped(k, 0, cfg.block_size)  # (B, Hk, NK, blk, D)
    ng, nk = qg.shape[2], kb.shape[2]
    # Query heads of one KV head share its keys: (B, Hk, G, ...) against (B, Hk, 1, ...), never repeating keys.
    q_mean = _mean(qg, q_counts).view(bsz, kv_heads, group, ng, dim)
    k_mean = _mean(kb, k_counts)[:, :, None]  # (B, Hk, 1, NK, D)
    if cfg.score == "mean":
        return (q_mean @ k_mean.transpose(-1, -2) * scale).view(bsz, heads, ng, nk)
    if cfg.score == "quest":
        kf = kb.float()
        ragged = k_counts[-1] < cfg.block_size
        k_max = (kf.masked_fill(_tail_pad(k_counts, cfg.block_size)[..., None], -math.inf) if ragged else kf).amax(-2)
        k_min = (kf.masked_fill(_tail_pad(k_counts, cfg.block_size)[..., None], math.inf) if ragged else kf).amin(-2)
        bound = (q_mean.clamp_min(0) @ k_max[:, :, None].transpose(-1, -2)
                 + q_mean.clamp_max(0) @ k_min[:, :, None].transpose(-1, -2))
        return (bound * scale).view(bsz, heads, ng, nk)
    per_group = bsz * heads * max(cfg.share_len * nk, kv_len)
    chunk = max(1, 2**24 // per_group)  # at most ~64 MiB of fp32 scores at a time
    out = []
    if cfg.score == "max":
        q_valid = _front_pad(q_counts, front, cfg.share_len)  # (NG, L) rows that are real queries
        kmT = k_mean.transpose(-1, -2)  # (B, Hk, 1, D, NK)
        for g0 in range(0, ng, chunk):
            qc = qg[:, :, g0:g0 + chunk].float().view(bsz, kv_heads, group, -1, dim)  # (B, Hk, G, c*L, D)
            s = (qc @ kmT).view(bsz, heads, -1, cfg.share_len, nk) * scale
            out.append(s.masked_fill(~q_valid[g0:g0 + chunk, :, None], -math.inf).amax(-2))
        return torch.cat(out, 2)
    # lse: log-sum-exp over each block's keys of the mean query's scores = log of the block's mass. Computed
    # as log(block sum of the row's softmax), i.e. the block's lse minus the row's: a per-(head, group)
    # constant that select_blocks' softmax over blocks cancels. One fused softmax in the input dtype replaces
    # five fp32 passes (max, sub, exp, sum, log) over (H, NG, Tk): 2.9x faster at 16K on this CPU.
    tiny = torch.finfo(torch.float32).tiny
    g_first = kv_len - q_len - front  # absolute position of group 0's first (padded) row
    for g0 in range(0, ng, chunk):
        qc = (q_mean[:, :, :, g0:g0 + chunk] * scale).to(k.dtype)  # (B, Hk, G, c, D)
        c = qc.shape[3]
        # Only the keys up to the chunk's last query can be selected: the later (future) blocks are skipped,
        # which halves the cost over a whole prefill; they get the floor score (selection masks them anyway).
        nkc = min(nk, -(-(g_first + (g0 + c) * cfg.share_len) // cfg.block_size))
        tc = min(kv_len, nkc * cfg.block_size)
        # One (G*c, D) x (D, Tc) product per KV head, in the input dtype (bf16 runs ~2.5x faster on this CPU).
        # 2-D mm on a transposed view reads the keys in place; a batched matmul on a prefix of the keys copied
        # them on every chunk.
        qf = qc.flatten(2, 3)  # (B, Hk, G*c, D)
        s = torch.empty(bsz, kv_heads, qf.shape[2], tc, dtype=k.dtype, device=k.device)
        for b in range(bsz):
            for h in range(kv_heads):
                torch.mm(qf[b, h], k[b, h, :tc].T, out=s[b, h])
        p = torch.softmax(s, -1)  # (B, Hk, G*c, Tc)
        if tc < nkc * cfg.block_size:  # whole blocks (zero-mass padding; F.pad would copy even for 0)
            p = torch.nn.functional.pad(p, (0, nkc * cfg.block_size - tc))
        # Block sums accumulate in fp32 inside torch's reduction; storing them in the input dtype (2^-9
        # relative in bf16) skips an fp32 copy of p.
        mass = p.unflatten(-1, (nkc, cfg.block_size)).sum(-1).float()
        mass = torch.nn.functional.pad(mass, (0, nk - nkc))  # (B, Hk, G*c, NK)
        # A block whose share underflows (or lies past the chunk) gets the smallest normal instead of
        # log(0) = -inf, so a row never turns all -inf (and NaN) when some keys dominate it.
        out.append(mass.clamp_min_(tiny).log_().view(bsz, heads, c, nk))
    return torch.cat(out, 2)


def _tail_pad(counts: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) True where a row is end padding (groups/blocks are filled from the front, except the first)."""
    return torch.arange(size, device=counts.device)[None, :] >= counts[:, None]


def _front_pad(counts: torch.Tensor, front: int, size: int) -> torch.Tensor:
    """(N, size) True for real rows: ``front`` empty rows lead the first group, end padding trails the last."""
    rows = torch.arange(counts.shape[0] * size, device=counts.device)
    return ((rows >= front) & (rows < front + int(counts.sum()))).view(-1, size)


def _vertical_slash(q: torch.Tensor, k: torch.Tensor, cfg: SparsePrefillConfig, scale: float,
                    front: int) -> torch.Tensor:
    """MInference §3.2: last queries' column mass (vertical) and per-offset mass (slash), pooled to tiles."""
    group = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    n = min(cfg.last_q, q_len)
    pos = torch.arange(kv_len - n, kv_len, device=q.device)  # absolute positions of the last queries
    s = q[:, :, -n:].float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale  # (B, H, n, Tk)
    keys = torch.arange(kv_len, device=q.device)
    s = s.masked_fill(keys[None, :] > pos[:, None], -math.inf)
    a = torch.softmax(s, -1)
    vertical = a.sum(2)  # (B, H, Tk)
    offsets = (pos[:, None] - keys[None, :]).clamp_min(0).expand_as(a[0, 0])  # (n, Tk)
    slash = torch.zeros_like(vertical).scatter_add_(-1, offsets.flatten().expand(*a.shape[:2], -1), a.flatten(2))
    blk, size = cfg.block_size, cfg.share_len
    nk = -(-kv_len // blk)
    v_blocks = torch.nn.functional.pad(vertical, (0, nk * blk - kv_len)).unflatten(-1, (nk, blk)).sum(-1)  # (B,H,NK)
    csum = torch.nn.functional.pad(slash.cumsum(-1), (1, 0))  # csum[o] = sum of slash[< o]
    ng = -(-(front + q_len) // size)
    g_start = (kv_len - q_len - front) + torch.arange(ng, device=q.device) * size
    g_end = (g_start + size).clamp_max(kv_len) - 1  # last query position of each group
    j_start = torch.arange(nk, device=q.device) * blk
    j_end = (j_start + blk).clamp_max(kv_len) - 1
    lo = (g_start[:, None] - j_end[None, :]).clamp(0, kv_len)  # smallest offset the tile spans
    hi = (g_end[:, None] - j_start[None, :] + 1).clamp(0, kv_len)  # one past the largest
    slash_mass = csum[..., hi.flatten()] - csum[..., lo.flatten()]  # (B, H, NG*NK)
    mass = v_blocks[:, :, None, :] + slash_mass.unflatten(-1, (ng, nk)).clamp_min(0)
    return torch.log(mass + 1e-9)


# --- selection -------------------------------------------------------------------------------------------

@torch.no_grad()  # a discrete choice: no gradient flows through it (and its matmuls write into buffers)
def select_blocks(q: torch.Tensor, k: torch.Tensor, cfg: SparsePrefillConfig,
                  scale: float | None = None) -> BlockLayout:
    """Choose the KV blocks of every query block: q (B, H, Tq, D), k (B, H_kv, Tk, D) -> BlockLayout."""
    cfg = cfg.at_length(k.shape[2])
    bsz, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group, blk, size = heads // kv_heads, cfg.block_size, cfg.share_len
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    offset = kv_len - q_len
    g_first = offset - offset % size  # absolute start of group 0
    scores = block_scores(q, k, cfg, scale)  # (B, H, NG, NK)
    ng, nk = scores.shape[-2:]
    dev = q.device
    g_start = g_first + torch.arange(ng, device=dev) * size
    g_last = (g_start + size).clamp_max(kv_len) - 1  # last query position in each group
    cols = torch.arange(nk, device=dev)
    causal = cols[None, :] * blk <= g_last[:, None]  # (NG, NK)
    forced = causal & ((cols[None, :] < cfg.sink_blocks) | (cols[None, :] >= g_start[:, None] // blk - cfg.tail_blocks))
    dense = (g_start < cfg.dense_head) | (g_last >= kv_len - cfg.dense_tail)
    forced = forced | (causal & dense[:, None])
    probs = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)  # per head, over the group's causal blocks
    if cfg.keep_ratio is not None:
        combined = probs.view(bsz, kv_heads, group, ng, nk).amax(2)  # (B, Hk, NG, NK)
        combined = combined.masked_fill(forced, 2.0).masked_fill(~causal, -1.0)
        budget = torch.ceil(causal.sum(-1) * cfg.keep_ratio).long()  # (NG,)
        budget = torch.maximum(budget, forced.sum(-1))
        width = int(budget.max())
        idx = combined.topk(width, dim=-1).indices  # (B, Hk, NG, width)
        take = torch.arange(width, device=dev) < budget[:, None]  # (NG, width)
        keep = torch.zeros_like(combined, dtype=torch.bool).scatter_(-1, idx, take.expand_as(idx))
    else:
        ordered, order = probs.sort(-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the higher-ranked blocks
        head_keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < cfg.threshold)
        keep = head_keep.view(bsz, kv_heads, group, ng, nk).any(2)
    keep = (keep | forced) & causal
    # Query blocks (block_size) inherit their group's set; layout_from_mask drops blocks in their future.
    q_first = offset - offset % blk
    nqb = -(-(kv_len - q_first) // blk)
    qb_group = (q_first + torch.arange(nqb, device=dev) * blk - g_first) // size
    return layout_from_mask(keep[:, :, qb_group], blk, q_len, kv_len)


# --- the handler -----------------------------------------------------------------------------------------

@dataclass
class PrefillStats:
    """Per-run record of what the prefill handlers did (the scope's ``state``): nothing degrades silently."""

    sparse_calls: Counter = field(default_factory=Counter)  # layer -> calls served block-sparse
    dense_calls: Counter = field(default_factory=Counter)  # (layer, reason) -> calls served densely
    computed_blocks: int = 0
    causal_blocks: int = 0
    select_seconds: float = 0.0
    attention_seconds: float = 0.0
    masks_seen: dict = field(default_factory=dict, repr=False)  # mask identity -> is plain causal

    def block_fraction(self) -> float:
        return self.computed_blocks / max(1, self.causal_blocks)

    def summary(self) -> dict:
        reasons = Counter()
        for (_, reason), n in self.dense_calls.items():
            reasons[reason] += n
        return {"sparse_calls": sum(self.sparse_calls.values()), "dense_calls": dict(reasons),
                "block_fraction": self.block_fraction(), "select_seconds": self.select_seconds,
                "attention_seconds": self.attention_seconds}


def _plain_causal(mask: torch.Tensor, q_len: int, kv_len: int, seen: dict) -> bool:
    """Whether a boolean SDPA-format mask (B, 1|H, Tq, Tk) is exactly causal (as with a cache, no padding)."""
    key = (mask.data_ptr(), tuple(mask.shape))
    if key not in seen:  # every layer of one forward gets the same mask: compare it once
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
            seen[key] = False
        else:
            rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
            causal = torch.arange(kv_len, device=mask.device)[None, :] <= rows
            seen[key] = bool(torch.equal(mask, causal.expand_as(mask)))
        while len(seen) > 4:
            seen.pop(next(iter(seen)))
    return seen[key]


def _dense_reason(cfg: SparsePrefillConfig, query, key, attention_mask, kwargs, seen: dict) -> str | None:
    if attention_mask is not None and not _plain_causal(attention_mask, query.shape[2], key.shape[2], seen):
        return "attention_mask"  # padding or a custom mask: the block layout assumes plain causal attention
    if kwargs.get("sliding_window"):
        return "sliding_window"
    if key.shape[2] <= cfg.dense_head:
        return "short"  # every group would be dense anyway
    if query.shape[2] > key.shape[2]:
        return "shape"
    if query.requires_grad and cfg.impl in ("auto", "gather", "flex") and query.device.type == "cpu":
        # FlexAttention has no CPU backward and the gather kernel writes into preallocated buffers (out=):
        # run under torch.no_grad() to go sparse.
        return "requires_grad"
    return None


def make_handler(cfg: SparsePrefillConfig, layer: int, stats: PrefillStats):
    def handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        reason = _dense_reason(cfg, query, key, attention_mask, kwargs, stats.masks_seen)
        if reason is not None:
            stats.dense_calls[(layer, reason)] += 1
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        start = time.perf_counter()
        layout = select_blocks(query, key, cfg, scaling)
        mid = time.perf_counter()
        out = block_attention(query, key, value, layout, scaling, cfg.impl)  # (B, H, T, D)
        stats.select_seconds += mid - start
        stats.attention_seconds += time.perf_counter() - mid
        stats.sparse_calls[layer] += 1
        stats.computed_blocks += layout.computed_blocks()
        stats.causal_blocks += layout.causal_blocks()
        return out.transpose(1, 2).contiguous(), None

    return handler


@register_runtime(SparsePrefillConfig)
def build_prefill_handlers(model, cfg: SparsePrefillConfig) -> PhaseHandlers:
    layers = get_adapter(model).num_layers
    bad = [i for i in cfg.dense_layers if i >= layers]
    if bad:
        raise ConfigError(f"dense_layers {bad} out of range for a {layers}-layer model (valid: 0..{layers - 1})")
    stats = PrefillStats()
    handlers = {i: make_handler(cfg, i, stats) for i in range(layers) if i not in cfg.dense_layers}
    return PhaseHandlers(prefill=handlers, state=stats)


@torch.no_grad()
def chunked_prefill(model, input_ids: torch.Tensor, chunk_size: int, cache=None):
    """Prefill ``input_ids`` (B, T) in chunks of ``chunk_size`` tokens through the cache (bounded activations).

    Each chunk's queries attend to the cached prefix plus themselves, so the block-sparse handler sees
    Tq < Tk and selects over the whole prefix. Returns (logits of the last position (B, V), cache).
    """
    from transformers import DynamicCache

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1 token (e.g. 4096), got {chunk_size}")
    cache = DynamicCache(config=model.config) if cache is None else cache
    logits = None
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids=input_ids[:, start:start + chunk_size], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return logits, cache


def config_from_options(options: dict) -> SparsePrefillConfig:
    """Build a config from CLI-style options (``compactlm.config.config_from_options`` types the strings).

    Asking for a ``threshold`` without a ``keep_ratio`` replaces the default keep ratio, since the two
    budgets are exclusive.
    """
    from ..config import config_from_options as typed_config

    options = dict(options)
    if options.get("threshold") not in (None, "none", "None") and "keep_ratio" not in options:
        options["keep_ratio"] = None
    return typed_config(SparsePrefillConfig, options, what="sparse-prefill")


def _register_method() -> None:
    from ..evaluation.methods import RuntimeMethod, register_method
    from .runtime import sparse_attention

    @register_method("attn:sparse-prefill")
    def build(model, options: dict) -> RuntimeMethod:
        cfg = config_from_options(options)

        def make_cache(model, prefill_cache):
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return RuntimeMethod("sparse-prefill", attach=lambda m: sparse_attention(m, cfg), make_cache=make_cache,
                             shares_prefill=False, description=f"block-sparse prefill {cfg.to_json()}")

    # ``attn:sparse-prefill-profiled`` (the profiler's dense layers + dense_tail 256) registers on import; the
    # method registry imports only this module for prefill.
    import importlib

    importlib.import_module(".prefill_profiled", __package__)


_register_method()
