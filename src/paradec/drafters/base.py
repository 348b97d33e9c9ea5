"""The drafter seam: `propose(state) -> Proposal`, then `update(state, verdict)`; and the method that opens drafters.

A drafter proposes future tokens; it never touches the target's KV cache. One drafter instance serves one
generation: `begin` after the prompt is prefilled, then per step `propose` -> (target forward + verify) ->
`update`. What a drafter may need beyond the token sequence (a draft model's runner, trained heads) comes from
`Resources`, which the engine provides and owns.

A `Method` is the engine-lifetime side of a method: one per engine and method name, made on first use. It owns
what outlives a generation (layerskip's drafting views, EAGLE's workspace: bounded, in an `LRU` where keyed by a
request's options), the engine's defaults and settings of the method's options (`set_defaults`), the checks of a
request's options against this engine (`request_options`), and `open(options)`, which starts a generation's drafter.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from paradec.config import SamplingParams
from paradec.drafters.options import MAX_STEP_INPUTS, STATIC_LIMITS, Options, parse_values, specs
from paradec.errors import ParadecError, shown
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
    # [m, H] target hidden states of the inputs committed last step ([m, k * H]: k layers, `Drafter.needs_hidden`)
    target_hidden: torch.Tensor | None = None
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
class NoOptions(Options):
    """This method takes no options."""


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `size` values, the least recently used dropped first (its memory freed with its last reference)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of `key`, made by `make()` when absent (which may drop the least recently used)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> Iterator[V]:
        return iter(list(self._items.values()))


class Method:
    """A method on one engine (see the module docstring): defaults, checks, state kept between generations, and
    `open`. This base keeps no state; methods that do subclass it and name the subclass as `Drafter.method_class`."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        self.resources = resources
        self.drafter_class = drafter_class
        self.name = drafter_class.name
        self.defaults: Options = drafter_class.options_class()

    def forget(self) -> None:
        """Drop what the method learned from earlier generations' text (a benchmark calls it between its warm-up and
        its timed pass: a warm-up's outputs are the timed pass's answers). Measured costs are kept. This base
        learns nothing from text."""

    def mark(self) -> object:
        """What the method has learned from text so far, as a mark for `rewind` (this base: nothing)."""
        return None

    def rewind(self, mark: object) -> None:
        """Forget what the method learned from text since `mark` (a benchmark's repeats of one prompt: each repeat
        must not learn from the one before it, which wrote the very answer). This base learns nothing."""

    def limits(self) -> dict[str, int]:
        """This engine's bounds of the method's options, by `paradec.drafters.options.LIMITS` name."""
        target = self.resources.target
        step = min(getattr(target, "max_step_inputs", MAX_STEP_INPUTS), MAX_STEP_INPUTS)
        return {"proposal": step - 1, "vocab": target.vocab_size}

    def check(self, options: Options) -> None:
        """Raise `ParadecError` unless `options` suit this engine (subclasses add rules on engine settings)."""
        options.check(self.limits())

    def set_defaults(self, options: Mapping[str, Any] | Options | None) -> None:
        """This engine's defaults of the method's options, engine settings included: a dict over the class's
        defaults (text converted), an instance, or None (the class's defaults)."""
        parsed = parse_options(self.drafter_class, options, limits=self.limits())
        self.check(parsed)
        self.defaults = parsed

    def request_options(self, options: Mapping[str, Any] | Options | None) -> Options:
        """A request's options, checked against this engine: a dict's values over the engine's defaults, or an
        instance. A request may not change an engine setting: it may repeat the engine's value (or leave an
        instance's at the class default, which then takes the engine's)."""
        parsed = parse_options(self.drafter_class, options, base=self.defaults, limits=self.limits())
        engine = self.defaults.settings()
        resolved = {}
        for spec in specs(type(parsed)):
            if not spec.setting or getattr(parsed, spec.name) == engine[spec.name]:
                continue
            if isinstance(options, Options) and getattr(parsed, spec.name) == spec.default:
                resolved[spec.name] = engine[spec.name]
                continue
            raise ParadecError(
                f"option {spec.name}={shown(getattr(parsed, spec.name))} for method {self.name!r} is an engine "
                f"setting (it changes compiled state), not a request's: set it once per engine with "
                f"Engine.set_default_options({self.name!r}, {{{spec.name!r}: ...}}), or start the server with "
                f"`paradec serve --opt {spec.name}=...`",
                param="method_options",
            )
        if resolved:
            parsed = dataclasses.replace(parsed, **resolved)
        self.check(parsed)
        return parsed

    def open(self, options: Options) -> Drafter:
        """The drafter of one generation (`options` checked by `request_options`)."""
        return self.drafter_class(self.resources, options)

    def open_for(self, resources: Resources, options: Options) -> Drafter:
        """The drafter of one sequence of a batch (`paradec.batch`): lent `resources` of its own (its slot of the
        target, a slot of the batched draft runner) instead of the engine's."""
        return self.drafter_class(resources, options)


class Drafter(ABC):
    name: ClassVar[str]
    options_class: ClassVar[type[Options]] = NoOptions
    method_class: ClassVar[type[Method]] = Method  # the engine-lifetime side (a subclass where state is kept)
    # the hidden states the decode loop asks the target runner for (`Runner.forward(hidden=...)`): none (False), the
    # last one (True) or those decoder layers' outputs (a tuple; an instance may set it from its head)
    needs_hidden: bool | tuple[int, ...] = False
    lossy: ClassVar[bool] = False
    # runs inside a batch (`paradec.batch`): False for drafters whose method keeps engine-wide state that serves one
    # sequence at a time (layerskip's views of the target)
    batchable: ClassVar[bool] = True
    # proposes at all (False: vanilla, whose every proposal is empty)
    drafts: ClassVar[bool] = True
    # a batch step with speculation off may skip its `propose` (and so overlap that step with the next one,
    # `paradec.batch`): its propose with max_tokens = 0 proposes nothing and changes nothing `update` relies on
    idle_skips_propose: ClassVar[bool] = False

    def __init__(self, resources: Resources, options: Any) -> None:
        self.resources = resources
        self.options = options

    def begin(self, state: DecodeState) -> None:  # noqa: B027 - optional hook
        """Called once after the prompt (all but its last token) is in the target's cache."""

    @abstractmethod
    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        """Draft tokens for the next step. `max_tokens` is how many draft tokens the step can still use; deeper
        paths are allowed (a fixed-shape drafter replays one graph) and the decode loop drops the excess."""

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        """The proposals of several sequences' drafters of this class in one batch step (`paradec.batch`). By
        default one after another; a drafter that drafts on the host (`HostDrafter`) uploads them all in one copy;
        a drafter that runs a model overrides it to run the model once per level for all of them. Each proposal
        must be what `propose` would return for that sequence."""
        return [d.propose(s, m) for d, s, m in zip(drafters, states, max_tokens, strict=True)]

    def update(self, state: DecodeState, verdict: Verdict) -> None:  # noqa: B027 - optional hook
        """Called after verification; `state.tokens` already holds the emitted tokens."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called once the sequence ends inside a batch (finished, cancelled or failed): give back what it held."""


class HostDrafter(Drafter):
    """A drafter whose proposals are host lists (pld, suffix): `draft` returns (tokens, parents or None for a
    chain); `propose` uploads one, `propose_all` a whole batch step's in one copy (one per sequence would be a
    small blocking copy each)."""

    @abstractmethod
    def draft(self, state: DecodeState, max_tokens: int) -> tuple[list[int], tuple[int, ...] | None]:
        """The next step's draft tokens and their parents (node indices, -1 = the root; None: a chain)."""

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        return upload([self.draft(state, max_tokens)], state.device)[0]

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        drafts = [d.draft(s, m) for d, s, m in zip(drafters, states, max_tokens, strict=True)]
        return upload(drafts, states[0].device)


def upload(drafts: list[tuple[list[int], tuple[int, ...] | None]], device: torch.device | str) -> list[Proposal]:
    """Host drafts as proposals on `device`, all their tokens in one copy (each proposal a view of it)."""
    flat = [token for tokens, _ in drafts for token in tokens]
    if not flat:
        return [Proposal.empty(device) for _ in drafts]
    on_device = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
    proposals, start = [], 0
    for tokens, parents in drafts:
        if not tokens:
            proposals.append(Proposal.empty(device))
            continue
        proposals.append(Proposal(tokens=on_device[start : start + len(tokens)], parents=parents))
        start += len(tokens)
    return proposals


def parse_options(
    cls: type[Drafter], options: Any, base: Options | None = None, limits: Mapping[str, int] = STATIC_LIMITS
) -> Options:
    """`cls.options_class` from None (`base`, else the class's defaults), a dict of values over them (text, as from
    the CLI, is converted; each value checked under `limits`) or an instance. Checks the static bounds; a `Method`
    passes its engine's limits, and `Method.check` then checks the whole against them."""
    opt_cls = cls.options_class
    if options is None:
        return opt_cls() if base is None else base
    if isinstance(options, opt_cls):
        return options
    if not isinstance(options, Mapping):
        raise ParadecError(
            f"options for method {cls.name!r} must be a dict, got {type(options).__name__}", param="method_options"
        )
    values = parse_values(opt_cls, cls.name, options, limits)
    return dataclasses.replace(opt_cls() if base is None else base, **values)
