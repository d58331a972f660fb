"""Type-keyed dispatch: ``HANDLERS[type(config)]`` applies a config to a model.

Each method file registers its own handler with ``@register(ConfigType)``; :func:`compactlm.compress`
looks it up. No string dispatch, no sessions.
"""

from collections.abc import Callable
from typing import Any

HANDLERS: dict[type, Callable[..., Any]] = {}


def register(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if config_type in HANDLERS:
            raise RuntimeError(f"a handler for {config_type.__name__} is already registered")
        HANDLERS[config_type] = fn
        return fn

    return decorator


def handler_for(config: object) -> Callable[..., Any]:
    try:
        return HANDLERS[type(config)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in HANDLERS)) or "none"
        raise TypeError(f"no handler for {type(config).__name__}; registered configs: {known}") from None
