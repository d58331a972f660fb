"""The one layer-wise calibration driver for every calibrated method (GPTQ, APTQ, Wanda, SparseGPT, Barber).

A plain loop over decoder layers, in the shape of the GPTQ/Wanda reference loops (``llama_sequential``):

1. capture the inputs of layer 0 for every calibration batch (and each layer's keyword arguments —
   rotary embeddings, masks — from one probe forward of a single sample);
2. for each layer, on the compute device, one layer at a time: optionally record the layer's
   reference outputs; for each ``true_sequential`` group of linears, hook them, forward the batches,
   and let the method ``solve`` each linear from its statistics; then give the method a chance to
   refine the whole layer (LLM-Barber's block-wise backward pass); finally re-forward so that the next
   layer sees the outputs of the already-compressed layers before it.

Activations stream: they stay on the CPU and move to the compute device one batch at a time.
A method plugs in only a collector and a solve (see :class:`CalibratedMethod`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .errors import CalibrationError, DataError
from .layer_checkpoint import LayerCheckpoint, scoped_checkpoint
from .models.adapter import Adapter, get_adapter
from .utils import progress


class _StopForward(Exception):
    pass


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Why: a calibration allocates and frees tens-of-MiB activations thousands of times, interleaved with
    the small tensors that stay (packed weights, Hessians, records). glibc serves these from its heap once
    its mmap threshold has adapted upwards, and the freed space between survivors is not returned to the
    OS, so the resident set creeps up layer after layer (measured on the default model, GPTQ W4 g64, 32 x 512
    calibration: peak RSS 1,789 MiB without it, 1,433 MiB with it). Called once per layer, it costs milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MADV_DONTNEED = 4  # Linux: drop this process's mapping of these pages; clean file pages re-fault from the file


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):  # no libc madvise (Windows): nothing to release
        return None


_MADVISE = _libc_madvise()


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings that are backed by a regular file (/proc/self/maps)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):  # a path: not [heap], [stack] or anonymous
                    lo, hi = parts[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:  # no procfs (macOS): nothing is known to be file-backed
        return []
    return spans


def _clean_file_page_runs(pagemap, lo: int, hi: int, page: int) -> list[tuple[int, int]]:
    """Runs of pages in [lo, hi) that are resident and still the file's own (not copied on write).

    /proc/self/pagemap holds one 64-bit entry per page: bit 63 = present, bit 61 = file page (a private
    mapping's page that was written to has become anonymous and clears it).
    """
    import numpy as np

    pagemap.seek(lo // page * 8)
    entries = np.frombuffer(pagemap.read((hi - lo) // page * 8), dtype="<u8")
    clean = ((entries >> np.uint64(63)) & np.uint64(1)).astype(bool) & \
        ((entries >> np.uint64(61)) & np.uint64(1)).astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], clean, [False])).astype(np.int8)))
    return [(lo + int(a) * page, lo + int(b) * page) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop this process's resident pages of CPU tensors read from a mapped file; returns the bytes advised.

    Why: transformers maps safetensors checkpoints into memory, so every weight a calibration reads stays
    resident (and counted in RSS) until the process ends: 500 MiB for the default model's fp32 weights,
    although the driver needs one layer at a time. Only pages that are still byte-for-byte the file's are
    released (``madvise(MADV_DONTNEED)``); a later read faults them in again from the file, so no value
    changes. Pages that were written to (a pruner zeroing weights in place; the kernel may copy a whole
    large folio on one write), anonymous memory (weights converted on load) and boundary pages shared with
    a neighbouring tensor are left alone. The count can be below the resident-set drop: releasing part of
    a large folio may unmap all of it. A no-op without Linux's procfs and madvise. Callers must not write
    these tensors concurrently.
    """
    if _MADVISE is None:
        return 0
    spans = _file_mappings()
    if not spans:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 (closed below)
    except OSError:
        return 0
    with pagemap:
        for t in tensors:
            if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
                continue
            start = t.data_ptr()  # the tensor's own bytes: its storage may be the whole checkpoint file
            lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
            if hi <= lo or not any(a <= lo and hi <= b for a, b in spans):
                continue
            for a, b in _clean_file_page_runs(pagemap, lo, hi, page):
                if _MADVISE(a, b - a, _MADV_DONTNEED) == 0:
                    advised += b - a
    return advised


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class AttentionMemo:
    """Reuses a layer's attention outputs across the calibration passes that cannot change them.

    Why: true-sequential calibration runs a layer once per group of linears and once more to produce the next
    layer's inputs. Once the attention's linears are solved, the passes for the MLP groups (gate/up, down) and the
    final pass recompute the same attention output for the same batch: three of the layer's attention forwards
    (of q/k/v/o and the scores, about 30 % of a Llama layer's work at 512 tokens) become one.

    The attention output of a batch is a function of the layer's input, the layer's parameters and buffers outside
    the MLP (norms, q/k/v/o) and the layer's fixed keyword arguments. A stored output is reused only for the same
    batch (the very input tensor, unmodified since) while every parameter and buffer outside the MLP equals its
    value when the output was stored (compared exactly), and only when no gradient is being taken, no hook sits on
    the attention or inside it (the hook would not fire) and the attention returned nothing but its output (no
    attention weights). In every other case the attention simply runs. Installed by :func:`run` for one layer.
    """

    def __init__(self, layer: nn.Module, attention: nn.Module, mlp: nn.Module):
        self.layer, self.attention = layer, attention
        self._mlp_ids = {id(t) for t in (*mlp.parameters(), *mlp.buffers())}
        self._snapshot: dict[str, torch.Tensor] | None = None  # the upstream tensors the stored outputs were made with
        # batch -> (its input, the input's version, the output, the output's versions, the output's device)
        self._outputs: dict[int, tuple[torch.Tensor, int, Any, list[int], torch.device]] = {}
        self.current: tuple[int, torch.Tensor] | None = None  # (batch index, that batch's input) during ctx.run
        self.hits = 0
        self._saved_forward: Any = None

    def __enter__(self) -> AttentionMemo:
        self._saved_forward = self.attention.__dict__.get("forward")  # an instance-level forward someone else set
        inner = self.attention.forward
        self.attention.forward = lambda *args, **kwargs: self._call(inner, args, kwargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved_forward is not None:
            self.attention.forward = self._saved_forward
        else:
            del self.attention.forward
        self._outputs.clear()
        self._snapshot = None

    def forget(self, batch: int) -> None:
        self._outputs.pop(batch, None)

    def _upstream(self) -> dict[str, torch.Tensor]:
        named = (*self.layer.named_parameters(), *self.layer.named_buffers())
        return {n: t for n, t in named if id(t) not in self._mlp_ids}

    def _unchanged(self) -> bool:
        if self._snapshot is None:
            return False
        now = self._upstream()
        return now.keys() == self._snapshot.keys() and all(
            now[n].shape == t.shape and now[n].dtype == t.dtype and torch.equal(now[n], t)
            for n, t in self._snapshot.items())

    def _hooked(self) -> bool:
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.attention.modules())

    def _call(self, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.current is None or torch.is_grad_enabled() or self._hooked():
            return inner(*args, **kwargs)
        batch, source = self.current
        entry = self._outputs.get(batch)
        if entry is not None and entry[0] is source and entry[1] == source._version and self._unchanged():
            stored, versions, device = entry[2:]
            if [t._version for t in _tensors(stored)] == versions:  # nobody modified the stored output in place
                self.hits += 1
                return _to(stored, device)
        out = inner(*args, **kwargs)
        tensors = _tensors(out)
        first = out[0] if type(out) in (tuple, list) and len(out) > 0 else out
        if isinstance(first, torch.Tensor) and len(tensors) == 1:  # the output alone: no attention weights, no cache
            if not self._unchanged():  # outputs stored with other weights can never match again
                self._outputs.clear()
                self._snapshot = {n: t.detach().clone() for n, t in self._upstream().items()}
            # Kept where the layer inputs are kept (the CPU): on a GPU the memo would otherwise hold a whole extra
            # set of activations in device memory.
            stored = _to(out, source.device)
            self._outputs[batch] = (source, source._version, stored, [t._version for t in _tensors(stored)],
                                    tensors[0].device)
        return out


_REUSE_ATTENTION: ContextVar[bool] = ContextVar("compactlm_reuse_attention", default=True)


@contextmanager
def attention_reuse(enabled: bool) -> Iterator[None]:
    """Turn the attention memo on or off for every :func:`run` call inside the block (default on).

    Off trades speed for memory: the memo holds one layer's attention outputs for all calibration batches (as
    much as the layer inputs the driver already holds), e.g. 151 MiB for 128 x 512 tokens at width 576 in fp32.
    """
    token = _REUSE_ATTENTION.set(bool(enabled))
    try:
        yield
    finally:
        _REUSE_ATTENTION.reset(token)


def _attention_memo(adapter: Adapter, i: int) -> AttentionMemo | None:
    """The memo for layer ``i``, or None for a layer without a separate attention and MLP module."""
    try:
        attention, mlp = adapter.attention(i), adapter.mlp(i)
    except AttributeError:  # e.g. a linear-attention or attention-free layer of a hybrid model
        return None
    if not isinstance(attention, nn.Module) or not isinstance(mlp, nn.Module):
        return None
    return AttentionMemo(adapter.layers[i], attention, mlp)


def _tensors(out: Any) -> list[torch.Tensor]:
    elements = out if isinstance(out, tuple | list) else (out,)
    if any(e is not None and not isinstance(e, torch.Tensor) for e in elements):
        return []  # something other than tensors (a cache object): not stored
    return [e for e in elements if e is not None]


@dataclass
class LayerContext:
    """One decoder layer during calibration: the module, its captured inputs and how to run it."""

    index: int
    layer: nn.Module
    prefix: str  # e.g. "model.layers.3"
    adapter: Adapter
    inputs: list[torch.Tensor]  # per batch (B, T, hidden), on CPU
    kwargs: dict[str, Any]  # the layer's keyword arguments, broadcastable over the batch, on the device
    device: torch.device
    memo: AttentionMemo | None = None  # set by :func:`run` while the layer is calibrated

    def run(self, hidden: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Forward one batch (already on the device) through the layer.

        ``batch`` is the batch's index in :attr:`inputs` when ``hidden`` is (a device copy of) that batch: it
        lets the attention memo reuse the attention output of an earlier pass over the same batch.
        """
        if self.memo is not None:
            self.memo.current = None if batch is None else (batch, self.inputs[batch])
        try:
            return _first_tensor(self.layer(hidden, **self.kwargs))
        finally:
            if self.memo is not None:
                self.memo.current = None

    @torch.no_grad()
    def forward_all(self) -> list[torch.Tensor]:
        """Forward every calibration batch; return the outputs on CPU."""
        return [self.run(x.to(self.device), batch=j).to("cpu") for j, x in enumerate(self.inputs)]

    @torch.no_grad()
    def forward_in_place(self) -> None:
        """Replace each calibration batch by its output, one batch at a time.

        Same values as :meth:`forward_all`, but the layer's inputs and outputs are never all held at once
        (each input is dropped as soon as its output exists): one full set of activations less at the peak.
        """
        for j, x in enumerate(self.inputs):
            self.inputs[j] = self.run(x.to(self.device), batch=j).to("cpu")
            if self.memo is not None:
                self.memo.forget(j)  # the batch's input is gone: its stored attention output can never match again


class CalibratedMethod(Protocol):
    """What a calibrated method plugs into :func:`run`."""

    true_sequential: bool  # solve linears group by group, re-collecting statistics after each group
    needs_reference_outputs: bool  # record the layer's outputs before any change (for ``refine_layer``)

    def new_stats(self, name: str, module: nn.Linear) -> Any: ...

    def add_batch(self, stats: Any, name: str, module: nn.Linear, inp: torch.Tensor,
                  out: torch.Tensor | None) -> None: ...  # out is None for a method with needs_linear_outputs = False

    def solve(self, name: str, module: nn.Linear, stats: Any, ctx: LayerContext) -> dict[str, Any]: ...

    def refine_layer(self, ctx: LayerContext, targets: dict[str, nn.Linear],
                     reference_outputs: list[torch.Tensor] | None) -> dict[str, Any] | None: ...

    # Optional: ``shares_input_stats = True`` when a linear's statistics depend on its input alone (GPTQ's
    # Hessian): linears fed the very same input tensor (q/k/v, gate/up) then share one accumulator, so it is
    # computed once instead of once per linear.
    # Optional: ``finish_layer(ctx)``, called once a layer is done (its outputs computed, the layer back on its
    # home device, its checkpoint saved): GPTQ packs the layer's linears there, so the codes of finished layers
    # are not all held until the end of the run.


@dataclass
class LayerwiseReport:
    """Per-linear records returned by each ``solve`` (plus layer-level records), in calibration order."""

    records: list[dict[str, Any]] = field(default_factory=list)
    layer_records: list[dict[str, Any]] = field(default_factory=list)


def default_device(model: nn.Module) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, calib: torch.Tensor, batch_size: int,
                   device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Layer-0 inputs of every batch (on CPU) and each layer's kwargs (from a one-sample probe, on ``device``)."""
    layers = adapter.layers
    captured: list[torch.Tensor] = []
    per_layer_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    skip = ("hidden_states", "past_key_values", "cache", "use_cache", "output_attentions")

    def stop_at_layer0(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().to("cpu"))
        raise _StopForward

    def probe(i):
        def hook(_module, args, kwargs):
            per_layer_kwargs[i] = {k: v for k, v in kwargs.items() if k not in skip}
        return hook

    def stop_before_head(_module, _args):
        raise _StopForward

    # One sample through the whole model, where it lives, records every layer's kwargs (they differ per layer
    # type, e.g. Gemma 3's local/global RoPE and sliding masks); batch-size-1 tensors broadcast over any batch.
    # It stops at the final norm: the (T, vocab) logits would be the largest tensor of the whole calibration.
    handles = [layer.register_forward_pre_hook(probe(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(adapter.final_norm.register_forward_pre_hook(stop_before_head))
    try:
        model(input_ids=calib[:1].to(adapter.embed_tokens.weight.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    # Then only the embeddings (and rotary tables) on the device to capture layer 0's inputs of every batch.
    outer = [adapter.embed_tokens, adapter.rotary_emb]
    homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in outer]
    handle = layers[0].register_forward_pre_hook(stop_at_layer0, with_kwargs=True)
    try:
        for m in outer:
            m.to(device)
        for batch in torch.split(calib, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, home in zip(outer, homes, strict=True):
            m.to(home)
    return captured, [_to(kw, device) for kw in per_layer_kwargs]


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise CalibrationError(f"{bad} non-finite values (NaN/inf) in {what}; check the calibration data and the "
                               "model's dtype (fp16 overflows are common: try --dtype fp32 or bf16)")


def run(
    model: nn.Module,
    calib: torch.Tensor,
    method: CalibratedMethod,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    desc: str = "calibrating",
    checkpoint: LayerCheckpoint | str | os.PathLike[str] | None = None,
    reuse_attention: bool | None = None,
) -> LayerwiseReport:
    """Calibrate ``model`` layer by layer with ``method`` on ``calib`` (N, T) token ids; modifies it in place.

    ``checkpoint`` (a folder or a :class:`~compactlm.layer_checkpoint.LayerCheckpoint`; by default the one
    of an enclosing :func:`compactlm.layer_checkpoint.checkpointing` block, else none) saves every finished
    layer, and a restarted call resumes after the last one saved with a bit-identical result.

    ``reuse_attention`` lets the passes over a layer reuse attention outputs that cannot have changed (see
    :class:`AttentionMemo`; default: on, or as set by an enclosing :func:`attention_reuse` block); the result is
    identical either way, ``False`` recomputes them and holds one set of activations less.
    """
    if calib is None:
        raise DataError("this method needs calibration data: pass calib=(N, T) token ids, e.g. "
                        "compactlm.data.calibration_set(tokenizer)")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise DataError(f"calib must be a non-empty (N, T) tensor of token ids, got {getattr(calib, 'shape', calib)}")
    adapter = get_adapter(model)
    reuse = _REUSE_ATTENTION.get() if reuse_attention is None else reuse_attention
    device = torch.device(device) if device is not None else default_device(model)
    was_training = model.training
    model.eval()
    inputs, layer_kwargs = capture_inputs(model, adapter, calib, batch_size, device)
    # The probe read every layer's weights; page the mapped ones out until their layer's turn.
    release_file_pages([p for layer in adapter.layers for p in layer.parameters()])
    report = LayerwiseReport()
    ckpt = scoped_checkpoint(desc) if checkpoint is None else (
        checkpoint if isinstance(checkpoint, LayerCheckpoint) else LayerCheckpoint(checkpoint))
    start = 0
    if ckpt is not None:
        ckpt.begin(calib, method, adapter.num_layers, desc)
        prefixes = [adapter.layer_prefix(i) for i in range(adapter.num_layers)]
        start, saved_inputs = ckpt.resume(adapter.layers, prefixes, method, report)
        inputs = saved_inputs if saved_inputs is not None else inputs
    try:
        for i in progress(range(start, adapter.num_layers), desc=desc, total=adapter.num_layers - start, leave=False):
            n_records, n_layer_records = len(report.records), len(report.layer_records)
            layer = adapter.layers[i]
            home = next(layer.parameters()).device
            # Views of the weights as loaded: a method may swap a parameter's storage (GPTQ writes fresh tensors
            # rather than into the checkpoint's mmap), and these keep the mapped originals for the release below.
            mapped = [p.detach() for p in layer.parameters()]
            layer.to(device)
            ctx = LayerContext(i, layer, adapter.layer_prefix(i), adapter, inputs, layer_kwargs[i], device)
            for j, x in enumerate(inputs):
                _check_finite(x, f"the calibration activations entering layer {i} ({ctx.prefix}), batch {j}")
            targets = {n: m for n, m in adapter.linears(i).items()
                       if filter_fn is None or filter_fn(f"{ctx.prefix}.{n}", m)}
            memo = _attention_memo(adapter, i) if reuse else None
            with memo if memo is not None else nullcontext():
                ctx.memo = memo
                reference = ctx.forward_all() if method.needs_reference_outputs else None
                groups = adapter.sequential_groups(i) if method.true_sequential else [list(adapter.linears(i))]
                for group in groups:
                    names = [n for n in group if n in targets]
                    if names:
                        _solve_group(ctx, method, {n: targets[n] for n in names}, report)
                extra = method.refine_layer(ctx, targets, reference)
                if extra:
                    report.layer_records.append({"layer": i, **extra})
                ctx.forward_in_place()  # ctx.inputs is `inputs`: it now holds the next layer's inputs
                ctx.memo = None
            layer.to(home)
            if ckpt is not None:
                ckpt.save(i, layer, ctx.prefix, method, report.records[n_records:],
                          report.layer_records[n_layer_records:], inputs, last=i == adapter.num_layers - 1)
            finish = getattr(method, "finish_layer", None)
            if finish is not None:
                finish(ctx)
            del ctx, reference
            release_free_memory()
            release_file_pages(mapped)  # this layer's checkpoint pages: re-read only if someone uses them again
            del mapped
    finally:
        model.train(was_training)
    return report


def run_batches(ctx: LayerContext, handles: list, stop: type[BaseException],
                before_batch: Callable[[], None] | None = None) -> None:
    """Run ``ctx``'s layer on every calibration batch with the hooks ``handles`` registered, then remove them.

    A hook raises ``stop`` to end a batch's forward once it has what it needs (the rest of the layer is
    wasted work); ``before_batch`` resets per-batch state.
    """
    try:
        for j, x in enumerate(ctx.inputs):
            if before_batch is not None:
                before_batch()
            try:
                ctx.run(x.to(ctx.device), batch=j)
            except stop:
                pass
    finally:
        for h in handles:
            h.remove()


class _GroupDone(Exception):
    """Raised by a forward hook to end a layer's forward once a calibration group has its inputs."""


@torch.no_grad()
def _solve_group(ctx: LayerContext, method: CalibratedMethod, modules: dict[str, nn.Linear],
                 report: LayerwiseReport) -> None:
    stats = {n: method.new_stats(n, m) for n, m in modules.items()}
    # Once every linear of the group has seen a batch, the rest of the layer's forward is wasted work
    # (true-sequential calibration runs the layer once per group): stop it there, unless the method
    # gathers statistics later in the forward (APTQ's attention-aware q/k/v statistics).
    stop_early = not getattr(method, "needs_full_layer_forward", False)
    # A method that reads only the linears' inputs (``needs_linear_outputs = False``: GPTQ) collects them in a
    # pre-hook, so the forward stops *before* the group's last linear runs: that matmul (v, o, up or down
    # projection, a fifth of a true-sequential layer's forward work) and its output are never computed.
    before = stop_early and not getattr(method, "needs_linear_outputs", True)
    pending: set[str] = set()
    # Shared statistics: linears that receive the identical input tensor (same storage, shape and strides) in
    # the first batch share the first one's accumulator; every later batch must show the same sharing. The
    # batch's inputs are held until the batch ends so that their memory cannot be reused by another tensor
    # of the same layout (which would then look like a shared input).
    share = getattr(method, "shares_input_stats", False)
    owner: dict[str, str] = {}
    batch_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}
    batches_seen = 0

    def input_key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def collect(name, module, inp, out):
        inp = inp.detach()
        if share:
            key = input_key(inp)
            first = batch_inputs.get(key)
            if batches_seen == 1 and first is not None:
                owner[name] = first[0]
            if name in owner:
                if first is None or first[0] != owner[name]:
                    raise RuntimeError(f"{ctx.prefix}.{name} shared its input with {owner[name]} in the first "
                                       "calibration batch but not in a later one")
            else:
                batch_inputs.setdefault(key, (name, inp))
                method.add_batch(stats[name], name, module, inp, None if out is None else out.detach())
                if before and batches_seen > 1:
                    # From the second batch on, the sharers' input is known to be this one: the forward may stop
                    # here instead of running the matmuls up to the last sharer (q and k; gate).
                    pending.difference_update(n for n, src in owner.items() if src == name)
        else:
            method.add_batch(stats[name], name, module, inp, None if out is None else out.detach())
        pending.discard(name)
        if stop_early and not pending:
            raise _GroupDone

    def next_batch() -> None:
        nonlocal batches_seen
        pending.update(modules)
        batch_inputs.clear()
        batches_seen += 1

    def collector(name: str):
        if before:
            return lambda module, args: collect(name, module, args[0], None)
        return lambda module, args, output: collect(name, module, args[0], output)

    handles = [m.register_forward_pre_hook(collector(n)) if before else m.register_forward_hook(collector(n))
               for n, m in modules.items()]
    run_batches(ctx, handles, _GroupDone, before_batch=next_batch)
    batch_inputs.clear()
    for name, src in owner.items():
        stats[name] = stats[src]
    for name, module in modules.items():
        record = method.solve(name, module, stats[name], ctx)
        _check_finite(module.weight, f"the weight of {ctx.prefix}.{name} after solving")
        report.records.append({"name": f"{ctx.prefix}.{name}", **(record or {})})
        stats[name] = None  # free Hessians as we go
