"""Models: loading (default model, folders, GGUF, hub ids, tiny test models) and the architecture adapter."""

from .adapter import Adapter, UnfusedExperts, get_adapter
from .loading import DEFAULT_MODEL, cache_dir, default_model_dir, load
from .tiny import TINY_FAMILIES, tiny_model

__all__ = [
    "Adapter", "UnfusedExperts", "get_adapter", "DEFAULT_MODEL", "cache_dir", "default_model_dir", "load",
    "TINY_FAMILIES", "tiny_model",
]
