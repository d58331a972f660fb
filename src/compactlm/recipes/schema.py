"""Recipes: an ordered list of serialized configs, validated as a whole before any work starts.

A recipe is YAML::

    name: aptq-2.5bit+kv4+sals
    description: ...
    calibration: {source: essays, nsamples: 32, seqlen: 512, seed: 0}     # CALIB-pg-512 (quick variant)
    evaluate: {ppl_windows: 40, ruler_lengths: [2048], ruler_samples: 3, speed: true}
    steps:
      - {type: APTQ, avg_bits: 2.5, group_size: 64}      # a config class name and its fields ...
      - {type: kv, bits: 4}                               # ... or a friendly alias (see ALIASES)
      - {type: sals}
      - {type: export, format: compactlm}

Each step is exactly ``BaseConfig.from_dict`` of its mapping (aliases resolved first, nested configs
too), so a recipe is only serialized configs (STYLE 2). Every step belongs to one stage, and stages run
in the order prune → quantize → kv → attention → export. :func:`validate_steps` refuses what cannot
work with an error that names the step and the fix: an unknown type or field, stages out of order (a KV
step before the weights), two steps of one stage (two quantize steps, two prefill or two decode
attention configs), or an export its format cannot hold (3-bit weights to compressed-tensors).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..config import CONFIG_TYPES, BaseConfig
from ..errors import ConfigError

STAGES = ("prune", "quantize", "kv", "attention", "export")

# Friendly names a recipe may use instead of the class name (case-insensitive).
ALIASES = {
    "rtn": "RTN", "gptq": "GPTQ", "aptq": "APTQ",
    "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "barber": "Barber",
    "kv": "KVQuant", "kivi": "KVQuant", "kvquant": "KVQuant",
    "sals": "SALSConfig", "sparse-prefill": "SparsePrefillConfig", "prefill": "SparsePrefillConfig",
    "streaming": "StreamingConfig", "quest": "QuestConfig",
    "export": "Export",
}

# Modules whose import defines the config classes a recipe may name (imported lazily, once).
CONFIG_MODULES = (
    "compactlm.quant.rtn", "compactlm.quant.gptq", "compactlm.quant.aptq",
    "compactlm.prune.magnitude", "compactlm.prune.wanda", "compactlm.prune.sparsegpt", "compactlm.prune.barber",
    "compactlm.kv.config", "compactlm.attention.sals", "compactlm.attention.prefill_sparse",
    "compactlm.attention.decode_baselines",
)

EXPORT_FORMATS = ("compactlm", "compressed-tensors")
CT_BITS = (2, 4, 8)  # what compressed-tensors' pack-quantized (and vLLM) reads


@dataclasses.dataclass(frozen=True)
class Export(BaseConfig):
    """Export step: where the compressed model goes.

    - ``format``: ``compactlm`` (our packed folder, every bit width, loads with ``compactlm.models.load``) or
      ``compressed-tensors`` (``pack-quantized``, what vLLM loads; 2/4/8-bit weights only). The compactlm
      folder is always written; ``compressed-tensors`` adds a ``compressed-tensors/`` subfolder.
    - ``dtype``: dtype of the dense weights and scales in a compressed-tensors export.
    """

    format: str = "compactlm"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"Export.format must be one of {EXPORT_FORMATS}, got {self.format!r}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"Export.dtype must be bf16, fp16 or fp32, got {self.dtype!r}")


def import_config_modules() -> list[str]:
    """Import every module defining recipe configs; return the ones that do not exist (yet)."""
    missing = []
    for name in CONFIG_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # a module that exists but imports something missing is a real error
            missing.append(name)
    return missing


def resolve_aliases(data: Any) -> Any:
    """Replace friendly ``type`` names by config class names, recursively (Barber's ``init`` too)."""
    if isinstance(data, dict):
        out = {k: resolve_aliases(v) for k, v in data.items()}
        if isinstance(out.get("type"), str) and out["type"] not in CONFIG_TYPES:
            out["type"] = ALIASES.get(out["type"].lower(), out["type"])
        return out
    if isinstance(data, list):
        return [resolve_aliases(v) for v in data]
    return data


def stage_of(cfg: BaseConfig) -> str:
    """The stage a config belongs to, by its type (no string dispatch on names)."""
    from ..kv.config import KVQuant
    from ..prune.barber import Barber
    from ..prune.common import PruneConfig
    from ..quant.common import WeightQuantConfig

    if isinstance(cfg, PruneConfig | Barber):
        return "prune"
    if isinstance(cfg, WeightQuantConfig):
        return "quantize"
    if isinstance(cfg, KVQuant):
        return "kv"
    if isinstance(cfg, Export):
        return "export"
    if attention_phase(cfg) is not None:
        return "attention"
    raise ConfigError(f"{type(cfg).__name__} cannot be a recipe step: steps are pruning, weight-quantization, "
                      "KV-cache, attention or export configs")


def attention_phase(cfg: BaseConfig) -> str | None:
    """``prefill`` or ``decode`` for a runtime attention config; None for anything else."""
    from ..attention.runtime import RUNTIME_BUILDERS

    if type(cfg) not in RUNTIME_BUILDERS:
        return None
    from ..attention.prefill_sparse import SparsePrefillConfig

    return "prefill" if isinstance(cfg, SparsePrefillConfig) else "decode"


def parse_step(index: int, raw: Any) -> BaseConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"step {index + 1}: each step is a mapping like {{type: GPTQ, bits: 4}}, got {raw!r}")
    if "type" not in raw:
        raise ConfigError(f"step {index + 1}: missing 'type' (a config class such as GPTQ or an alias: "
                          f"{', '.join(sorted(ALIASES))}); got keys {sorted(raw)}")
    data = resolve_aliases(raw)
    if data["type"] not in CONFIG_TYPES:
        known = sorted(set(ALIASES) | {ALIASES[a] for a in ALIASES})
        raise ConfigError(f"step {index + 1}: unknown step type {raw['type']!r}; use one of {', '.join(known)}")
    try:
        return BaseConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"step {index + 1} ({raw['type']}): {exc}") from None
    except TypeError as exc:  # a field of the wrong shape that the config's own checks did not catch
        raise ConfigError(f"step {index + 1} ({raw['type']}): {exc}") from None


def _quant_bits(cfg: BaseConfig) -> set[int]:
    from ..quant.aptq import APTQ

    bits = set(cfg.bits_menu) | set(cfg.pin.values()) if isinstance(cfg, APTQ) else {cfg.bits}
    return bits


def validate_steps(steps: tuple[BaseConfig, ...]) -> dict[str, Any]:
    """Check a whole recipe; return ``{stage: [configs]}`` and ``prefill``/``decode`` attention configs."""
    if not steps:
        raise ConfigError("a recipe needs at least one step, e.g. [{type: GPTQ, bits: 4}]")
    by_stage: dict[str, list[BaseConfig]] = {s: [] for s in STAGES}
    phases: dict[str, BaseConfig] = {}
    last = -1
    for i, cfg in enumerate(steps):
        stage = stage_of(cfg)
        rank = STAGES.index(stage)
        if rank < last:
            raise ConfigError(f"step {i + 1} ({type(cfg).__name__}) is a {stage} step after a {STAGES[last]} step; "
                              f"steps run in the order {' -> '.join(STAGES)} (a KV or attention step applies to the "
                              "final weights): move it up")
        last = rank
        if stage == "attention":
            phase = attention_phase(cfg)
            if phase in phases:
                raise ConfigError(f"step {i + 1}: two {phase} attention configs ({type(phases[phase]).__name__} and "
                                  f"{type(cfg).__name__}); one prefill config and one decode config at most")
            phases[phase] = cfg
        elif by_stage[stage]:
            raise ConfigError(f"step {i + 1}: a second {stage} step ({type(cfg).__name__} after "
                              f"{type(by_stage[stage][0]).__name__}); a recipe has at most one {stage} step — "
                              + ("use APTQ or PerLayer for mixed precision" if stage == "quantize" else
                                 "combine them into one config"))
        by_stage[stage].append(cfg)
    export = by_stage["export"][0] if by_stage["export"] else None
    if export is not None and export.format == "compressed-tensors":
        if not by_stage["quantize"]:
            raise ConfigError("export to compressed-tensors needs a quantize step (it stores quantized weights); "
                              "add one or use format: compactlm")
        bad = sorted(_quant_bits(by_stage["quantize"][0]) - set(CT_BITS))
        if bad:
            raise ConfigError(f"export to compressed-tensors cannot hold {bad}-bit weights (vLLM's packer reads "
                              f"{CT_BITS}); use format: compactlm, or quantize with bits in {CT_BITS}")
    return {"stages": by_stage, "prefill": phases.get("prefill"), "decode": phases.get("decode"), "export": export}
