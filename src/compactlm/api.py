"""The one entry point: ``compress(model, config, calib=None, filter_fn=None)``.

``config`` is any registered method config, a :class:`~compactlm.config.PerLayer`, or a list of them
applied in order (e.g. prune, then quantize). Runtime features (KV cache, sparse attention) are not
applied here: they attach around ``generate`` through scoped context managers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .config import BaseConfig
from .registry import handler_for


def compress(
    model: nn.Module,
    config: BaseConfig | Sequence[BaseConfig],
    calib: Any = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    **options: Any,
) -> nn.Module:
    """Apply ``config`` (or each of a list of configs, in order) to ``model`` in place and return it.

    ``calib`` is a (N, T) tensor of calibration token ids for calibrated methods; ``filter_fn(name,
    module)`` limits which linear layers are touched. Extra ``options`` (``progress``, ``device``) go to
    the handler.
    """
    configs = list(config) if isinstance(config, list | tuple) else [config]
    for cfg in configs:
        if not isinstance(cfg, BaseConfig):
            raise TypeError(f"compress() takes method configs, got {type(cfg).__name__}")
        model = handler_for(cfg)(model, cfg, calib=calib, filter_fn=filter_fn, **options)
    return model
