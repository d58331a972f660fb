"""Reusable APTQ sensitivities: compute ``{linear: {bits: cost}}`` once, then allocate any budget from the file.

APTQ (Guan et al., arXiv 2402.14866, §3.3) first ranks every linear by a sensitivity at each width of the
menu, and only then allocates widths for the target average. The ranking is the expensive part (the
loss-gradient pass and the sensitivity pass: about a third of an APTQ run), and it does not depend on the
target: ``avg_bits``, ``pin`` and ``share_fused`` are read by the allocation alone. So one file serves every
budget, and a run stopped after the sensitivity pass restarts from it.

A cache is only reused for exactly what it was made for. Its fingerprint holds everything the sensitivities
depend on, and each part is compared on load; a difference raises an error naming the part (never a silent
recompute, never a silent reuse):

- the config fields that change the sensitivities (:func:`sensitivity_fields`; which ones depends on the
  ``sensitivity`` mode, see the field lists below);
- the target linears (names and weight shapes), which ``ignore`` and ``filter_fn`` decide;
- a SHA-256 of every parameter and buffer of the model, not only of the targets: the loss gradient and each
  target's inputs go through the embeddings, norms, head and the layers left dense;
- the model's architecture config (head counts, norm epsilon, RoPE settings: they change the result without
  changing any tensor), without the keys that only name or steer a run;
- a SHA-256 of the calibration token ids and their shape.

The device the sensitivities were computed on is recorded, not compared (a GPU run differs from a CPU run only
by float rounding, as any two runs with another summation order do).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..layerwise import release_file_pages
from ..utils import write_json_atomic

if TYPE_CHECKING:
    from .aptq import APTQ

FORMAT = "compactlm.aptq-sensitivity"
VERSION = 1

# Every APTQ field, by what it changes (a test checks that these lists cover every field, so a new field has to
# be placed here before it can be cached wrongly).
NOT_SENSITIVITY = ("avg_bits", "pin", "share_fused",  # the allocation only: what one cache serves many of
                   "bits",  # GPTQ's uniform width: APTQ never reads it
                   "true_sequential",  # the GPTQ pass only (the sensitivity pass never re-collects inputs)
                   "ignore")  # decides the targets, whose names are compared themselves
SENSITIVITY_ALWAYS = ("sensitivity", "bits_menu", "group_size", "symmetric", "clip_search",
                      "batch_size")  # batch size changes the float summation order of the input moments
SENSITIVITY_LOSS = ("sensitivity_quantizer", "gradient_dtype")
SENSITIVITY_LOSS_GPTQ = ("damp", "block_size", "act_order", "respect_sparsity")  # GPTQ's error at each width
SENSITIVITY_LAYER = ("attention_aware", "probes")  # the local estimate uses the attention-aware q/k/v Hessians

# Model-config keys that name or steer a run without changing what the model computes; dtypes are compared
# through the tensors.
_VOLATILE_MODEL_KEYS = {"transformers_version", "name_or_path", "dtype", "torch_dtype", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict"}


def sensitivity_fields(cfg: APTQ) -> dict[str, Any]:
    """The fields of ``cfg`` that change the sensitivities under its ``sensitivity`` mode, JSON-ready."""
    names = list(SENSITIVITY_ALWAYS)
    if cfg.sensitivity == "loss":
        names += SENSITIVITY_LOSS
        if cfg.sensitivity_quantizer == "gptq":
            names += SENSITIVITY_LOSS_GPTQ
    else:
        names += SENSITIVITY_LAYER
    return {n: list(v) if isinstance(v := getattr(cfg, n), tuple) else v for n in names}


def tensor_digest(t: torch.Tensor) -> str:
    """``"dtype shape sha256"`` of a tensor's bytes (no copy for a contiguous CPU tensor).

    Reading a weight mapped from a safetensors file makes its pages resident; they are released again at once
    (:func:`~compactlm.layerwise.release_file_pages`), so hashing the whole model does not raise the peak RSS
    by the model's size (the calibration passes read one layer at a time).
    """
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(raw).hexdigest()
    release_file_pages([data])
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} {digest}"


def model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    d = json.loads(json.dumps(cfg.to_dict(), default=str, sort_keys=True))
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_MODEL_KEYS}


def fingerprint(model: nn.Module, calib: Any, targets: dict[str, nn.Linear], cfg: APTQ) -> dict[str, Any]:
    """What the sensitivities depend on (see the module docstring), as a JSON-ready dict."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise DataError("APTQ needs calibration data: pass calib=(N, T) token ids, got "
                        f"{getattr(calib, 'shape', calib)}")
    ids = calib.detach().cpu().contiguous()
    tensors = {n: tensor_digest(p) for n, p in model.named_parameters()}
    tensors.update({n: tensor_digest(b) for n, b in model.named_buffers()})
    return {"config": sensitivity_fields(cfg),
            "targets": {n: list(m.weight.shape) for n, m in targets.items()},
            "tensors": tensors,
            "model_config": model_config(model),
            "calibration": {"shape": list(ids.shape), "dtype": str(ids.dtype).replace("torch.", ""),
                            "sha256": hashlib.sha256(ids.reshape(-1).view(torch.uint8).numpy()).hexdigest()}}


def _differences(made: dict, now: dict) -> list[str]:
    return sorted(k for k in set(made) | set(now) if made.get(k, "<absent>") != now.get(k, "<absent>"))


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_fingerprint(made: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Raise, naming the first part that differs, unless ``made`` (from the file) equals ``now``."""
    fix = (f"use another sensitivity cache path (or delete {path}) to compute the sensitivities for this run, or "
           "run with the settings the cache was made for")

    def show(v: Any) -> str:
        return "(absent)" if v == "<absent>" else repr(tuple(v) if isinstance(v, list) else v)

    # The mode first: under another mode other fields are compared, and "absent" would say less than the mode.
    for key in sorted(_differences(made["config"], now["config"]), key=lambda k: k != "sensitivity"):
        was, asks = made["config"].get(key, "<absent>"), now["config"].get(key, "<absent>")
        raise ConfigError(f"sensitivity cache {path} was made with {key} {show(was)}, this run asks for "
                          f"{show(asks)}; {fix}")
    m_t, n_t = made["targets"], now["targets"]
    if m_t != n_t:
        gone, new = sorted(set(m_t) - set(n_t)), sorted(set(n_t) - set(m_t))
        shapes = [n for n in m_t if n in n_t and m_t[n] != n_t[n]]
        what = "; ".join(s for s in (gone and f"made for linears this run does not quantize: {_few(gone)}",
                                     new and f"lacks linears this run quantizes: {_few(new)}",
                                     shapes and f"other weight shapes for {_few(shapes)}") if s)
        raise DataError(f"sensitivity cache {path} was made for other target linears ({what}): another model, or "
                        f"other ignore/filter_fn settings; {fix}")
    keys = _differences(made["model_config"], now["model_config"])
    if keys:
        raise DataError(f"sensitivity cache {path} was made for a model with another architecture config (keys "
                        f"{_few(keys)} differ); {fix}")
    changed = _differences(made["tensors"], now["tensors"])
    if changed:
        first = sorted(changed, key=lambda n: n.rpartition(".")[0] not in n_t)  # the targets' weights first
        raise DataError(f"sensitivity cache {path} was made for other weights: {len(changed)} tensor(s) differ "
                        f"({_few(first)}); {fix}")
    if made["calibration"] != now["calibration"]:
        m_c, n_c = made["calibration"], now["calibration"]
        detail = (f"shape {m_c.get('shape')} vs {n_c['shape']}" if m_c.get("shape") != n_c["shape"]
                  else "same shape, other token ids")
        raise DataError(f"sensitivity cache {path} was made with other calibration data ({detail}); {fix}")


def _parse(data: Any, path: Path) -> tuple[dict[str, Any], dict[str, dict[int, float]]]:
    """The fingerprint and the sensitivities of a loaded file; a clear error if its structure is wrong."""
    bad = f"delete {path} (the sensitivities are then computed and written again)"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path} is not an APTQ sensitivity cache (no 'format': {FORMAT!r}); {bad} or pass another "
                        "path")
    if data.get("version") != VERSION:
        raise DataError(f"sensitivity cache {path} has format version {data.get('version')!r}; this compactlm reads "
                        f"version {VERSION}; {bad}")
    fp, sens = data.get("fingerprint"), data.get("sensitivity")
    parts = ("config", "targets", "tensors", "model_config", "calibration")
    if not isinstance(fp, dict) or not all(isinstance(fp.get(p), dict) for p in parts) or not isinstance(sens, dict):
        raise DataError(f"sensitivity cache {path} is incomplete (its fingerprint or sensitivities are missing); {bad}")
    out: dict[str, dict[int, float]] = {}
    for name, per_bits in sens.items():
        if not isinstance(per_bits, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in per_bits.values()):
            raise DataError(f"sensitivity cache {path} holds a malformed entry for {name}; {bad}")
        try:
            out[name] = {int(b): float(v) for b, v in per_bits.items()}
        except ValueError:
            raise DataError(f"sensitivity cache {path} holds a malformed width for {name}; {bad}") from None
    return fp, out


def load(path: Path, now: dict[str, Any], menu: tuple[int, ...]) -> tuple[dict[str, dict[int, float]], dict]:
    """The sensitivities in ``path`` after checking its fingerprint against ``now``; and its ``made`` record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"sensitivity cache {path} cannot be read ({type(exc).__name__}: {exc}): it is corrupt or "
                        f"truncated; delete it (the sensitivities are then computed and written again)") from None
    made, sens = _parse(data, path)
    check_fingerprint(made, now, path)
    missing = [n for n in now["targets"] if set(sens.get(n, {})) != set(menu)]
    if missing:
        raise DataError(f"sensitivity cache {path} lacks the sensitivities of {_few(missing)} at widths {menu}: it "
                        "is corrupt; delete it (the sensitivities are then computed and written again)")
    return sens, data.get("made", {})


def _check_writable(path: Path) -> None:
    """Fail before the expensive passes, not after them, where the file could not be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"sensitivity cache {path}: its folder cannot be created ({exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"sensitivity cache {path}: the folder {path.parent} is not writable; choose another path")


def cached_sensitivity(model: nn.Module, cfg: APTQ, calib: Any, targets: dict[str, nn.Linear],
                       cache: str | os.PathLike[str] | None,
                       compute: Callable[[], dict[str, dict[int, float]]],
                       device: Any = None) -> tuple[dict[str, dict[int, float]], dict]:
    """``compute()``'s sensitivities, or those saved in ``cache`` for exactly this model, data and config.

    Returns the sensitivities and a record for the run report: ``source`` (``"computed"`` or ``"loaded"``),
    ``cache`` (the path or None) and the CPU seconds spent (fingerprint, and the passes when computed).
    """
    if cache is None:
        start = time.process_time()
        return compute(), {"source": "computed", "cache": None, "sensitivity_cpu_seconds": time.process_time() - start}
    path = Path(cache)
    if path.is_dir():
        raise ConfigError(f"sensitivity cache {path} is a folder; give a file path, e.g. {path / 'aptq-sens.json'}")
    start = time.process_time()
    now = fingerprint(model, calib, targets, cfg)
    record: dict[str, Any] = {"cache": str(path), "fingerprint_cpu_seconds": time.process_time() - start}
    if path.exists():
        sens, made = load(path, now, cfg.bits_menu)
        record.update(source="loaded", made=made)
        return sens, record
    _check_writable(path)
    start = time.process_time()
    sens = compute()
    seconds = time.process_time() - start
    where = str(device) if device is not None else next((str(m.weight.device) for m in targets.values()), "cpu")
    made = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
            "device": where, "sensitivity_cpu_seconds": seconds}
    write_json_atomic(path, {"format": FORMAT, "version": VERSION, "made": made, "fingerprint": now,
                             "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()}})
    record.update(source="computed", sensitivity_cpu_seconds=seconds)
    return sens, record
