"""Export a packed model as a compressed-tensors ``pack-quantized`` checkpoint (the format vLLM loads).

Per quantized linear ``<name>``: ``<name>.weight_packed`` (int32, ``(out, ceil(in·b/32))``, codes stored
unsigned = signed + 2^(b−1) — exactly our :class:`PackedLinear` ``qdata`` layout), ``<name>.weight_scale``
``(out, groups)``, ``<name>.weight_shape`` and, for asymmetric grids, ``<name>.weight_zero_point``
(int32, packed along the output dimension). ``config.json`` carries the ``quantization_config`` vLLM
reads: one config group per distinct (bits, group size, symmetry), each listing its modules by exact
name, so mixed precision (APTQ) is expressed per module. Unquantized linears (``lm_head``) are listed in
``ignore``.

vLLM's packed-int kernels read 2, 4 and 8 bits; a 3-bit layer is refused with a clear error rather than
written in a form vLLM would misread (3-bit models stay loadable in our own format, ``compactlm.save``).
Routed experts that the adapter unfused (``mlp.experts.experts.<e>.<proj>``) are written under the
per-expert names serving engines read (``mlp.experts.<e>.<proj>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..modules.packed_linear import PackedLinear
from ..primitives.pack import pack_int32
from ..utils import atomic_directory, parse_dtype

EXPORTABLE_BITS = (2, 4, 8)


def _export_name(name: str) -> str:
    return name.replace(".experts.experts.", ".experts.")


def weights_args(m: PackedLinear) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of one packed layer, as compressed-tensors spells them."""
    return {"num_bits": m.bits, "type": "int", "symmetric": m.symmetric,
            "strategy": "channel" if m.group_size == -1 else "group",
            "group_size": None if m.group_size == -1 else m.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax"}


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None,
                              dtype: torch.dtype | str = "bf16", overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` as compressed-tensors ``pack-quantized``; ``dtype`` for dense weights, scales."""
    from safetensors.torch import save_file

    dtype = parse_dtype(dtype)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not packed:
        raise ConfigError("the model has no quantized layers; quantize it first (compactlm.quantize) before exporting")
    for name, m in packed.items():
        if m.bits not in EXPORTABLE_BITS:
            raise ConfigError(f"{name} is {m.bits}-bit: vLLM's compressed-tensors packer reads only {EXPORTABLE_BITS}"
                              "-bit weights, so a 3-bit export would be misread; keep it in compactlm's own format "
                              "(compactlm.save / --out without --export), or quantize with bits 2, 4 or 8")
        if m.g_idx is not None:
            raise ConfigError(f"{name} has a g_idx (dynamic act-order groups), which this export does not write; "
                              "quantize with static groups (the default)")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in packed.items():
        e = _export_name(name)
        tensors[f"{e}.weight_packed"] = m.qdata.cpu().contiguous()
        tensors[f"{e}.weight_scale"] = m.scale.to(dtype).cpu().contiguous()
        tensors[f"{e}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if not m.symmetric:
            tensors[f"{e}.weight_zero_point"] = pack_int32(m.zero.cpu(), m.bits, dim=0)
        if m.bias is not None:
            tensors[f"{e}.bias"] = m.bias.to(dtype).cpu().contiguous()
    prefixes = tuple(f"{n}." for n in packed)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight"):
            continue
        tensors[_export_name(key)] = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()
    groups: dict[tuple, list[str]] = {}
    for name, m in packed.items():
        groups.setdefault((m.bits, m.group_size, m.symmetric), []).append(_export_name(name))
    config_groups = {}
    for k, ((_bits, _g, _sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{k}"] = {"targets": names, "weights": weights_args(packed[next(
            n for n in packed if _export_name(n) == names[0])]), "input_activations": None,
            "output_activations": None, "format": "pack-quantized"}
    ignore = [_export_name(n) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": "0.20.1"}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qcfg
        cfg["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
