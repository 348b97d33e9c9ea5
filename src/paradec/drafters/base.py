"""The drafter seam: `propose(state) -> Proposal`, then `update(state, verdict)`.

A drafter proposes future tokens; it never touches the target's KV cache. One drafter instance serves one
generation: `begin` after the prompt is prefilled, then per step `propose` -> (target forward + verify) ->
`update`. What a drafter may need beyond the token sequence (a draft model's runner, trained heads) comes from
`Resources`, which the engine provides and owns.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from paradec.config import SamplingParams
from paradec.errors import ParadecError
from paradec.runners.base import Runner
from paradec.types import Proposal, Verdict


@dataclass
class DecodeState:
    """The generation as the drafter sees it (owned and updated by the decode loop)."""

    tokens: list[int]  # prompt + emitted tokens; the last one is pending (not yet in the target's cache)
    prompt_len: int
    sampling: SamplingParams
    generator: torch.Generator | None
    device: torch.device
    vocab_size: int  # width of the target's logits
    max_length: int = 1 << 30  # the target's context: proposal nodes (+ aux inputs) must fit in `room`
    target_hidden: torch.Tensor | None = None  # [m, H] target hidden states of the inputs committed last step
    target_logits: torch.Tensor | None = None  # [n+1(+aux), V] target logits of every input of the last step

    @property
    def room(self) -> int:
        """How many proposal nodes plus auxiliary inputs fit in the target's context this step."""
        return self.max_length - len(self.tokens)


class Resources(Protocol):
    """What the engine lends to drafters."""

    target: Runner

    def draft_runner(self) -> Runner: ...

    def heads(self, kind: str) -> torch.nn.Module: ...


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


class Drafter(ABC):
    name: ClassVar[str]
    options_class: ClassVar[type] = NoOptions
    needs_hidden: ClassVar[bool] = False  # the decode loop asks the target runner for hidden states
    lossy: ClassVar[bool] = False

    def __init__(self, resources: Resources, options: Any) -> None:
        self.resources = resources
        self.options = options

    def begin(self, state: DecodeState) -> None:  # noqa: B027 - optional hook
        """Called once after the prompt (all but its last token) is in the target's cache."""

    @abstractmethod
    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        """Draft tokens for the next step. `max_tokens` is how many draft tokens the step can still use; deeper
        paths are allowed (a fixed-shape drafter replays one graph) and the decode loop drops the excess."""

    def update(self, state: DecodeState, verdict: Verdict) -> None:  # noqa: B027 - optional hook
        """Called after verification; `state.tokens` already holds the emitted tokens."""


def parse_options(cls: type[Drafter], options: Any) -> Any:
    """Build `cls.options_class` from None, a dict (values may be strings, as from the CLI) or an instance."""
    opt_cls = cls.options_class
    if options is None:
        return opt_cls()
    if isinstance(options, opt_cls):
        return options
    if not isinstance(options, dict):
        raise ParadecError(f"options for method {cls.name!r} must be a dict, got {type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(opt_cls)}
    hints = typing.get_type_hints(opt_cls)
    values = {}
    for key, raw in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ParadecError(f"unknown option {key!r} for method {cls.name!r} (options: {known})")
        values[key] = _convert(cls.name, key, raw, hints[key])
    return opt_cls(**values)


def _convert(method: str, key: str, raw: Any, hint: Any) -> Any:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = typing.get_args(hint)[0] if optional else hint
    if not isinstance(raw, str) or base is str:
        return raw
    try:
        if base is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if base in (int, float):
            return base(raw)
        if typing.get_origin(base) is tuple:
            return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError as exc:
        raise ParadecError(
            f"option {key}={raw!r} for method {method!r} is not a valid {getattr(base, '__name__', base)}"
        ) from exc
    return raw
