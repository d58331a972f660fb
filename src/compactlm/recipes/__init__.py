"""Recipes: one YAML file composing prune → quantize → KV cache → attention → export (see :mod:`.schema`).

``load_recipe("aptq-2.5bit+kv4+sals")`` reads a shipped recipe (``src/compactlm/recipes/*.yaml``),
``load_recipe("my.yaml")`` a file; both return a validated :class:`Recipe` or raise ConfigError before
any model is loaded. ``shipped_recipes()`` lists the shipped names.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import BaseConfig
from ..errors import ConfigError
from .schema import ALIASES, STAGES, Export, import_config_modules, parse_step, validate_steps

CALIB_SOURCES = ("essays",)  # never the evaluation text (PROTOCOL CALIB-pg-512)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """CALIB-pg-512 and its quick variant: ``nsamples`` × ``seqlen`` tokens of ``source`` at seeded offsets."""

    source: str = "essays"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in CALIB_SOURCES:
            raise ConfigError(f"calibration.source must be one of {CALIB_SOURCES} (never the evaluation text), "
                              f"got {self.source!r}")
        for name in ("nsamples", "seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"calibration.{name} must be a positive integer, got {v!r}")

    @property
    def protocol(self) -> str:
        quick = " (quick variant)" if self.nsamples == 32 and self.seqlen == 512 else ""
        return f"CALIB-pg-{self.seqlen}{quick}: {self.nsamples} x {self.seqlen} tokens, seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """What ``compactlm compress`` measures for the report, each side by side with the uncompressed model.

    - ``ppl_windows``: windows of PPL-wiki-512 (40 = PPL-wiki-512-q; 0 = skip).
    - ``ruler_lengths`` / ``ruler_samples`` / ``ruler_tasks``: RULER-syn lengths, samples per task and
      length, tasks (empty lengths = skip); ``ruler_dtype``: the dtype both models are cast to for it (bf16 by
      default, like the long-context protocol runs: greedy generation over 2K+ tokens is ~2.5x faster than
      fp32 on a bf16-capable CPU, and the packed int4 kernel takes bf16 activations).
    - ``inspect_samples``: 512-token sequences for the precision inspector's top offenders (0 = skip).
    - ``speed``: time prefill (``speed_prefill`` tokens) and greedy decode (``speed_decode`` tokens), with
      both models cast to ``speed_dtype`` (bf16 by default: the serving dtype, and the one PyTorch's CPU
      int4 kernel takes); speed is measured last, after the quality figures, on the cast copies.
    """

    ppl_windows: int = 40
    ruler_lengths: tuple[int, ...] = (2048,)
    ruler_samples: int = 2
    ruler_tasks: tuple[str, ...] = ("niah_single", "passkey")
    speed: bool = True
    speed_prefill: int = 1024
    speed_decode: int = 32
    speed_dtype: str = "bf16"
    ruler_dtype: str = "bf16"
    inspect_samples: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ruler_lengths", tuple(self.ruler_lengths))
        object.__setattr__(self, "ruler_tasks", tuple(self.ruler_tasks))
        for name in ("ppl_windows", "ruler_samples", "speed_prefill", "speed_decode", "inspect_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"evaluate.{name} must be an integer >= 0, got {v!r}")
        for name in ("speed_dtype", "ruler_dtype"):
            if getattr(self, name) not in ("bf16", "fp16", "fp32"):
                raise ConfigError(f"evaluate.{name} must be bf16, fp16 or fp32, got {getattr(self, name)!r}")
        if any(not isinstance(n, int) or n < 128 for n in self.ruler_lengths):
            raise ConfigError(f"evaluate.ruler_lengths are context lengths in tokens (>= 128), got "
                              f"{self.ruler_lengths}")
        if self.ruler_lengths:
            from ..evaluation.ruler import check_tasks

            check_tasks(self.ruler_tasks)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: ``steps`` are configs in stage order; ``plan`` groups them by stage."""

    name: str
    steps: tuple[BaseConfig, ...]
    description: str = ""
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    evaluate: Evaluate = dataclasses.field(default_factory=Evaluate)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "plan", validate_steps(self.steps))

    def stage(self, name: str) -> list[BaseConfig]:
        return self.plan["stages"][name]  # type: ignore[attr-defined]

    @property
    def weight_steps(self) -> list[BaseConfig]:
        return self.stage("prune") + self.stage("quantize")

    @property
    def kv(self) -> BaseConfig | None:
        return (self.stage("kv") or [None])[0]

    @property
    def attention(self) -> list[BaseConfig]:
        return self.stage("attention")

    @property
    def export(self) -> Export:
        return self.plan["export"] or Export()  # type: ignore[attr-defined]

    @property
    def needs_calibration(self) -> bool:
        from ..attention.sals import SALSConfig

        calibrated = [c for c in self.weight_steps if type(c).__name__ not in ("RTN", "Magnitude")]
        sals = [c for c in self.attention if isinstance(c, SALSConfig) and c.projections is None]
        return bool(calibrated or sals)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "calibration": dataclasses.asdict(self.calibration),
                "evaluate": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in dataclasses.asdict(self.evaluate).items()},
                "steps": [s.to_dict() for s in self.steps]}

    @staticmethod
    def from_dict(data: Any, name: str | None = None) -> Recipe:
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe is a mapping with 'steps' (and optional name, description, calibration, "
                              f"evaluate), got {type(data).__name__}")
        known = {"name", "description", "calibration", "evaluate", "steps"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"recipe has unknown key(s) {sorted(unknown)}; keys are {sorted(known)}")
        steps = data.get("steps")
        if not isinstance(steps, list) or not steps:
            raise ConfigError("recipe needs 'steps': a non-empty list of {type: <Config or alias>, ...fields}")
        missing = import_config_modules()
        if missing:
            raise ConfigError(f"config modules not available in this build: {missing}")
        parsed = tuple(parse_step(i, s) for i, s in enumerate(steps))
        return Recipe(name=str(data.get("name") or name or "recipe"), steps=parsed,
                      description=str(data.get("description", "")),
                      calibration=_section(Calibration, data.get("calibration"), "calibration"),
                      evaluate=_section(Evaluate, data.get("evaluate"), "evaluate"))


def with_overrides(recipe: Recipe, calib_samples: int | None = None, ppl_windows: int | None = None,
                   ruler_samples: int | None = None) -> Recipe:
    """The recipe with its calibration size or evaluation budget changed (the CLI's quick-run flags)."""
    cal, ev = recipe.calibration, recipe.evaluate
    if calib_samples is not None:
        cal = dataclasses.replace(cal, nsamples=calib_samples)
    if ppl_windows is not None:
        ev = dataclasses.replace(ev, ppl_windows=ppl_windows)
    if ruler_samples is not None:
        ev = dataclasses.replace(ev, ruler_samples=ruler_samples)
    return dataclasses.replace(recipe, calibration=cal, evaluate=ev)


def _section(cls: type, data: Any, what: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{what}' must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"recipe {what} has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"recipe {what}: {exc}") from None


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    root = resources.files(__name__)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_text(spec: str) -> tuple[str, str]:
    """(name, YAML text) of a shipped recipe name or a file path."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {spec} does not exist")
        return path.stem, path.read_text()
    shipped = resources.files(__name__) / f"{spec}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {spec!r}: not a file, and the shipped recipes are "
                          f"{', '.join(shipped_recipes())}")
    return spec, shipped.read_text()


def parse_recipe(text: str, name: str | None = None) -> Recipe:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {name or ''} is not valid YAML: {exc}") from None
    return Recipe.from_dict(data, name)


def load_recipe(spec: str) -> Recipe:
    """A shipped recipe by name, or a YAML file, validated as a whole."""
    name, text = recipe_text(spec)
    return parse_recipe(text, name)


__all__ = ["ALIASES", "STAGES", "Calibration", "Evaluate", "Export", "Recipe", "load_recipe", "parse_recipe",
           "shipped_recipes", "with_overrides"]
