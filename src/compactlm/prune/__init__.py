"""Pruning: magnitude, Wanda, SparseGPT and LLM-Barber; unstructured (per row or per matrix) and N:M.

    import compactlm
    from compactlm.prune import Wanda, Barber
    calib = compactlm.data.calibration_set(tok, nsamples=32)
    report = compactlm.prune(model, Barber(init=Wanda(sparsity=0.5)), calib=calib)
    compactlm.compress(model, Wanda(pattern="2:4"), calib=calib)   # the same through the one entry point

``compactlm.prune`` is this package and is also callable: ``compactlm.prune(model, config, calib=...)``
runs :func:`prune` and returns its :class:`PruneReport`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..export.sparsity import load_sparse, save_sparse  # registers the folder loader for compactlm.models.load
from .barber import Barber
from .common import PruneConfig, PruneReport, is_nm, layer_sparsity, mask_from_scores, nm_mask, topk_mask
from .magnitude import Magnitude, prune_magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[PruneConfig]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
                                          "barber": Barber}


def prune(model: nn.Module, config: PruneConfig, calib: Any = None,
          filter_fn: Callable[[str, nn.Module], bool] | None = None, **options: Any) -> PruneReport:
    """Prune ``model`` in place with ``config``; return what was done (per-linear sparsity, losses, wall time).

    ``calib`` is (N, T) calibration token ids (every method but magnitude needs it); ``options`` go to the
    layer-wise driver (``device``, ``batch_size``).
    """
    from .common import execute

    if not isinstance(config, PruneConfig | Barber):
        raise ConfigError(f"prune() takes a pruning config (Magnitude, Wanda, SparseGPT, Barber), got "
                          f"{type(config).__name__}; use compactlm.compress for other methods")
    if isinstance(config, Magnitude):
        return prune_magnitude(model, config, filter_fn)
    if isinstance(config, Barber) and config.objective == "lm":
        from .barber_lm import rebuild_lm

        return rebuild_lm(model, config, calib, filter_fn, **options)
    return execute(model, config, config.make_run(), calib, filter_fn, **options)


class _CallablePackage(types.ModuleType):
    """Lets ``compactlm.prune(model, config, calib=...)`` and ``compactlm.prune.Wanda`` both work."""

    def __call__(self, *args: Any, **kwargs: Any) -> PruneReport:
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["prune", "save_sparse", "load_sparse", "PruneConfig", "PruneReport", "Magnitude", "Wanda", "SparseGPT",
           "Barber", "METHODS", "layer_sparsity", "mask_from_scores", "nm_mask", "topk_mask", "is_nm"]
