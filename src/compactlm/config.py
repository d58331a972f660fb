"""Configs are data: frozen dataclasses that validate themselves and round-trip through dict/JSON.

Every method config subclasses :class:`BaseConfig`. Subclasses are registered by class name so that
``BaseConfig.from_dict(cfg.to_dict())`` rebuilds the same object, which is what recipes, saved models
and CLI flags rely on. :class:`PerLayer` maps module names (exact, or ``re:`` regexes) to configs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
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


# --- option strings -> typed config fields ---------------------------------------------------------------
# CLI flags, recipe overrides and runner specs (``--kv int2@sinks=16``, ``--attn sals@keep=1/16``,
# ``gptq:3@clip_search=true``) arrive as strings. One converter reads each dataclass field's annotation, so
# every config parses the same way and a new field needs no parsing code.

_TRUE, _FALSE, _NONE = ("true", "yes", "on"), ("false", "no", "off"), ("none", "null")


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _describe(hint: Any) -> str:
    """What a value of ``hint`` looks like, in a user's words (``a number or none``)."""
    members = [m for m in _members(hint) if m is not type(None)]
    if members == [int]:
        words = "a whole number"
    elif members == [bool]:
        words = "true or false"
    elif members and all(m in (int, float) for m in members):
        words = "a number (fractions such as 1/8 too)"
    else:
        words = " or ".join(getattr(m, "__name__", str(m)) for m in members)
    return words + (" or none" if type(None) in _members(hint) else "")


def _convert(hint: Any, text: str) -> Any:
    """``text`` as a value of ``hint``; raises ValueError when no member of the annotation accepts it."""
    members = _members(hint)
    low = text.strip().lower()
    if type(None) in members and low in _NONE + ("",):
        return None
    for member in members:  # the most specific reading first: bool, int, float, containers, then str
        if member is bool and low in _TRUE + _FALSE:
            return low in _TRUE
    for member in members:
        if member is int and re.fullmatch(r"[+-]?\d+", low):
            return int(low)
    for member in members:
        if member is float:
            try:
                if "/" in low:  # fractions such as keep=1/8
                    num, den = low.split("/")
                    return float(num) / float(den)
                return float(low)
            except (ValueError, ZeroDivisionError):
                pass
    for member in members:
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin in (tuple, list):
            item = args[0] if args else str
            parts = [t for t in re.split(r"[,\s]+", text.strip()) if t]
            return origin(_convert(item, t) for t in parts)
        if origin is dict:
            key_t, val_t = args if args else (str, str)
            out = {}
            for pair in (t for t in text.split(",") if t.strip()):
                key, sep, val = pair.rpartition(":")
                if not sep:
                    raise ValueError(f"is not a KEY:VALUE list (entry {pair!r})")
                out[_convert(key_t, key)] = _convert(val_t, val)
            return out
    if str in members or any(m is Any for m in members):
        return text.strip()
    raise ValueError(f"is not {_describe(hint)}")


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def config_from_options(cls: type, options: dict[str, Any], *, what: str | None = None) -> Any:
    """Build ``cls`` from CLI-style options: strings become each field's annotated type, other values pass.

    Accepted spellings: ``true/false/yes/no/on/off`` for bools, ``none``/``null`` for optional fields,
    integers, floats and fractions (``1/8``) for numbers, comma- or space-separated lists for tuples,
    ``KEY:VALUE,...`` for dicts; anything else stays a string for the config to validate. ``-`` in option
    names reads as ``_``. Unknown names and unconvertible values raise a ConfigError naming ``what``.
    """
    what = what or cls.__name__
    types_ = field_types(cls)
    kwargs = {}
    for raw_name, value in options.items():
        name = raw_name.replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{what} has no option {raw_name!r}; its options are {', '.join(sorted(types_))}")
        if isinstance(value, str):
            try:
                value = _convert(types_[name], value)
            except ValueError as exc:
                raise ConfigError(f"{what} option {name}={value!r} {exc}") from None
        kwargs[name] = value
    return cls(**kwargs)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"int2@sinks=16@group_size=64"`` -> ``("int2", {"sinks": "16", "group_size": "64"})``."""
    name, *parts = spec.strip().split("@")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {part!r} in {spec!r} must be FIELD=VALUE (e.g. {name}@group_size=64)")
        options[key.strip()] = value.strip()
    return name.strip(), options
