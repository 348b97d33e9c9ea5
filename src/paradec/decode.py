"""The decoding loop: propose -> score -> verify -> commit -> update, with streaming and stop conditions.

    prefill(prompt[:-1])                      the last prompt token is the first *pending* token
    loop:
        proposal = drafter.propose(state)     draft tokens (chain or tree), maybe with q
        logits   = target.forward([pending, *proposal])   one step: one target forward
        verdict  = verify(proposal, logits)   accepted path + bonus/recovered token; the step's one host sync
        target.commit([pending, *accepted])   the bonus/recovered token becomes the next pending token
        drafter.update(state, verdict)

Stops: EOS (also in the middle of an accepted block: the rest is dropped), stop strings (the text is cut before
the stop string; the token that completed it is the last token), and max_new_tokens (a step that emits more than
the tokens still allowed, which a drafter may cause by proposing past `max_tokens`, is cut there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from paradec.config import SamplingParams
from paradec.detok import IncrementalDetokenizer, StopStrings
from paradec.drafters.base import DecodeState, Drafter
from paradec.metrics import GenerationStats
from paradec.runners.base import Runner, prefill
from paradec.sampling import make_generator
from paradec.types import Verdict
from paradec.verify import verify


@dataclass
class Result:
    text: str  # generated text (special tokens skipped, cut before a stop string)
    token_ids: list[int]  # new tokens only (an EOS or the token completing a stop string included)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens)
    stats: GenerationStats


class Generation:
    """One generation in progress: iterate for text pieces; `.result` is set once iteration ends."""

    def __init__(
        self,
        target: Runner,
        drafter: Drafter,
        tokenizer,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        eos_token_ids: set[int],
        stop: list[str],
        method: str,
        lock: threading.Lock | None = None,
        verifier: Callable[..., Verdict] = verify,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stops = StopStrings(stop)
        self.stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids))
        self.result: Result | None = None
        self._lock = lock  # held while running: the target runner serves one sequence at a time
        self.verifier = verifier  # paradec.verify.verify; replaceable only so tests can prove they catch a wrong one

    def __iter__(self) -> Iterator[str]:
        if self._lock is None:
            yield from self._run()
            return
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the engine is already running a generation; finish or close the other one first")
        try:
            yield from self._run()
        finally:
            self._lock.release()

    def run(self) -> Result:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    @torch.inference_mode()
    def _run(self) -> Iterator[str]:
        started = time.perf_counter()
        target, drafter, stats = self.target, self.drafter, self.stats
        device = target.device
        state = DecodeState(
            tokens=list(self.prompt_ids),
            prompt_len=len(self.prompt_ids),
            sampling=self.sampling,
            generator=make_generator(self.sampling, device),
            device=device,
            vocab_size=target.vocab_size,
            max_length=target.max_length,
        )
        target.reset()
        if len(state.tokens) > 1:
            out = prefill(target, torch.tensor(state.tokens[:-1], device=device), hidden=drafter.needs_hidden)
            state.target_hidden = out.hidden
        drafter.begin(state)
        stats.prefill_seconds = time.perf_counter() - started

        detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids) if self.tokenizer is not None else None
        new_ids: list[int] = []
        streamed = 0  # characters of detok.text already yielded
        finish = ""
        cut = -1  # where a stop string starts in the text
        pending = torch.tensor([state.tokens[-1]], device=device)  # [1] the last token, not yet in the target cache
        while not finish:
            remaining = self.max_new_tokens - len(new_ids)
            proposal = drafter.propose(state, max_tokens=remaining - 1)
            tree = proposal.tree(device)
            pieces = [pending, proposal.tokens]
            layout = tree
            if proposal.aux is not None:
                pieces.append(proposal.aux.tokens)
                layout = tree.with_aux(proposal.aux.depth, proposal.aux.mask)
            inputs = torch.cat(pieces)  # [1 + n (+ m)] pending token, proposal nodes, auxiliary inputs
            if inputs.shape[0] - 1 > state.room:
                raise RuntimeError(
                    f"drafter {drafter.name!r} proposed {inputs.shape[0] - 1} inputs, room for {state.room}"
                )
            out = target.forward(inputs, layout, logits="all", hidden=drafter.needs_hidden)
            state.target_logits = out.logits
            verdict = self.verifier(proposal, out.logits[: proposal.size + 1], self.sampling, state.generator, tree)
            keep = [0] + [i + 1 for i in verdict.path]
            target.commit(keep)
            if out.hidden is not None:  # (indexing with a list would upload it with a blocking copy)
                rows = torch.tensor(keep).to(device, non_blocking=True)
                state.target_hidden = out.hidden.index_select(0, rows)
            stats.record_step(verdict.depth, proposal.size, verdict.accepted)
            pending = verdict.final_device
            if pending is None:  # a verifier that returned host values only
                pending = torch.tensor(verdict.tokens[-1:], device=device)

            for token in verdict.tokens:
                new_ids.append(token)
                state.tokens.append(token)
                if detok is not None:
                    before = len(detok.text)
                    if detok.push(token) and self.stops.stops:
                        cut = self.stops.find(detok.text, before)
                if token in self.eos_token_ids or cut >= 0:
                    finish = "stop"
                elif len(new_ids) >= self.max_new_tokens:
                    finish = "length"
                if finish:
                    break
            if not stats.first_token_seconds:
                stats.first_token_seconds = time.perf_counter() - started
            if not finish:
                drafter.update(state, verdict)
            if detok is not None:
                if finish:
                    detok.flush()
                text = detok.text[:cut] if cut >= 0 else detok.text
                visible = len(text) if finish else self.stops.safe_length(text)
                if visible > streamed:
                    yield text[streamed:visible]
                    streamed = visible

        stats.new_tokens = len(new_ids)
        stats.finish_reason = finish
        stats.wall_seconds = time.perf_counter() - started
        text = "" if detok is None else (detok.text[:cut] if cut >= 0 else detok.text)
        self.result = Result(text=text, token_ids=new_ids, finish_reason=finish, stats=stats)
