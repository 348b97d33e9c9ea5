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
from paradec.step import SeqInputs, Step
from paradec.types import Proposal, Verdict
from paradec.verify import Deferred, verify


@dataclass
class Result:
    text: str  # generated text (special tokens skipped, cut before a stop string)
    token_ids: list[int]  # new tokens only (an EOS or the token completing a stop string included)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens)
    stats: GenerationStats


class Decoding:
    """One sequence being decoded: its state, drafter, stop conditions, detokenizer and stats. The step loops own
    the target and the forward; per sequence and step they call `inputs` (propose), then `verdict` (verify, on the
    sequence's rows of the forward's logits), then `advance` (emit, stop, update the drafter). `Generation` steps
    one of them; `paradec.batch.BatchDecoder` steps many in one forward."""

    def __init__(
        self,
        drafter: Drafter,
        tokenizer,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        eos_token_ids: set[int],
        stop: list[str],
        method: str,
        *,
        device: torch.device,
        vocab_size: int,
        max_length: int,
        verifier: Callable[..., Verdict | Deferred] = verify,
    ) -> None:
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stops = StopStrings(stop)
        self.stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids))
        self.verifier = verifier
        self.state = DecodeState(
            tokens=list(prompt_ids),
            prompt_len=len(prompt_ids),
            sampling=sampling,
            generator=make_generator(sampling, device),
            device=device,
            vocab_size=vocab_size,
            max_length=max_length,
        )
        self.new_ids: list[int] = []
        self.finish = ""  # "stop" or "length" once finished
        self.started = 0.0
        self._fed = 0  # prompt tokens prefilled so far (`start` in chunks)
        self._hidden: list[torch.Tensor] = []  # the prefill's hidden states, chunk by chunk
        self.pending: torch.Tensor | None = None  # [1] the last token, not yet in the target cache
        self.ahead = 0  # steps launched whose verdicts were not advanced yet (`launched`)
        self._detok: IncrementalDetokenizer | None = None
        self._streamed = 0  # characters of the text already handed out
        self._cut = -1  # where a stop string starts in the text

    def start(self, target: Runner, chunk: int | None = None) -> bool:
        """Prefill the prompt but its last token on `target` (the sequence's own runner) and begin the drafter; True
        once done. With `chunk`, each call feeds at most that many prompt tokens: call it until it says True. (A
        batch prefills its joining sequences together: `to_prefill`, one forward of theirs, then `prefilled`.)"""
        if not self.started:
            target.reset()
        ids = self.to_prefill(chunk)
        hidden = None
        if ids:
            hidden = prefill(
                target, torch.tensor(ids, device=self.state.device), hidden=self.drafter.needs_hidden
            ).hidden
        return self.prefilled(len(ids), hidden)

    def to_prefill(self, chunk: int | None = None) -> list[int]:
        """The prompt tokens the next prefill forward feeds: at most `chunk` of those not fed yet, the prompt's last
        token excepted (it is the first pending one); [] when only that one is left."""
        if not self.started:
            self.started = time.perf_counter()
        todo = len(self.state.tokens) - 1 - self._fed
        count = todo if chunk is None else min(chunk, todo)
        return self.state.tokens[self._fed : self._fed + count] if count > 0 else []

    def prefilled(self, count: int, hidden: torch.Tensor | None) -> bool:
        """The first `count` tokens of `to_prefill` were fed to the sequence's runner and committed there, with
        their hidden states (`hidden`, when the drafter wants them). True once the whole prompt is in: the drafter
        has then begun and the prompt's last token is pending."""
        state, drafter = self.state, self.drafter
        if hidden is not None:
            self._hidden.append(hidden)
        self._fed += count
        if self._fed < len(state.tokens) - 1:
            return False
        if self._hidden:
            state.target_hidden = self._hidden[0] if len(self._hidden) == 1 else torch.cat(self._hidden)
        self._hidden = []
        drafter.begin(state)
        self.stats.prefill_seconds = time.perf_counter() - self.started
        if self.tokenizer is not None:
            self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)
        self.pending = torch.tensor([state.tokens[-1]], device=state.device)
        return True

    def launched(self, pending: torch.Tensor) -> None:
        """A step of this sequence was launched whose next pending token is already on the device (`pending`, [1]:
        a step without draft tokens), so the next step may be launched before this one's verdict is advanced (a batch
        overlapping steps, `paradec.batch`). `advance` then keeps this pending token until it has advanced every
        launched step."""
        self.pending = pending
        self.ahead += 1

    @property
    def remaining(self) -> int:
        """Tokens it may still emit under max_new_tokens, one per launched step not yet advanced counted as emitted."""
        return self.max_new_tokens - len(self.new_ids) - self.ahead

    def max_tokens(self, cap: int | None = None) -> int:
        """Draft tokens this step can use: those still allowed after the pending token, at most `cap` (a batch's
        speculation policy may shrink or skip a proposal; the drafter's update then sees what was proposed)."""
        remaining = self.max_new_tokens - len(self.new_ids) - 1
        return remaining if cap is None else min(remaining, cap)

    def inputs(self, slot: int = 0, max_tokens: int | None = None, proposal: Proposal | None = None) -> SeqInputs:
        """This step's inputs: the pending token and the drafter's proposal (`proposal` when the caller had the
        drafters of a batch propose together, `Drafter.propose_all`)."""
        if proposal is None:
            proposal = self.drafter.propose(self.state, max_tokens=self.max_tokens(max_tokens))
        inputs = SeqInputs.of(slot, self.pending, proposal, self.state.device)
        if inputs.size - 1 > self.state.room:
            raise RuntimeError(
                f"drafter {self.drafter.name!r} proposed {inputs.size - 1} inputs, room for {self.state.room}"
            )
        return inputs

    def verdict(self, step: Step, b: int, rows: torch.Tensor) -> Verdict | Deferred:
        """Verify this sequence's proposal on `rows`, its rows of the step's logits (aux inputs included: all the
        logits of a one-sequence step, else `Step.split`'s b-th), which `state.target_logits` becomes."""
        self.state.target_logits = rows
        proposal = step.proposal(b)
        return self.verifier(proposal, rows[: proposal.size + 1], self.sampling, self.state.generator, step.tree(b))

    def advance(
        self, step: Step, b: int, verdict: Verdict, hidden: torch.Tensor | None, *, kept: torch.Tensor | None = None
    ) -> str:
        """Emit the verdict's tokens (up to a stop), update the drafter, and return the text now safe to show.
        `kept`: the hidden states of the committed inputs, already picked from `hidden` (a batch picks them for
        every sequence at once)."""
        state, stats = self.state, self.stats
        if kept is not None:
            state.target_hidden = kept
        elif hidden is not None:  # (indexing with a list would upload it with a blocking copy)
            rows = torch.tensor(step.kept_rows(b, verdict)).to(state.device, non_blocking=True)
            state.target_hidden = hidden.index_select(0, rows)
        stats.record_step(verdict.depth, step.proposal(b).size, verdict.accepted)
        if self.ahead:
            self.ahead -= 1
        if not self.ahead:  # (else a later launched step set the pending token: `launched`)
            pending = verdict.final_device
            if pending is None:  # a verifier that returned host values only
                pending = torch.tensor(verdict.tokens[-1:], device=state.device)
            self.pending = pending
        detok = self._detok
        for token in verdict.tokens:
            self.new_ids.append(token)
            state.tokens.append(token)
            if detok is not None:
                before = len(detok.text)
                if detok.push(token) and self.stops.stops:
                    self._cut = self.stops.find(detok.text, before)
            if token in self.eos_token_ids or self._cut >= 0:
                self.finish = "stop"
            elif len(self.new_ids) >= self.max_new_tokens:
                self.finish = "length"
            if self.finish:
                break
        if not stats.first_token_seconds:
            stats.first_token_seconds = time.perf_counter() - self.started
        if not self.finish:
            self.drafter.update(state, verdict)
        if detok is None:
            return ""
        if self.finish:
            detok.flush()
        text = self.text
        visible = len(text) if self.finish else self.stops.safe_length(text)
        piece = text[self._streamed : visible] if visible > self._streamed else ""
        self._streamed = max(self._streamed, visible)
        return piece

    @property
    def text(self) -> str:
        if self._detok is None:
            return ""
        return self._detok.text[: self._cut] if self._cut >= 0 else self._detok.text

    def result(self) -> Result:
        stats = self.stats
        stats.new_tokens = len(self.new_ids)
        stats.finish_reason = self.finish
        stats.wall_seconds = time.perf_counter() - self.started
        return Result(text=self.text, token_ids=self.new_ids, finish_reason=self.finish, stats=stats)


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
        self.decoding = Decoding(
            drafter,
            tokenizer,
            prompt_ids,
            sampling,
            max_new_tokens,
            eos_token_ids,
            stop,
            method,
            device=target.device,
            vocab_size=target.vocab_size,
            max_length=target.max_length,
            verifier=verifier,  # paradec.verify.verify; replaceable only so tests can prove they catch a wrong one
        )
        self.stats = self.decoding.stats
        self.result: Result | None = None
        self._lock = lock  # held while running: the target runner serves one sequence at a time

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
        target, seq = self.target, self.decoding
        try:
            seq.start(target)
            while not seq.finish:
                step = Step([seq.inputs()])
                out = target.forward(step.tokens, step.tree(0), logits="all", hidden=self.drafter.needs_hidden)
                verdict = seq.verdict(step, 0, out.logits)
                if isinstance(verdict, Deferred):
                    verdict = verdict.resolve()  # the step's one sync
                target.commit(Step.keep(verdict))
                piece = seq.advance(step, 0, verdict, out.hidden)
                if piece:
                    yield piece
            self.result = seq.result()
        finally:
            self.drafter.close()  # finished, stopped early or failed: the drafter gives back what it held
