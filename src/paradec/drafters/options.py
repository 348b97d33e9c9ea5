"""Method options, typed once: one `Options` base, every field's range in its metadata, one checker.

A method's options are a frozen dataclass deriving from `Options`. A field's type hint is its type (int, float,
bool or a tuple of ints, each optionally None); its metadata holds its range:

    topk: int = field(default=8, metadata=bound(1, 64, limit="vocab"))  # in [1, min(64, vocabulary size)]

`bound(low, high, limit=...)`: the value (each element, for a tuple) lies in [low, high]. `limit` names a bound
only the engine knows (LIMITS: the runner's largest step, the vocabulary, the target's layers, a saved tree); it
lowers `high` once the engine is known (`paradec.drafters.base.Method.limits`). `engine_setting()` marks an option
that changes an engine's compiled state: the engine sets it once, a request may not change it.

Types are strict: a bool is not an integer, a float is not an integer (an integer is a fine float), a list is a fine
tuple. Text (from the CLI's `--opt NAME=VALUE`) is converted by `parse_options` first. The same rules run twice:
when options are built (`__post_init__`, static bounds: a direct `PLDOptions(max_ngram=10**9)` fails too) and when
a request is built (`check(limits)`, the engine's bounds too), so the CLI, the Python API, the bench and the server
agree. Every error names the option, its value and the bound, with `param="method_options"`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from paradec.errors import ParadecError, shown

MAX_STEP_INPUTS = 128  # inputs one target forward scores on the fast path: the native runner's largest static bucket
# (Q_BUCKETS[-1]) and the HF runner's cap; a runner may declare fewer as `max_step_inputs`

LIMITS = {  # what an engine limit stands for, in errors and in `paradec methods`
    "proposal": "the runner's largest step less the pending token",
    "vocab": "the vocabulary size",
    "layer": "the target's last layer",
    "tree": "the nodes of the saved tree",
}
STATIC_LIMITS = {"proposal": MAX_STEP_INPUTS - 1}  # the engine limits known before an engine is


@dataclass(frozen=True)
class Bound:
    """[low, high] of a number, or of each element of a tuple; `limit` may lower `high` (see LIMITS)."""

    low: float
    high: float | None = None
    limit: str | None = None

    def high_for(self, limits: Mapping[str, int]) -> float | None:
        highs = [h for h in (self.high, limits.get(self.limit) if self.limit else None) if h is not None]
        return min(highs) if highs else None

    def describe(self, limits: Mapping[str, int]) -> str:
        """The range in words: "in [1, 64]", ">= 0", or "in [1, the nodes of the saved tree]" (limit unknown)."""
        if self.limit is not None and self.limit not in limits:
            cap = LIMITS[self.limit] if self.high is None else f"min({self.high}, {LIMITS[self.limit]})"
            return f"in [{self.low}, {cap}]"
        high = self.high_for(limits)
        return f">= {self.low}" if high is None else f"in [{self.low}, {high}]"

    def set_by_limit(self, limits: Mapping[str, int]) -> bool:
        """Whether the engine's limit, not the static high, is the bound under `limits`."""
        cap = limits.get(self.limit) if self.limit else None
        return cap is not None and (self.high is None or cap < self.high)


def bound(low: float, high: float | None = None, *, limit: str | None = None) -> dict[str, Bound]:
    """Field metadata: the value lies in [low, high], `high` lowered by the engine's `limit` (a LIMITS name)."""
    if limit is not None and limit not in LIMITS:
        raise ValueError(f"unknown limit {limit!r} (limits: {', '.join(LIMITS)})")
    return {"bound": Bound(low, high, limit)}


def engine_setting() -> dict[str, bool]:
    """Field metadata: an engine's setting (it changes compiled state), never a request's."""
    return {"engine_setting": True}


@dataclass(frozen=True)
class Spec:
    """One option's rules, read from its field: type, range, whether None is allowed, whether it is a setting."""

    name: str
    kind: type  # int, float or bool
    is_tuple: bool  # a tuple of `kind` (from a list or "1,2,3")
    optional: bool  # None allowed
    bound: Bound | None
    setting: bool
    default: Any

    def normalise(self, value: Any) -> Any:
        """The value in the field's own type where that loses nothing: a list as a tuple, an integer as a float."""
        if self.is_tuple and isinstance(value, list):
            return tuple(value)
        if self.kind is float and _is_int(value):
            return float(value)
        return value

    def from_text(self, method: str, text: str, limits: Mapping[str, int]) -> Any:
        """A CLI value (`--opt NAME=VALUE`) in the field's type; the range is checked later."""
        try:
            if self.optional and text.lower() in ("none", "null"):
                return None
            if self.is_tuple:
                return tuple(int(x) for x in text.split(",") if x.strip())
            if self.kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError(text)
                return text.lower() in _TRUE
            return self.kind(text)
        except ValueError:
            raise ParadecError(
                f"option {self.name}={shown(text)} for method {method!r} must be {self.expected(limits)}",
                param="method_options",
            ) from None

    def check(self, method: str, value: Any, limits: Mapping[str, int]) -> None:
        if value is None and self.optional:
            return
        if self.is_tuple:
            ok = isinstance(value, tuple) and len(value) > 0 and all(self._typed(v) for v in value)
            values = value if ok else ()
        else:
            ok, values = self._typed(value), (value,)
        if ok and self.bound is not None:
            high = self.bound.high_for(limits)
            ok = all(self.bound.low <= v and (high is None or v <= high) for v in values)
        if not ok:
            why = ""
            if self.bound is not None and self.bound.set_by_limit(limits):
                why = f" ({self.bound.high_for(limits)}: {LIMITS[self.bound.limit]})"
            raise ParadecError(
                f"option {self.name}={shown(value)} for method {method!r} must be {self.expected(limits)}{why}",
                param="method_options",
            )

    def expected(self, limits: Mapping[str, int]) -> str:
        """What the value must be, in words ("an integer in [1, 64]")."""
        if self.kind is bool:
            text = "true or false"
        else:
            text = "a non-empty list of integers" if self.is_tuple else "an integer" if self.kind is int else "a number"
            if self.bound is not None:
                text += f" {self.bound.describe(limits)}"
        return f"{text} or none" if self.optional else text

    def _typed(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is int:
            return _is_int(value)
        return isinstance(value, float) and math.isfinite(value)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def specs(cls: type[Options]) -> tuple[Spec, ...]:
    """The rules of every field of an options class (read once per class)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        is_tuple = typing.get_origin(base) is tuple
        kind = typing.get_args(base)[0] if is_tuple else base
        if kind not in (int, float, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: options are int, float, bool or tuples of them, not {hint}")
        out.append(
            Spec(
                name=f.name,
                kind=kind,
                is_tuple=is_tuple,
                optional=optional,
                bound=f.metadata.get("bound"),
                setting=bool(f.metadata.get("engine_setting")),
                default=f.default,
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class Options:
    """Base of every method's options (a frozen dataclass of typed, bounded fields; see the module docstring).
    `method` names the method in errors; `check_together` adds the rules that tie fields to each other."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for spec in specs(type(self)):
            object.__setattr__(self, spec.name, spec.normalise(getattr(self, spec.name)))
        self.check(STATIC_LIMITS)

    def check(self, limits: Mapping[str, int]) -> None:
        """Raise `ParadecError` unless every field is of its type and inside its range under `limits`."""
        for spec in specs(type(self)):
            spec.check(self.method, getattr(self, spec.name), limits)
        self.check_together(limits)

    def check_together(self, limits: Mapping[str, int]) -> None:
        """Rules between fields (e.g. min_ngram <= max_ngram); raise `ParadecError` with param="method_options"."""

    def settings(self) -> dict[str, Any]:
        """The engine settings among these options, by name."""
        return {spec.name: getattr(self, spec.name) for spec in specs(type(self)) if spec.setting}


def parse_values(
    cls: type[Options], method: str, raw: Mapping[str, Any], limits: Mapping[str, int] = STATIC_LIMITS
) -> dict[str, Any]:
    """`raw` option values (text from the CLI is converted) by field name, each checked under `limits` (so an error
    names the engine's bound where it is known); an unknown name is an error."""
    by_name = {spec.name: spec for spec in specs(cls)}
    values = {}
    for key, value in raw.items():
        spec = by_name.get(key)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise ParadecError(
                f"unknown option {shown(key)} for method {method!r} (options: {known})", param="method_options"
            )
        value = spec.normalise(spec.from_text(method, value, limits) if isinstance(value, str) else value)
        spec.check(method, value, limits)
        values[key] = value
    return values


def describe(cls: type[Options]) -> list[str]:
    """Each option as `name=default in [low, high]`, for `paradec methods`."""
    out = []
    for spec in specs(cls):
        text = f"{spec.name}={spec.default!r}"
        if spec.bound is not None:
            text += f" {spec.bound.describe(STATIC_LIMITS)}"
        if spec.setting:
            text += " (engine setting)"
        out.append(text)
    return out
