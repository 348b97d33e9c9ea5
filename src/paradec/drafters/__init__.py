"""Drafter registry: methods are drafter classes registered by name."""

from __future__ import annotations

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
    return list(REGISTRY)


# Importing the modules registers their drafters, in the order `methods()` lists them.
from paradec.drafters import draft_model, pld, vanilla  # noqa: E402, F401

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
