"""Runtime methods as the long-context runners see them (RULER-syn, PPL-decode, ``generate``).

A :class:`RuntimeMethod` bundles what a KV-cache or attention method changes at inference time:

- ``attach(model)``: a context manager that installs the method (attention handlers, hooks) and
  removes it on exit;
- ``make_cache(model, prefill_cache)``: the cache to decode with. Decode-only methods
  (``shares_prefill=True``) get a copy of the shared full-precision prefill cache and convert it
  (e.g. quantize it), so a benchmark pays one prefill per prompt (PROTOCOL RULER-syn). Methods that
  change prefill (``shares_prefill=False``) get ``None`` and run their own prefill inside ``attach``.

CLI flags map to methods through :data:`METHOD_BUILDERS`: ``--kv int4`` looks up ``"kv:int4"`` and
``--attn sals`` looks up ``"attn:sals"``; each builder takes the model and a dict of options and
returns a RuntimeMethod. Feature modules register their own names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError


@dataclass
class RuntimeMethod:
    name: str
    attach: Callable[[nn.Module], contextlib.AbstractContextManager[Any]]
    make_cache: Callable[[nn.Module, Any], Any]
    shares_prefill: bool = True
    description: str = ""


MethodBuilder = Callable[[nn.Module, dict[str, Any]], RuntimeMethod]
METHOD_BUILDERS: dict[str, MethodBuilder] = {}


def register_method(key: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register a builder under ``"kv:<name>"`` or ``"attn:<name>"``."""
    if not key.startswith(("kv:", "attn:")):
        raise ValueError(f"method keys start with 'kv:' or 'attn:', got {key!r}")

    def decorator(fn: MethodBuilder) -> MethodBuilder:
        METHOD_BUILDERS[key] = fn
        return fn

    return decorator


@contextlib.contextmanager
def _nothing(model: nn.Module) -> Iterator[nn.Module]:
    yield model


def _copy_cache(model: nn.Module, prefill_cache: Any) -> Any:
    import copy

    from transformers import DynamicCache

    return DynamicCache(config=model.config) if prefill_cache is None else copy.deepcopy(prefill_cache)


FULL = RuntimeMethod("full", attach=_nothing, make_cache=_copy_cache,
                     description="full attention, full-precision cache")


def build_method(model: nn.Module, kind: str, name: str | None, options: dict[str, Any] | None = None) -> RuntimeMethod:
    """Resolve ``--kv NAME`` (kind ``kv``) or ``--attn NAME`` (kind ``attn``) to a RuntimeMethod."""
    if name in (None, "full", "none"):
        return FULL
    key = f"{kind}:{name}"
    builder = METHOD_BUILDERS.get(key)
    if builder is None:
        _import_feature_modules()
        builder = METHOD_BUILDERS.get(key)
    if builder is None:
        known = sorted(k.split(":", 1)[1] for k in METHOD_BUILDERS if k.startswith(kind + ":"))
        raise ConfigError(f"unknown --{kind} method {name!r}; choose one of: full, {', '.join(known)}")
    return builder(model, dict(options or {}))


FEATURE_MODULES: list[str] = []  # modules whose import registers methods (appended by each feature)
FEATURE_MODULES.append("compactlm.kv.runtime")
FEATURE_MODULES.extend(["compactlm.attention.sals", "compactlm.attention.decode_baselines"])
FEATURE_MODULES.append("compactlm.attention.prefill_sparse")


def _import_feature_modules() -> None:
    import importlib

    for mod in FEATURE_MODULES:
        importlib.import_module(mod)
