"""What every weight-quantization method shares: the config fields, the targets, packing, the summary.

Targets are the compressible linears of every decoder layer, as the architecture adapter lists them
(the embeddings and ``lm_head`` stay in full precision, as in llm-compressor's and GPTQModel's
defaults). ``ignore`` (regexes over full module names) and ``filter_fn`` narrow them down.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError
from ..models.adapter import get_adapter
from ..modules.packed_linear import PackedLinear
from ..primitives.quant import QuantSpec, check_bits, check_group_size


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(BaseConfig):
    """Fields every weight quantizer has.

    - ``bits``: 2, 3, 4 or 8.
    - ``group_size``: input columns sharing one scale/zero; must divide every quantized layer's input
      width; -1 = per output channel.
    - ``symmetric``: symmetric grid (no zero point) instead of asymmetric.
    - ``clip_search``: shrink each group's range to the ratio minimising reconstruction error.
    - ``ignore``: regexes (``re.fullmatch``) of module names to keep in full precision.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    clip_search: bool = False
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer dividing the input width, or -1 for per "
                              f"channel; got {self.group_size!r}")
        if isinstance(self.ignore, str):
            raise ConfigError(f"ignore must be a list of regexes, got the string {self.ignore!r}; wrap it in a list")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"ignore pattern {pattern!r} is not a valid regex: {exc}") from None

    def spec(self, bits: int | None = None) -> QuantSpec:
        return QuantSpec(bits=bits or self.bits, group_size=self.group_size, symmetric=self.symmetric,
                         clip_search=self.clip_search)


def quant_targets(model: nn.Module, cfg: WeightQuantConfig, filter_fn=None) -> dict[str, nn.Linear]:
    """Full name -> linear for every layer ``cfg`` will quantize; clear errors for what it cannot."""
    adapter = get_adapter(model)
    out: dict[str, nn.Linear] = {}
    for i in range(adapter.num_layers):
        prefix = adapter.layer_prefix(i)
        for rel, module in adapter.linears(i).items():
            name = f"{prefix}.{rel}"
            if any(re.fullmatch(p, name) for p in cfg.ignore):
                continue
            if filter_fn is not None and not filter_fn(name, module):
                continue
            check_quantizable(name, module)
            check_group_size(cfg.spec(), module.in_features, name)
            out[name] = module
    return out


def check_quantizable(name: str, module: nn.Module) -> None:
    if isinstance(module, PackedLinear):
        raise ConfigError(f"{name} is already quantized ({module.bits}-bit PackedLinear); quantize the original "
                          "full-precision model, or exclude it with ignore=[...]")
    if type(module) is not nn.Linear:
        raise ConfigError(f"cannot quantize {name}: it is a {type(module).__name__}, and only torch.nn.Linear "
                          "layers can be quantized; exclude it with ignore=[...] or filter_fn")


def layer_filter(targets: dict[str, nn.Linear]):
    """A ``filter_fn`` for :func:`compactlm.layerwise.run` selecting exactly ``targets``."""
    ids = {id(m) for m in targets.values()}
    return lambda _name, module: id(module) in ids


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def pack_into(model: nn.Module, name: str, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor, spec: QuantSpec, g_idx: torch.Tensor | None = None) -> PackedLinear:
    """Replace ``linear`` (named ``name``) by a PackedLinear holding ``codes`` on ``linear``'s device."""
    dev = linear.weight.device
    packed = PackedLinear.from_codes(codes.to(dev), scale.to(dev), zero.to(dev), bits=spec.bits,
                                     group_size=spec.group_size, symmetric=spec.symmetric,
                                     bias=None if linear.bias is None else linear.bias.detach(), g_idx=g_idx,
                                     scale_dtype=linear.weight.dtype if linear.weight.dtype != torch.float16
                                     else torch.float32)
    replace_module(model, name, packed)
    return packed


def quant_summary(model: nn.Module) -> dict[str, Any]:
    """Bits per quantized layer and the averages over them: weight-only, and counting scales and zeros.

    Scales count as 16 bits (they are exported as bf16/fp16), zeros as ``bits`` bits (asymmetric only).
    """
    per_layer: dict[str, int] = {}
    weights = weight_bits = meta_bits = 0
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            per_layer[name] = module.bits
            n = module.in_features * module.out_features
            weights += n
            weight_bits += module.weight_bits()
            meta_bits += module.metadata_bits()
    if not weights:
        return {"quantized_layers": 0, "bits_per_layer": {}, "avg_bits": None, "avg_bits_with_metadata": None}
    packed_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "quantized_layers": len(per_layer),
        "bits_per_layer": per_layer,
        "avg_bits": weight_bits / weights,
        "avg_bits_with_metadata": (weight_bits + meta_bits) / weights,
        "quantized_weights": weights,
        "model_bytes": packed_bytes + dense_bytes,
    }
