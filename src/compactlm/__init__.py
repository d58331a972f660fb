"""compactlm: make open LLMs small and fast.

Public API at a glance::

    import compactlm
    model, tok = compactlm.models.load("smollm2-135m")
    print(compactlm.evaluation.perplexity(model, tok, windows=40))

Nothing is patched at import.
"""

from . import config, data, evaluation, models, prune  # prune is callable: compactlm.prune(model, cfg, calib=)
from .api import compress
from .api import compress as quantize  # noqa: I001  (weight quantization alias)
from .attention.runtime import sparse_attention  # noqa: F401  (decode sparse attention scope)
from .attention.sals import SALS, SALSConfig  # noqa: F401  (baselines: compactlm.attention.decode_baselines)
from .config import BaseConfig, PerLayer
from .errors import CompactLMError
from .inspector import inspect  # noqa: F401  (compactlm.inspect; the package is named inspector)
from .kv import KVQuant, kv_cache
from .quant.serialize import save  # noqa: F401  (compactlm.save; registers the packed-folder loader)

__version__ = "0.1.0"

__all__ = ["compress", "BaseConfig", "PerLayer", "CompactLMError", "config", "data", "evaluation", "models", "prune"]
__all__ += ["KVQuant", "kv_cache", "quantize", "save", "inspect", "sparse_attention", "SALS", "SALSConfig"]
