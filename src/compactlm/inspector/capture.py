"""Capture every operator's output in a reference and a candidate model on the same inputs, batch by batch.

Operators are found through the architecture adapter and named by their module path in the reference
(``model.layers.3.self_attn.q_proj``), so any candidate with the same module tree works: a deep copy with
changed weights, or one whose linears were replaced by packed quantized modules with the same forward
contract. Kinds: ``embedding``, ``linear``, ``router``, ``norm``, ``attention`` (the attention block's
output), ``attention_probs`` (the softmax probabilities, a pseudo-operator ``<attention>.probs``),
``mlp``, ``experts``, ``layer`` (the decoder layer's residual-stream output), ``logits``.

Two modes per operator, both from one reference pass and one candidate pass per batch:

- **accumulated**: the candidate runs as is, so its operator sees the candidate's own (already perturbed)
  input; the error is everything upstream plus the operator itself;
- **isolated**: the candidate's operator is re-run on the *reference* operator's captured input, so the
  error is the operator's own. When the candidate's input already equals the reference's bit for bit
  (every operator upstream of the first difference) the accumulated result is the isolated one and
  nothing is re-run.

Attention probabilities exist only on the eager path, so both passes run with ``eager`` attention while
capturing (restored afterwards); a candidate whose own runtime attention is active (``compactlm``
handlers, e.g. sparse attention or the KV-store simulation of :mod:`.runtime`) keeps it, and its
probabilities are compared where its handlers return them (``probs_available["candidate"]``).
Memory: one batch's reference outputs (and inputs for the isolated mode) are held at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import get_adapter
from .metrics import ErrorStats, kl_from_logits, kl_from_probs

DISTRIBUTION_KINDS = ("logits", "attention_probs", "router")


@dataclass(frozen=True)
class Operator:
    name: str  # report name: the module path, or "<attention path>.probs"
    kind: str
    layer: int | None  # decoder layer index; None for embedding / final norm / logits
    module: str  # module path in both models (the attention module for a probs pseudo-operator)


def _classify(rel: str, mod: nn.Module, adapter, i: int, linear_ids: set[int]) -> str | None:
    if mod is adapter.attention(i):
        return "attention"
    if mod is adapter.mlp(i):
        return "mlp"
    if id(mod) in linear_ids:
        return "linear"
    cls = type(mod).__name__
    if "Router" in cls:
        return "router"
    if rel.endswith("experts") and (hasattr(mod, "gate_up_proj") or hasattr(mod, "num_experts")):
        return "experts"
    if isinstance(mod, nn.Linear):
        return "linear"  # e.g. Qwen2-MoE's shared_expert_gate, routers stored as Linear
    if "Norm" in cls:
        return "norm"
    return None


def discover_operators(model: nn.Module) -> list[Operator]:
    """Every inspectable operator of ``model`` in forward order (MoE experts are unfused first)."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    ops = [Operator(names[id(adapter.embed_tokens)], "embedding", None, names[id(adapter.embed_tokens)])]
    for i in range(adapter.num_layers):
        layer = adapter.layers[i]
        prefix = names[id(layer)]
        linear_ids = {id(m) for m in adapter.linears(i).values()}
        for rel, mod in layer.named_modules():
            kind = "layer" if rel == "" else _classify(rel, mod, adapter, i, linear_ids)
            if kind is None:
                continue
            full = f"{prefix}.{rel}" if rel else prefix
            if kind != "layer":
                ops.append(Operator(full, kind, i, full))
            if kind == "attention":
                ops.append(Operator(f"{full}.probs", "attention_probs", i, full))
        ops.append(Operator(prefix, "layer", i, prefix))
    final = names[id(adapter.final_norm)]
    head = names[id(adapter.lm_head)]
    ops += [Operator(final, "norm", None, final), Operator(head, "logits", None, head)]
    return ops


def check_compatible(ref: nn.Module, cand: nn.Module, ops: list[Operator]) -> None:
    """Raise :class:`ConfigError` unless ``cand`` has the reference's architecture and every operator module."""
    a, b = get_adapter(ref), get_adapter(cand)
    fields = ("family", "layers", "hidden_size", "heads", "kv_heads", "head_dim", "vocab_size")
    ia, ib = a.info(), b.info()
    diff = [f"{f}: {ia[f]} vs {ib[f]}" for f in fields if ia[f] != ib[f]]
    if diff:
        raise ConfigError("reference and candidate have different architectures (" + "; ".join(diff) + "); the "
                          "inspector compares two models of one architecture, e.g. a model and its compressed copy")
    for i in range(b.num_layers):
        b.linears(i)  # unfuse MoE experts in the candidate too, so module paths match
    missing = sorted({op.module for op in ops} - {n for n, _ in cand.named_modules()})
    if missing:
        raise ConfigError(f"the candidate has no module(s) {missing[:5]}{' …' if len(missing) > 5 else ''}: its "
                          "module tree differs from the reference's; compare models of one architecture")


def primary(output: Any) -> torch.Tensor | None:
    """The tensor an operator produces (first tensor of a tuple output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


@contextlib.contextmanager
def eager_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Switch ``model`` to eager attention (which returns probabilities) for the scope; yields whether it did."""
    config = model.config
    previous = config._attn_implementation
    switch = enabled and previous != "compactlm"  # keep a candidate's own runtime attention
    try:
        if switch:
            config._attn_implementation = "eager"
        yield switch
    finally:
        config._attn_implementation = previous


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = [a for a in args if isinstance(a, torch.Tensor)]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        out.append(hs)
    return out


def _same_inputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Capture:
    """Per-operator accumulated and isolated :class:`ErrorStats`, fed one batch at a time by :meth:`run_batch`."""

    def __init__(self, ref: nn.Module, cand: nn.Module, ops: list[Operator], *, isolated: bool = True,
                 attention_probs: bool = True,
                 candidate_context: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
                 runtime_modules: set[str] | None = None):
        self.ref, self.cand, self.ops = ref, cand, ops
        self.isolated, self.attention_probs = isolated, attention_probs
        self.candidate_context = candidate_context
        self.accumulated = {op.name: ErrorStats() for op in ops}
        self.isolated_stats = {op.name: ErrorStats() for op in ops}
        self.skipped = {op.name: 0 for op in ops}  # batches an operator could not be compared (MoE routing)
        self.probs_available = {"reference": None, "candidate": None}
        self.by_module: dict[str, list[Operator]] = {}
        for op in ops:
            self.by_module.setdefault(op.module, []).append(op)
        # A module with the reference's type and bit-identical parameters and buffers computes exactly the
        # reference's output on the reference's input, so its isolated error is zero without a re-run. Not
        # assumed under an opaque runtime context, which may change how any module computes; under a resolved
        # runtime (``runtime_modules``: the attention modules it handles) it is assumed everywhere else, since
        # the other layers then run exactly the reference's attention function.
        cache: dict[str, bool] = {}  # one comparison per tensor, shared by an operator and its ancestors
        changed = runtime_modules or set()
        self.exact = {} if candidate_context and runtime_modules is None else {
            p: not any(m == p or m.startswith(p + ".") or not p for m in changed)
            and _same_state(p, ref.get_submodule(p), cand.get_submodule(p), cache) for p in self.by_module}
        self.candidate_probs_seen = False

    # --- hooks -----------------------------------------------------------------------------------------
    def _ref_hooks(self, outs: dict, ins: dict) -> list:
        handles = []
        for path, ops in self.by_module.items():
            mod = self.ref.get_submodule(path)
            if self.isolated:
                def pre(m, args, kwargs, path=path):
                    ins[path] = (args, kwargs)
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))

            def post(m, args, output, ops=ops):
                for op in ops:
                    t = output[1] if op.kind == "attention_probs" and isinstance(output, tuple) else primary(output)
                    if t is not None:
                        outs[op.name] = t.detach()
            handles.append(mod.register_forward_hook(post))
        return handles

    def _cand_hooks(self, outs: dict, ins: dict) -> list:
        handles, busy, same, masks = [], [False], {}, {}
        for path, ops in self.by_module.items():
            mod = self.cand.get_submodule(path)

            def pre(m, args, kwargs, path=path):
                if not busy[0] and path in ins:
                    same[path] = _same_inputs(_tensors(args, kwargs), _tensors(*ins[path]))
                    if "attention_mask" in kwargs:
                        masks[path] = kwargs["attention_mask"]

            def post(m, args, output, path=path, ops=ops):
                if busy[0] or path not in ins and self.isolated:
                    return
                iso_output = output
                exact = self.exact.get(path, False)
                if self.isolated and not same.get(path, False) and not exact:
                    busy[0] = True  # the re-run must not re-enter these hooks (its children are hooked too)
                    try:
                        ref_args, ref_kwargs = ins[path]
                        if path in masks and "attention_mask" in ref_kwargs:
                            # Same content (it follows from the token ids), in the format the candidate's own
                            # attention function expects (a runtime handler takes SDPA's bool/None mask, the
                            # eager reference built an additive one).
                            ref_kwargs = {**ref_kwargs, "attention_mask": masks[path]}
                        iso_output = m(*ref_args, **ref_kwargs)
                    finally:
                        busy[0] = False
                for op in ops:
                    self._compare(op, outs.get(op.name), output, iso_output, same.get(path, False), exact)
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post))
        return handles

    def _compare(self, op: Operator, ref: torch.Tensor | None, output: Any, iso_output: Any, same: bool,
                 exact: bool) -> None:
        if ref is None:
            return  # not run in the reference for this batch (an MoE expert that got no tokens)
        if self.isolated and exact and not same:
            rows = ref.numel() // ref.shape[-1] if op.kind in DISTRIBUTION_KINDS else 0
            self.isolated_stats[op.name].add_exact(ref, rows)
        if op.kind == "attention_probs":
            pick = (lambda o: o[1] if isinstance(o, tuple) else None)  # noqa: E731
        else:
            pick = primary
        modes = [(self.accumulated[op.name], pick(output))]
        if self.isolated and not same and not exact:
            modes.append((self.isolated_stats[op.name], pick(iso_output)))
        if op.kind == "attention_probs" and modes[0][1] is not None:
            self.candidate_probs_seen = True
        for stats, cand in modes:
            if cand is None or cand.shape != ref.shape:
                self.skipped[op.name] += 1
                continue
            batch = ErrorStats()
            batch.update(ref, cand)
            if op.kind == "logits" or op.kind == "router":
                batch.update_kl(kl_from_logits(ref, cand))
            elif op.kind == "attention_probs":
                batch.update_kl(kl_from_probs(ref, cand))
            stats.merge(batch)
            if self.isolated and same and stats is self.accumulated[op.name]:
                self.isolated_stats[op.name].merge(batch)  # same input: the isolated error is this one

    # --- one batch ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor) -> None:
        outs: dict[str, torch.Tensor] = {}
        ins: dict[str, tuple] = {}
        handles = self._ref_hooks(outs, ins)
        try:
            with eager_attention(self.ref, self.attention_probs) as eager:
                self.probs_available["reference"] = eager
                self.ref(input_ids=input_ids.to(_device(self.ref)), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        ctx = self.candidate_context(self.cand) if self.candidate_context else contextlib.nullcontext()
        handles = []
        try:
            with ctx, eager_attention(self.cand, self.attention_probs) as eager:
                handles = self._cand_hooks(outs, ins)
                self.cand(input_ids=input_ids.to(_device(self.cand)), use_cache=False)
            # Eager, or a runtime whose handlers return probabilities (the KV-store simulation, eager fall-backs).
            self.probs_available["candidate"] = eager or self.candidate_probs_seen
        finally:
            for h in handles:
                h.remove()


def _same_state(path: str, a: nn.Module, b: nn.Module, cache: dict[str, bool]) -> bool:
    if a is b:
        return True
    if [type(m) for m in a.modules()] != [type(m) for m in b.modules()]:
        return False
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        key = f"{path}.{k}"
        if key not in cache:
            cache[key] = sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k])
        if not cache[key]:
            return False
    return True


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
