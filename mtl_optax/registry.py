"""A registry of every method by its lowercase name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import optax

__all__ = ["available", "get", "register"]

_REGISTRY: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {}
_ALIASES: set[str] = set()

F = TypeVar("F", bound=Callable[..., optax.GradientTransformationExtraArgs])


def register(*names: str) -> Callable[[F], F]:
    """Class decorator-style registration of a method factory under ``names``."""

    def deco(factory: F) -> F:
        for i, name in enumerate(names):
            if i:  # the first name is the method's; the others are aliases
                _ALIASES.add(name)
            if name != name.lower():
                raise ValueError(f"method names are lowercase; got {name!r}")
            if name in _REGISTRY:
                raise ValueError(f"a method named {name!r} is already registered")
            _REGISTRY[name] = factory
        return factory

    return deco


def available(*, aliases: bool = True) -> list[str]:
    """The lowercase names of every method, sorted.

    Args:
      aliases: whether to include alias names (``config`` for
        ``conflict_free``); without them every method is listed once.

    Example:
      >>> import mtl_optax
      >>> "mean" in mtl_optax.available()
      True
    """
    return sorted(n for n in _REGISTRY if aliases or n not in _ALIASES)


def get(name: str, **hparams: Any) -> optax.GradientTransformationExtraArgs:
    """The method ``name`` built with ``hparams``: ``get("rlw", key=0)``.

    Raises:
      KeyError: ``name`` is not a registered method (the message lists them).
    """
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"no method named {name!r}; available: {', '.join(available())}") from None
    return factory(**hparams)
