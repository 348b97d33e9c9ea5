"""`Ledger`: the runner state machine of one sequence (`paradec.runners.base`), on host ints only.

Every runner (`HFRunner`, `NativeRunner`, each slot of `BatchedNativeRunner`) keeps one ledger per sequence and
asks it before touching its cache; the ledger owns the committed length, the pending forward and the rules, and
hands back what the runner applies to its cache (a `Commit`: how many entries to keep and which to move). It holds
no tensors, so it costs nothing on the device and never synchronises with it.

    idle  --begin(n, parents)-->  pending  --commit(keep)-->  idle, length + kept
      ^                              |
      +----- rollback(l) / reset ----+    cancels the pending forward: its provisional entries are dropped

The rules:

- `begin` while a forward is pending: RuntimeError (commit it, or cancel it with rollback/reset, first);
- `begin` past `max_length` (committed + new inputs): ParadecError naming the numbers;
- `commit` with no forward pending: RuntimeError;
- `keep` is an int, a prefix of the inputs in [0, n], or a list of input indices forming a root path of the
  pending forward: for a chain a prefix [0, 1, ..., k-1]; for a host tree each index's parent is the one before
  it (the first one's is -1, the root); for a device tree, whose parents are unknown on the host, it starts at 0
  and strictly ascends within [0, n). Anything else: ValueError naming the keep and n. A failed commit changes
  nothing (the forward stays pending);
- `rollback(length)` outside [0, committed]: ValueError naming both;
- `rollback` and `reset` while a forward is pending cancel it. That is the one rule, for every runner: a forward
  is provisional until its commit, so shortening (or forgetting) the committed sequence forgets it too: the
  provisional entries sit after the committed prefix, past any length it can be rolled back to, and are
  overwritten by the next forward. (A batched forward over several slots is one unit: `BatchedNativeRunner`
  refuses to roll back or release one of its slots before the commit, and `cancel()` drops the whole forward.)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from paradec.errors import ParadecError, shown

if TYPE_CHECKING:
    from paradec.tree import TreeBuffers


class _DeviceTree(tuple):
    """Stands for the parents of a tree built on the device (`paradec.tree.device_tree`): unknown on the host,
    empty to `StaticForward` (which then reloads the tree's rows)."""


DEVICE_TREE = _DeviceTree()

# The parents of a pending forward: None for a chain, the input-index parents of a host tree (-1 for the root
# input 0; auxiliary inputs after the tree have none, so the tuple may be shorter than the forward), or DEVICE_TREE.
Parents = tuple[int, ...] | None


@lru_cache(maxsize=256)
def input_parents(node_parents: tuple[int, ...]) -> tuple[int, ...]:
    """Input-index parents of a tree forward (input 0 is the root) from the proposal's node parents."""
    return (-1, *(p + 1 for p in node_parents))


def tree_parents(tree: TreeBuffers | None) -> Parents:
    """The ledger's parents of a forward over `tree`: None for no tree or a chain-shaped one."""
    if tree is None or tree.is_chain:
        return None
    return input_parents(tree.parents) if tree.on_host else DEVICE_TREE


def _index(value: object) -> int | None:
    """`value` as an int if it is one (numpy and 0-dim tensor ints too), else None; a bool is not one."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@dataclass(frozen=True)
class Pending:
    """A forward awaiting its commit: `size` inputs after the committed prefix, laid out as `parents` says."""

    size: int
    parents: Parents = None


@dataclass(frozen=True)
class Commit:
    """What a commit does to the cache: keep `count` entries on positions [start, start + count), each provisional
    entry that is not already in place copied from `source` onto `destination` first (absolute cache positions,
    both ascending, source > destination; empty for a chain prefix or a path that is one)."""

    start: int
    count: int
    moves: tuple[tuple[int, int], ...] = ()

    @property
    def length(self) -> int:
        """The committed length after the commit."""
        return self.start + self.count


class Ledger:
    """The committed length and the pending forward of one sequence, and the rules (module docstring).

    `name` names the runner in the RuntimeErrors ("NativeRunner"), `what` in the ParadecError of a forward past
    `max_length` ("the native runner"), followed by `hint` (" (raise max_cache_len)"). The `label` arguments put
    a sequence into a message (a batched runner's " of sequence 1 (slot 3)")."""

    __slots__ = ("_length", "_pending", "hint", "max_length", "name", "what")

    def __init__(self, max_length: int, *, name: str, what: str, hint: str = "") -> None:
        self.max_length = max_length
        self.name = name
        self.what = what
        self.hint = hint
        self._length = 0
        self._pending: Pending | None = None

    @property
    def length(self) -> int:
        """Committed tokens."""
        return self._length

    @property
    def pending(self) -> Pending | None:
        """The forward awaiting its commit, or None."""
        return self._pending

    # --- forward ------------------------------------------------------------------------------------------------

    def check_idle(self, what: str = "forward") -> None:
        """RuntimeError while a forward is pending (`what`: the call that needs none, for the message)."""
        if self._pending is not None:
            again = " again" if what == "forward" else ""
            raise RuntimeError(f"{self.name}.{what}() called{again} before commit() of the previous forward")

    def check_forward(self, n: int, label: str = "sequence") -> None:
        """Raise unless a forward of `n` inputs may begin: none pending, n >= 1, room up to `max_length`."""
        self.check_idle()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a forward scores at least one input, got {n!r}")
        if self._length + n > self.max_length:
            raise ParadecError(
                f"{label} of {self._length} committed + {n} new = {self._length + n} tokens exceeds {self.what}'s "
                f"max_length {self.max_length}{self.hint}"
            )

    def begin(self, n: int, parents: Parents = None) -> None:
        """Record a forward of `n` inputs (checked as `check_forward` does): pending until commit or cancel."""
        self.check_forward(n)
        self._pending = Pending(n, parents)

    def advance(self, count: int) -> None:
        """Commit `count` more tokens with no forward pending: a runner's own forward-and-commit in one call
        (`NativeRunner.draft_chain`)."""
        if count:
            self.check_forward(count)
        self._length += count

    # --- commit -------------------------------------------------------------------------------------------------

    def check(self, keep: list[int] | int, label: str = "") -> Commit:
        """The commit that `keep` asks for, checked (the rules above); changes nothing."""
        pending = self._pending
        if pending is None:
            raise RuntimeError(f"{self.name}.commit() without a forward() to commit")
        n, parents = pending.size, pending.parents
        start = self._length
        if isinstance(keep, (list, tuple)):
            path = [_index(k) for k in keep]
            count = None if None in path else len(path)
        else:
            count = keep if type(keep) is int else _index(keep)  # a plain int: the common case
            path = None
        if count is None:
            raise ValueError(
                f"keep {shown(keep)}{label} must be an int (a prefix of the last forward's {n} inputs) or a list of "
                "input indices (a root path)"
            )
        if path is None:
            if not 0 <= count <= n:
                raise ValueError(f"keep {count}{label} outside [0, {n}] of the last forward's {n} inputs")
            if parents is None:  # a chain prefix: the common case, O(1)
                return Commit(start, count)
            path = list(range(count))
        for i, k in enumerate(path):
            before = path[i - 1] if i else -1
            if parents is None:
                ok = 0 <= k < n and k - 1 == before
            elif parents is DEVICE_TREE:  # the shape is on the device only: a root path starts at 0 and ascends
                ok = 0 <= k < n and (k > before if i else k == 0)
            else:
                ok = 0 <= k < min(n, len(parents)) and parents[k] == before
            if not ok:
                raise ValueError(f"keep {shown(keep)}{label} is not a root path of the last forward's {n} inputs")
        moves = tuple((start + k, start + i) for i, k in enumerate(path) if k != i)
        return Commit(start, len(path), moves)

    def settle(self, commit: Commit) -> None:
        """Apply a commit `check` returned for the pending forward: the forward is done, the length advances."""
        if self._pending is None or commit.start != self._length:
            raise RuntimeError(f"{self.name}: a commit settled that does not belong to the pending forward")
        self._pending = None
        self._length = commit.length

    def commit(self, keep: list[int] | int, label: str = "") -> Commit:
        """`check` then `settle`: the commit for the runner to apply to its cache."""
        commit = self.check(keep, label)
        self.settle(commit)
        return commit

    # --- rollback / reset ---------------------------------------------------------------------------------------

    def rollback(self, length: int, label: str = "") -> Pending | None:
        """Shorten the committed prefix to `length` in [0, self.length]; cancels a pending forward (returned)."""
        to = _index(length)
        if to is None or not 0 <= to <= self._length:
            raise ValueError(f"rollback{label} to {shown(length)} outside its committed length [0, {self._length}]")
        cancelled = self.cancel()
        self._length = to
        return cancelled

    def reset(self) -> Pending | None:
        """Forget the sequence (length 0); cancels a pending forward (returned)."""
        cancelled = self.cancel()
        self._length = 0
        return cancelled

    def cancel(self) -> Pending | None:
        """Drop the pending forward, if any (returned); the committed length stays."""
        cancelled, self._pending = self._pending, None
        return cancelled
