"""Verification: the ONLY place where draft tokens are accepted.

One target forward scores [pending token, node 0, node 1, ...]; `logits[j]` is the target's next-token logits
after input j (input 0 is the pending token, input i + 1 is proposal node i). The verifier walks the proposal
from the root and emits the accepted draft tokens plus exactly one token from the target itself: the **bonus**
token (sampled/argmaxed at the deepest accepted node) or the **recovered** token (drawn from the residual after
a rejection). Every emitted token is distributed exactly as plain decoding would draw it. Let p be the target's
warped distribution (paradec.sampling.warp) at a node and q the drafter's warped distribution there.

Greedy (temperature 0), chain or tree:
    x_j = argmax p_j for every input j. Node i is accepted iff its token equals x at its parent and its parent
    is accepted. Emit the accepted tokens, then x at the deepest accepted input. Identical to greedy decoding.

Point masses (sampling, drafter has no q: prompt lookup, Jacobi, lookahead, top-k trees):
    x_j ~ p_j independently for every input j, then exactly the greedy walk with x in place of argmax.
    Exact: the emitted token at every prefix is a draw from p at that prefix. For a single draft d this is
    rejection sampling with q = δ_d: accept with prob p(d) = min(1, p(d)/1), and on rejection x ~ p conditioned
    on x != d, which is norm(max(0, p - δ_d)), the residual.

Rejection sampling, chain with q (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023):
    draft token d_i was sampled from q_i. Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection emit a recovered token from norm(max(0, p_i - q_i)); if all n are accepted emit a bonus token from
    p_n. Then P(emit y) = min(p, q)(y) + (1 - Σ min(p, q)) * norm(max(0, p - q))(y) = p(y).

Recursive rejection sampling, tree with q (multi-candidate, SpecInfer / EAGLE style; the without-replacement form
of Jeon et al. 2024, "Recursive Speculative Decoding"):
    the children c_1..c_m of a node were drawn without replacement from q, in that order. For k = 1..m: accept
    c_k with probability min(1, p(c_k) / q(c_k)); on rejection p <- norm(max(0, p - q)) and q <- q with c_k
    removed, renormalised. If no child is accepted emit a recovered token from the final p. Each rejected
    sibling's q is taken out of the residual, which keeps the emitted token distributed as the original p.

Host syncs: one per step for greedy, point-mass and chain verification (the accepted count, the final token and
the draft tokens travel together; `verify_deferred` leaves that copy to the caller, so that `verify_all` copies a
whole batch's values at once); tree rejection sampling is sequential by nature and syncs once per sibling tried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from paradec.config import SamplingParams
from paradec.sampling import sample, warp
from paradec.tree import TreeBuffers
from paradec.types import Proposal, Verdict


class Deferred:
    """A verdict whose device work is queued: the int64 tensors `host` hold, in order, every value the host needs,
    and `finish` turns those values (one list, once copied) into the `Verdict`. A batch of them needs one copy for
    all (`verify_all`). `final`: the verdict's last token on the device ([1], the next step's pending input) when it
    is known before the copy (a step without draft tokens), else None; a batch may then launch the next step first
    (`paradec.batch`)."""

    __slots__ = ("final", "finish", "host")

    def __init__(
        self,
        host: tuple[torch.Tensor, ...],
        finish: Callable[[list[int]], Verdict],
        final: torch.Tensor | None = None,
    ) -> None:
        self.host = host
        self.finish = finish
        self.final = final

    @property
    def count(self) -> int:
        return sum(piece.shape[0] for piece in self.host)

    def resolve(self) -> Verdict:
        """The verdict, after one copy of the host values (a sync)."""
        return self.finish(_joined(self.host).tolist())


def _joined(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))


def verify(
    proposal: Proposal,
    logits: torch.Tensor,  # [n+1, V] float32 target logits for [pending, *proposal]
    sp: SamplingParams,
    generator: torch.Generator | None = None,
    tree: TreeBuffers | None = None,
) -> Verdict:
    """Accept a prefix/path of `proposal` against the target's `logits` (see the module docstring)."""
    pending = verify_deferred(proposal, logits, sp, generator, tree)
    return pending if isinstance(pending, Verdict) else pending.resolve()  # the step's one sync


def verify_all(pending: Sequence[Verdict | Deferred]) -> list[Verdict]:
    """The verdicts of a batch's sequences (each from `verify_deferred`), their host values copied in one sync."""
    waiting = [p for p in pending if isinstance(p, Deferred)]
    if not waiting:
        return list(pending)
    host = _joined([piece for p in waiting for piece in p.host]).tolist()  # one sync
    verdicts, start = [], 0
    for p in pending:
        if isinstance(p, Verdict):
            verdicts.append(p)
            continue
        count = p.count
        verdicts.append(p.finish(host[start : start + count]))
        start += count
    return verdicts


def verify_greedy_all(
    logits: torch.Tensor,  # [N, V] float32: the rows of every sequence of one forward, back to back
    seqs: Sequence[tuple[int, Proposal, TreeBuffers]],  # (first row, proposal, tree) of each sequence
) -> list[Verdict]:
    """Greedy verdicts of many sequences scored in one forward: one argmax over all rows, one host copy of the
    picks with every draft token (and device trees' parents), then each sequence's walk on the host
    (`_greedy_verdict`, as `_walk` does). Per sequence, `verify_deferred` would queue an argmax of its own."""
    picks = logits.argmax(-1)  # [N]
    pieces, sizes = [picks], [proposal.size for _, proposal, _ in seqs]
    for (_, proposal, tree), n in zip(seqs, sizes, strict=True):
        if n:
            pieces.append(proposal.tokens)
            if not tree.on_host:  # a device-built tree: its shape travels with the verdict
                pieces.append(tree.parent[1 : n + 1])
    host = _joined(pieces).tolist()  # one sync
    verdicts, at = [], picks.shape[0]
    for (first, _, tree), n in zip(seqs, sizes, strict=True):
        draft, parents = host[at : at + n], tree.parents
        at += n
        if parents is None:
            parents = [p - 1 for p in host[at : at + n]]
            at += n
        verdicts.append(_greedy_verdict(host[first : first + n + 1], draft, parents, tree, picks, first))
    return verdicts


def verify_deferred(
    proposal: Proposal,
    logits: torch.Tensor,  # [n+1, V] float32 target logits for [pending, *proposal]
    sp: SamplingParams,
    generator: torch.Generator | None = None,
    tree: TreeBuffers | None = None,
) -> Verdict | Deferred:
    """`verify` with its host copy left to the caller (a `Deferred`), except for tree rejection sampling, which
    syncs per sibling and returns its `Verdict`."""
    if tree is None:
        tree = proposal.tree(logits.device)
    if sp.greedy:
        return _walk(proposal, logits.argmax(-1), tree)
    probs = warp(logits, sp)  # [n+1, V]
    if proposal.probs is None or proposal.size == 0:
        return _walk(proposal, sample(probs, generator), tree)
    if tree.is_chain:
        return _rejection_chain(proposal, probs, generator, tree)
    return _rejection_tree(proposal, probs, generator, tree)


def _walk(proposal: Proposal, picks: torch.Tensor, tree: TreeBuffers) -> Deferred:
    """Greedy / point-mass walk. `picks[j]` is the target's token after input j ([n+1]). Its device work is views:
    the picks, the draft tokens (and a device tree's parents) travel to the host, where the walk runs."""
    n = proposal.size
    host = (picks[: n + 1],) if n == 0 else (picks[: n + 1], proposal.tokens)
    if n and not tree.on_host:  # a device-built tree: its shape travels with the verdict
        host += (tree.parent[1 : n + 1],)

    def finish(values: list[int]) -> Verdict:
        parents = tree.parents if tree.on_host else [p - 1 for p in values[2 * n + 1 :]]
        return _greedy_verdict(values[: n + 1], values[n + 1 : 2 * n + 1], parents, tree, picks)

    return Deferred(host, finish, picks[:1] if n == 0 else None)


def _greedy_verdict(
    pick: list[int], draft: list[int], parents: Sequence[int], tree: TreeBuffers, picks: torch.Tensor, first: int = 0
) -> Verdict:
    """The walk on host values: `pick[j]` the target's token after input j ([n+1]), `draft` the n node tokens,
    `parents` their parents. `picks` holds the picks on the device, this sequence's input 0 at row `first` (the
    verdict's `final_device` is a view of it)."""
    n = len(draft)
    accepted, depth, best = [True] + [False] * n, [0] * (n + 1), 0
    for i in range(n):  # node i is input i + 1; its parent input parents[i] + 1 precedes it
        j = parents[i] + 1
        depth[i + 1] = depth[j] + 1
        if accepted[j] and draft[i] == pick[j]:
            accepted[i + 1] = True
            if depth[i + 1] > depth[best]:  # accepted inputs form one root path: its deepest
                best = i + 1
    path = _path_to(parents, best)
    return Verdict(
        path=path,
        tokens=[draft[i] for i in path] + [pick[best]],
        proposed=n,
        depth=tree.max_depth if tree.on_host else max(depth),
        final_device=picks[first + best : first + best + 1],
    )


def _path_to(parents: Sequence[int], input_index: int) -> list[int]:
    """Proposal node indices from the root's child down to input `input_index` (exclusive of the root)."""
    path = []
    j = input_index
    while j > 0:
        path.append(j - 1)
        j = parents[j - 1] + 1
    return path[::-1]


def _rejection_chain(
    proposal: Proposal, probs: torch.Tensor, generator: torch.Generator | None, tree: TreeBuffers
) -> Deferred:
    n = proposal.size
    q = proposal.probs.float()  # [n, V]
    draft = proposal.tokens  # [n]
    rows = torch.arange(n, device=probs.device)
    p_draft = probs[rows, draft]  # [n]
    q_draft = q[rows, draft]  # [n] > 0: each draft token was sampled from q
    u = torch.rand(n, generator=generator, device=probs.device)
    accept = u * q_draft < p_draft  # u < p/q, i.e. accept with probability min(1, p/q)
    accepted = accept.long().cumprod(0).sum()  # length of the accepted prefix
    residual = (probs[:n] - q).clamp_min(0.0)  # [n, V]
    mass = residual.sum(-1, keepdim=True)
    # mass == 0 means p <= q everywhere, i.e. p == q: a rejection then has probability 0; fall back to p
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), probs[:n])
    candidates = torch.cat([sample(residual, generator), sample(probs[n : n + 1], generator)])  # [n+1]
    final_device = candidates[accepted].view(1)

    def finish(host: list[int]) -> Verdict:
        count, final, draft_host = host[0], host[1], host[2:]
        tokens = [*draft_host[:count], final]
        return Verdict(path=list(range(count)), tokens=tokens, proposed=n, depth=n, final_device=final_device)

    return Deferred((accepted.view(1), final_device, draft), finish)


def _rejection_tree(
    proposal: Proposal, probs: torch.Tensor, generator: torch.Generator | None, tree: TreeBuffers
) -> Verdict:
    q_all = proposal.probs.float()  # [n, V]
    draft = proposal.tokens.tolist()
    parents = tree.host_parents()
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        children[parent + 1].append(node)
    path: list[int] = []
    current = 0  # input index
    while True:
        p = probs[current]
        q = None
        moved = False
        for node in children[current]:
            token = draft[node]
            if q is None:
                q = q_all[node]
            u = torch.rand((), generator=generator, device=probs.device)
            ok = u * q[token] < p[token]
            if bool(ok):  # one sync per sibling tried
                path.append(node)
                current = node + 1
                moved = True
                break
            residual = (p - q).clamp_min(0.0)
            mass = residual.sum()
            p = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
            q = q.clone()
            q[token] = 0.0
            q_mass = q.sum()
            q = torch.where(q_mass > 0, q / q_mass.clamp_min(1e-30), q)
        if not moved:
            final = sample(p.view(1, -1), generator)  # [1]
            tokens = [draft[i] for i in path] + [int(final[0])]
            return Verdict(path=path, tokens=tokens, proposed=len(draft), depth=tree.max_depth, final_device=final)
