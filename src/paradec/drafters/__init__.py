"""Drafter registry: methods are drafter classes registered by name (each names its options class and its
engine-lifetime `Method` class)."""

from __future__ import annotations

import importlib
import pkgutil

from paradec.drafters.base import LRU, DecodeState, Drafter, Method, NoOptions, Resources, parse_options
from paradec.drafters.options import Options, bound, engine_setting
from paradec.errors import ParadecError, shown

REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_drafter(name: str) -> type[Drafter]:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ParadecError(f"unknown method {shown(name)} (choose from {', '.join(methods())})", param="method")
    return REGISTRY[name]


def methods() -> list[str]:
    """Registered method names, `vanilla` first."""
    return sorted(REGISTRY, key=lambda name: (name != "vanilla", name))


def _import_all() -> None:
    """Every module of this package but the seam's own defines and registers drafters: importing it registers them."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("base", "options"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = [
    "LRU",
    "REGISTRY",
    "DecodeState",
    "Drafter",
    "Method",
    "NoOptions",
    "Options",
    "Resources",
    "bound",
    "engine_setting",
    "get_drafter",
    "methods",
    "parse_options",
    "register",
]
