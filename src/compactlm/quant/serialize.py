"""``compactlm.save(model, dir)`` and the loader behind ``compactlm.models.load(dir)`` for packed models.

The folder is a Hugging Face checkpoint folder (``config.json``, tokenizer files) plus:

- ``model.safetensors``: the model's state dict, where each quantized linear holds its packed
  ``qdata``/``scale``/``zero`` (and ``g_idx``, ``bias``) instead of ``weight`` — every bit width,
  3-bit included, round-trips exactly;
- ``compactlm_quant.json`` (the marker :data:`MARKER`): per quantized module its bits, group size,
  symmetry and shape, so the loader rebuilds the same :class:`PackedLinear` layers; nothing is parsed
  from names (STYLE 11).

The folder is written atomically (a temp folder renamed into place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..models.loading import FOLDER_LOADERS, check_loaded_state
from ..modules.packed_linear import PackedLinear
from ..utils import atomic_directory, parse_dtype
from .common import replace_module

MARKER = "compactlm_quant.json"
FORMAT = "compactlm-packed"


def save(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized or not) and optionally its tokenizer to the folder ``path``, atomically."""
    from safetensors.torch import save_model

    modules = {name: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                      "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                      "g_idx": m.g_idx is not None, "scale_dtype": str(m.scale.dtype).replace("torch.", "")}
               for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    unfused = any(".experts.experts." in n for n, _ in model.named_modules())
    dtype = next(model.parameters()).dtype
    with atomic_directory(path, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": FORMAT, "version": 1, "dtype": str(dtype).replace("torch.", ""),
                "unfused_experts": unfused, "modules": modules, **(extra or {})}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_packed(path: Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """Rebuild the model of a :func:`save` folder: the architecture from config, packed layers from the marker."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.adapter import get_adapter

    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path / MARKER} is not a compactlm packed-model marker (format {meta.get('format')!r})")
    dtype = parse_dtype(dtype) if dtype is not None else parse_dtype(meta["dtype"])
    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    if meta.get("unfused_experts"):
        for i in range(adapter.num_layers):
            adapter.linears(i)  # the adapter unfuses 3-D experts into linears, as it did before saving
    for name, m in meta["modules"].items():
        shell = PackedLinear(m["in_features"], m["out_features"], m["bits"], m["group_size"], m["symmetric"],
                             bias=m["bias"], has_g_idx=m["g_idx"], scale_dtype=parse_dtype(m["scale_dtype"]))
        try:
            replace_module(model, name, shell)
        except AttributeError as exc:
            raise ModelLoadError(f"{path}: quantized module {name} does not exist in the {config.model_type} "
                                 "architecture; the folder is corrupt or from another model") from exc
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"could not read {path / 'model.safetensors'}: {exc}") from exc
    check_loaded_state(model, path, missing, unexpected)
    # Scales are kept in their saved dtype; only dense floating parameters follow the requested dtype.
    for mod in model.modules():
        if not isinstance(mod, PackedLinear):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(dtype)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval().to(device), tokenizer


FOLDER_LOADERS[MARKER] = load_packed
