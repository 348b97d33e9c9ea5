"""The request seam: one validated description of a generation, built by `Engine.request` and nothing else.

Everything a generation takes from its caller (the prompt or chat messages, the method and its options, sampling,
the length limit, stop strings, the number of samples `n`) is checked once, when the `Request` is built, against the
engine it is for (the model's context and vocabulary, the runner's largest step, the method's engine settings). The
CLI, the Python API, the bench and the server all build one, so they accept and refuse the same inputs with the same
messages; every refusal is a `ParadecError` whose `param` names the request parameter at fault.

This module holds the record and the checks that need no engine; `Engine.request` adds the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from paradec.config import SEED_RANGE, SamplingParams
from paradec.drafters import Drafter, Options
from paradec.errors import ParadecError, shown

MAX_STOPS = 4  # stop strings per request (OpenAI's limit): each is searched for in the text after every step
MAX_STOP_CHARS = 256  # characters per stop string
MAX_N = 16  # samples (choices) per request


@dataclass(frozen=True)
class Request:
    """A generation's input, checked (`Engine.request` builds it; `Engine.stream` / `generate` run it)."""

    prompt_ids: tuple[int, ...]  # the prompt's token ids (a chat rendered by the model's template)
    method: str  # the method's registered name
    drafter: type[Drafter]  # its drafter class
    options: Options  # the method's options: the request's over the engine's defaults, bounds checked
    sampling: SamplingParams
    max_new_tokens: int
    stops: tuple[str, ...]  # stop strings (the text is cut before the first one found)
    n: int = 1  # samples (OpenAI's choices) of the prompt, decoded together; sample i is seeded seed + i

    def samples(self) -> tuple[Request, ...]:
        """The n samples as requests of one sample each: sample i has seed `seed + i` when a seed is given (so the
        choices differ and are reproducible), none otherwise. A request of one sample is its own only sample."""
        if self.n == 1:
            return (self,)
        seed = self.sampling.seed
        return tuple(
            dataclasses.replace(
                self, n=1, sampling=self.sampling if seed is None else dataclasses.replace(self.sampling, seed=seed + i)
            )
            for i in range(self.n)
        )


def sampling_params(sampling: SamplingParams | dict | None) -> SamplingParams:
    """SamplingParams from None (greedy), an instance, or a dict of its fields."""
    if sampling is None:
        return SamplingParams()
    if isinstance(sampling, SamplingParams):
        return sampling
    if isinstance(sampling, dict):
        fields = SamplingParams.__dataclass_fields__
        unknown = [key for key in sampling if key not in fields]
        if unknown:
            raise ParadecError(
                f"unknown sampling parameter {shown(unknown[0])} (parameters: {', '.join(fields)})", param="sampling"
            )
        return SamplingParams(**sampling)
    raise ParadecError(f"sampling must be SamplingParams or a dict, got {type(sampling).__name__}", param="sampling")


def check_max_new_tokens(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParadecError(f"max_new_tokens must be an integer >= 1, got {shown(value)}", param="max_new_tokens")
    return value


def check_n(value: Any, sampling: SamplingParams | None = None) -> int:
    """The number of samples: an integer in [1, MAX_N]; with a seed, the samples' seeds seed + i must stay in range."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_N:
        raise ParadecError(f"n must be an integer in [1, {MAX_N}], got {shown(value)}", param="n")
    if sampling is not None and sampling.seed is not None and sampling.seed + value - 1 >= SEED_RANGE[1]:
        raise ParadecError(
            f"seed {sampling.seed} with n={value}: sample i is seeded seed + i, which must stay below 2**64",
            param="seed",
        )
    return value


def stop_strings(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The stop strings of a request: None, one string or a list of at most MAX_STOPS non-empty strings of at most
    MAX_STOP_CHARS characters each."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)):
        stops = tuple(stop)
    else:
        raise ParadecError(f"stop must be a string or a list of strings, got {type(stop).__name__}", param="stop")
    if len(stops) > MAX_STOPS:
        raise ParadecError(f"at most {MAX_STOPS} stop strings are allowed, got {len(stops)}", param="stop")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ParadecError(f"stop strings must be non-empty strings, got {shown(s)}", param="stop")
        if len(s) > MAX_STOP_CHARS:
            raise ParadecError(
                f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(s)}: {shown(s)}", param="stop"
            )
    return stops
