"""Drafter registry: methods are drafter classes registered by name."""

from __future__ import annotations

import importlib
import pkgutil

from paradec.drafters.base import DecodeState, Drafter, NoOptions, Resources, parse_options
from paradec.errors import ParadecError

REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_drafter(name: str) -> type[Drafter]:
    if name not in REGISTRY:
        raise ParadecError(f"unknown method {name!r} (choose from {', '.join(methods())})")
    return REGISTRY[name]


def methods() -> list[str]:
    """Registered method names, `vanilla` first."""
    return sorted(REGISTRY, key=lambda name: (name != "vanilla", name))


def _import_all() -> None:
    """Every module of this package defines and registers drafters: importing it is registering them."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = [
    "REGISTRY",
    "DecodeState",
    "Drafter",
    "NoOptions",
    "Resources",
    "get_drafter",
    "methods",
    "parse_options",
    "register",
]
