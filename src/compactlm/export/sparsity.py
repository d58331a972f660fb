"""Save a pruned model as dense weights with exact zeros plus the compressed-tensors sparsity config.

``config.json`` gains ``quantization_config = {"quant_method": "compressed-tensors", "format": ...,
"sparsity_config": {"format", "global_sparsity", "sparsity_structure", "targets", "ignore"}}`` (the
fields of compressed-tensors' ``SparsityCompressionConfig``). Where every pruned linear is 2:4, the format
is ``sparse-24-bitmask`` and each such weight is stored as compressed-tensors' legacy 2:4 bitmask triple
(the layout vLLM's 2:4 loader reads):

- ``<name>.weight.compressed``: the kept values, ``(out, in/2)``, row-major in input order;
- ``<name>.weight.bitmask``: the keep-mask as bits, ``(out, ceil(in/8))`` uint8, little bit order
  (``numpy.packbits(..., bitorder="little")``);
- ``<name>.weight.shape``: ``[out, in]``.

Otherwise the format is ``dense`` and the weights are stored as they are (zeros included); the sparsity
config still says which linears are sparse and with which structure (``unstructured``, ``4:8``...).
The folder also holds ``compactlm_sparsity.json`` (the pruning config and per-linear sparsity), which
makes ``compactlm.models.load(folder)`` read it back, bitmasks included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..models.loading import FOLDER_LOADERS, check_loaded_state
from ..utils import atomic_directory, parse_dtype

MARKER = "compactlm_sparsity.json"
FORMAT = "compactlm-sparse-v1"


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in/8)) uint8, little bit order (compressed-tensors' ``pack_bitmasks``)."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy().astype(np.uint8), axis=-1, bitorder="little"))


def unpack_bitmask(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    unpacked = np.unpackbits(bits.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(unpacked.reshape(shape).astype(bool))


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``sparse-24-bitmask`` triple of one 2:4 weight (suffixes ``compressed``, ``bitmask``, ``shape``)."""
    rows, cols = weight.shape
    keep = weight != 0
    if cols % 4 or not bool((keep.view(rows, cols // 4, 4).sum(-1) == 2).all()):
        raise ConfigError("sparse-24-bitmask needs exactly 2 non-zeros in every group of 4 inputs; this weight is not "
                          "2:4 (prune with pattern='2:4' or export with format='dense')")
    return {"compressed": weight[keep].reshape(rows, cols // 2).contiguous(), "bitmask": pack_bitmask(keep),
            "shape": torch.tensor([rows, cols], dtype=torch.int64)}


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    rows, cols = (int(v) for v in shape.tolist())
    keep = unpack_bitmask(bitmask, (rows, cols))
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    dense[keep] = compressed.reshape(-1)
    return dense


def structure_of(weight: torch.Tensor) -> str:
    """``"2:4"`` / ``"4:8"`` when every group obeys it (checked in that order), else ``"unstructured"``."""
    keep = weight != 0
    rows, cols = keep.shape
    for n, m in ((2, 4), (4, 8)):
        if cols % m == 0 and bool((keep.view(rows, cols // m, m).sum(-1) == n).all()):
            return f"{n}:{m}"
    return "unstructured"


def save_sparse(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None,
                prune_config: Any = None, report: Any = None, format: str = "auto",
                dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (pruned in place) to ``path`` atomically; ``format`` is auto | dense | sparse-24-bitmask."""
    from safetensors.torch import save_file

    from ..models.adapter import get_adapter

    if format not in ("auto", "dense", "sparse-24-bitmask"):
        raise ConfigError(f"format must be auto, dense or sparse-24-bitmask, got {format!r}")
    dtype = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    linears = get_adapter(model).named_linears()
    sparse = {n: m for n, m in linears.items() if bool((m.weight == 0).any())}
    if not sparse:
        raise ConfigError("the model has no pruned linears (no exact zeros); prune it first (compactlm.prune)")
    structures = {n: structure_of(m.weight) for n, m in sparse.items()}
    kinds = sorted(set(structures.values()))
    if format == "auto":
        format = "sparse-24-bitmask" if kinds == ["2:4"] else "dense"
    if format == "sparse-24-bitmask" and kinds != ["2:4"]:
        raise ConfigError(f"sparse-24-bitmask needs every pruned linear to be 2:4; found {kinds}: use format='dense'")
    zeros = sum(int((m.weight == 0).sum()) for m in sparse.values())
    total = sum(m.weight.numel() for m in sparse.values())
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    if format == "sparse-24-bitmask":
        for name in sparse:
            for suffix, tensor in compress_24(state.pop(f"{name}.weight")).items():
                state[f"{name}.weight.{suffix}"] = tensor
    sparsity_config = {
        "format": format, "global_sparsity": zeros / total,
        "sparsity_structure": kinds[0] if len(kinds) == 1 else "unstructured",
        "targets": sorted(sparse), "ignore": sorted(set(linears) - set(sparse)) + ["lm_head"],
        "registry_requires_subclass": False,
    }
    meta = {"format": FORMAT, "storage": format, "dtype": str(dtype).replace("torch.", ""),
            "unfused_experts": any(".experts.experts." in n for n in linears),
            "config": prune_config.to_dict() if prune_config is not None else None,
            "sparsity": {n: float((m.weight == 0).float().mean()) for n, m in sparse.items()},
            "structures": structures, "report": report.to_dict() if report is not None else None}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": format,
                                         "config_groups": {}, "sparsity_config": sparsity_config}
        config["torch_dtype"] = meta["dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_sparse(path: Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """Read a :func:`save_sparse` folder back: dense weights with their zeros (bitmasks decompressed)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.adapter import get_adapter

    path = Path(path)
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path / MARKER} is not a compactlm sparse-model marker (format {meta.get('format')!r})")
    dtype = parse_dtype(dtype) if dtype is not None else parse_dtype(meta["dtype"])
    raw = json.loads((path / "config.json").read_text())
    raw.pop("quantization_config", None)  # the weights are dense: no quantizer must touch them
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if meta.get("unfused_experts"):
        adapter = get_adapter(model)
        for i in range(adapter.num_layers):
            adapter.linears(i)  # unfuse 3-D experts into per-expert linears, as they were when saved
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"could not read {path / 'model.safetensors'}: {exc}") from exc
    for key in [k for k in state if k.endswith(".weight.compressed")]:
        base = key[: -len(".compressed")]
        state[base] = decompress_24(state.pop(key), state.pop(f"{base}.bitmask"), state.pop(f"{base}.shape"))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    check_loaded_state(model, path, missing, unexpected)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval().to(device), tokenizer


FOLDER_LOADERS[MARKER] = load_sparse
