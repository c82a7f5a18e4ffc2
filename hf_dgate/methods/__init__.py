"""Penalty methods, one strategy class each, registered by name (`DGateConfig.method`).

Adding a method: a module with a `Method` subclass (see `base.py`) and one `register_method` line below (or a
call to `register_method` from your own code before `apply_dgate`).
"""

from __future__ import annotations

from .base import Method, OptimizerPolicy
from .dgate import DGate
from .direct import Direct
from .l0 import L0
from .slimming import Slimming

METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make `cls` available as `DGateConfig(method=cls.name)`; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"register_method needs a Method subclass with a `name`; got {cls!r}.")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method `name`; a ValueError that lists the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r} is not a registered method: use one of {tuple(METHODS)}.") from None


for _cls in (DGate, Direct, L0, Slimming):
    register_method(_cls)

__all__ = ["METHODS", "Method", "OptimizerPolicy", "get_method", "register_method"]
