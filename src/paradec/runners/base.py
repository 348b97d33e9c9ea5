"""The runner seam: the only code that owns model weights and a KV cache.

A runner holds one model and its cache for one sequence. Its cache holds the *committed* prefix
(`runner.length` tokens). `forward` scores new inputs placed after that prefix: a chain (positions
length, length+1, ...) or a token tree (positions length + depth, attention by `TreeBuffers.mask`). Their KV
entries are provisional until `commit` keeps the accepted ones, compacted into contiguous slots right after
the prefix, and drops the rest. `rollback` shortens the committed prefix (a length reset).

    prefix (committed)        provisional (last forward)
    [t0 t1 ... t(L-1)] | [x0 x1 x2 x3 ...]
    commit([0, 2]) ->  [t0 ... t(L-1) x0 x2]    length = L + 2

The state machine, the same for every runner (each keeps one `paradec.runners.ledger.Ledger` per sequence, which
owns it): idle --forward--> pending --commit--> idle.
- `forward` while a forward is pending: RuntimeError; past `max_length` (committed + new inputs): ParadecError.
- `commit` with no forward pending: RuntimeError. `keep` is an int (a prefix of the n inputs, in [0, n]) or a list
  of input indices forming a root path of the forward (a chain's prefix; for a tree built on the device, whose shape
  the host does not know: starting at 0 and strictly ascending within [0, n)); anything else: ValueError naming
  the keep and n, and the forward stays pending.
- `rollback(length)` outside [0, runner.length]: ValueError naming both.
- `rollback` and `reset` while a forward is pending cancel it: its provisional entries are dropped (they sit after
  the committed prefix, past any length it can be rolled back to). The next forward then starts from the new length.
  (`BatchedNativeRunner`: a forward over several of its slots is one unit, settled by its commit or `cancel()`.)

Drafters never touch the target's runner; a drafter that runs a model (a draft LM) owns a runner of its own.

Hidden states (`forward(..., hidden=...)`): `True` returns the last hidden state after the final norm (what the LM
head reads), [n, H]; a tuple of layer indices `(i, j, ...)` returns the outputs of those decoder layers (the residual
stream after layer i, before any final norm; `transformers`' `hidden_states[i + 1]`), concatenated in that order,
[n, len(layers) * H]. A runner lends the layers [0, num_layers - 1): the last layer's output before the norm is not
one `transformers` hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

from paradec.errors import ParadecError
from paradec.tree import TreeBuffers

if TYPE_CHECKING:
    from paradec.config import SamplingParams

LogitsWanted = Literal["all", "last", "none"]
HiddenWanted = bool | tuple[int, ...]  # False, True (after the final norm) or decoder layers (module doc)


@dataclass
class RunnerOutput:
    logits: torch.Tensor | None  # [n, V] float32 ("all"), [1, V] ("last") or None ("none")
    # [n, H] last hidden state (after the final norm) if asked for; [n, len(layers) * H] layer outputs for a tuple
    hidden: torch.Tensor | None = None


@runtime_checkable
class Runner(Protocol):
    """What the decode loop and drafters need from a model (batch size 1)."""

    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # logits width
    max_length: int  # context length (max_position_embeddings)
    hidden_size: int
    num_layers: int  # decoder layers; `forward(hidden=(i, ...))` lends the outputs of layers [0, num_layers - 1)

    @property
    def length(self) -> int:
        """Committed tokens in the cache."""
        ...

    def reset(self) -> None:
        """Forget the sequence (empty cache); cancels a pending forward."""
        ...

    def forward(
        self,
        token_ids: torch.Tensor,  # [n] int64
        tree: TreeBuffers | None = None,  # None -> chain
        *,
        logits: LogitsWanted = "all",
        hidden: HiddenWanted = False,
    ) -> RunnerOutput:
        """Score n inputs after the committed prefix; their KV stays provisional until `commit`."""
        ...

    def commit(self, keep: list[int] | int) -> None:
        """Keep the provisional entries at input indices `keep` (ascending, along one tree path) or the first
        `keep` inputs when an int; drop the others. Settles every `forward` not cancelled by rollback/reset."""
        ...

    def rollback(self, length: int) -> None:
        """Shorten the committed prefix to `length` tokens; cancels a pending forward."""
        ...


@runtime_checkable
class ChainDrafting(Protocol):
    """A runner that drafts a whole chain of its own tokens in one call, with no host round trip between them (the
    native runner: one CUDA graph per shape). Drafters use it when a runner offers it, else one forward per token."""

    max_chain: int  # the longest chain one call drafts

    def draft_chain(
        self,
        token_ids: torch.Tensor,  # [n] int64: the tokens after the committed prefix, the pending one last
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,  # the target's logits width: drafts and q are over it (cut, or padded with q = 0)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [k] int64 and, when sampling, their warped draft distributions q [k, V] float32: greedy takes each
        argmax, sampling draws each token from its q with `generator`. Leaves the fed tokens and drafts 1..k-1
        committed, as k prefills of one token each would (the caller rolls back what verification rejects)."""
        ...


@runtime_checkable
class SlotView(Protocol):
    """A single-sequence runner that is one slot of a batched runner (`BatchedNativeRunner.view`): drafters of
    several sequences whose runners are slots of the same batched runner can run them in one forward per level."""

    batched: object  # the batched runner: forward(step), commit(keeps), length(slot), rollback(slot, length)
    slot: int


def check_inputs(token_ids: torch.Tensor, logits: str) -> None:
    """The argument checks every single-sequence `Runner.forward` makes first."""
    if logits not in ("all", "last", "none"):
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    if token_ids.dim() != 1 or token_ids.shape[0] == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")


def layer_taps(hidden: HiddenWanted, num_layers: int, where: str) -> tuple[int, ...]:
    """The decoder layers a `hidden` request names (() for False or True), checked against [0, num_layers - 1)."""
    if not isinstance(hidden, tuple):
        return ()
    if not hidden or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers - 1 for i in hidden):
        raise ParadecError(
            f"{where}: hidden states of layers {list(hidden)} asked for; it lends the outputs of layers "
            f"[0, {num_layers - 1}) of its {num_layers} (the last one's only after the final norm: hidden=True)"
        )
    return hidden


def prefill(
    runner: Runner, token_ids: torch.Tensor, *, logits: LogitsWanted = "none", hidden: HiddenWanted = False
) -> RunnerOutput:
    """Append `token_ids` to the committed prefix."""
    out = runner.forward(token_ids, logits=logits, hidden=hidden)
    runner.commit(int(token_ids.shape[0]))
    return out
