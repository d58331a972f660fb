"""Configs are data: frozen dataclasses that validate themselves and round-trip through dict/JSON.

Every method config subclasses :class:`BaseConfig`. Subclasses are registered by class name so that
``BaseConfig.from_dict(cfg.to_dict())`` rebuilds the same object, which is what recipes, saved models
and CLI flags rely on. :class:`PerLayer` maps module names (exact, or ``re:`` regexes) to configs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar

from .errors import ConfigError

CONFIG_TYPES: dict[str, type[BaseConfig]] = {}


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Base of all method configs. Subclasses are ``@dataclass(frozen=True)`` and validate in ``__post_init__``."""

    kind: ClassVar[str] = "config"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CONFIG_TYPES[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(self).__name__}
        for field in dataclasses.fields(self):
            out[field.name] = _encode(getattr(self, field.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BaseConfig:
        if not isinstance(data, dict) or "type" not in data:
            raise ConfigError(f"a config dict needs a 'type' key naming the config class, got {data!r}")
        name = data["type"]
        cls = CONFIG_TYPES.get(name)
        if cls is None:
            known = ", ".join(sorted(CONFIG_TYPES))
            raise ConfigError(f"unknown config type {name!r}; known types: {known}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"type"}
        if unknown:
            raise ConfigError(
                f"{name} has no field(s) {sorted(unknown)}; its fields are {sorted(names)}"
            )
        kwargs = {k: _decode(v) for k, v in data.items() if k != "type"}
        return cls(**kwargs)

    @staticmethod
    def from_json(text: str) -> BaseConfig:
        return BaseConfig.from_dict(json.loads(text))


def _encode(value: Any) -> Any:
    if isinstance(value, BaseConfig):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value and value["type"] in CONFIG_TYPES:
        return BaseConfig.from_dict(value)
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class PerLayer(BaseConfig):
    """Per-module choice of config: ``{"re:.*down_proj": GPTQ(bits=4), "_default": GPTQ(bits=2)}``.

    Keys are exact module names, ``re:`` regexes (``re.fullmatch``), or ``_default``. The first matching
    key in insertion order wins; a module matching nothing and with no ``_default`` is left untouched.
    """

    configs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.configs:
            raise ConfigError("PerLayer needs at least one entry, e.g. {'_default': RTN(bits=4)}")
        for key, cfg in self.configs.items():
            if cfg is not None and not isinstance(cfg, BaseConfig):
                raise ConfigError(f"PerLayer[{key!r}] must be a config or None, got {type(cfg).__name__}")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ConfigError(f"PerLayer key {key!r} is not a valid regex: {exc}") from None

    def config_for(self, module_name: str) -> BaseConfig | None:
        for key, cfg in self.configs.items():
            if key == "_default":
                continue
            if key.startswith("re:"):
                if re.fullmatch(key[3:], module_name):
                    return cfg
            elif key == module_name:
                return cfg
        return self.configs.get("_default")
