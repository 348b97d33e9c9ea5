"""Tensor parallelism for the native runner: the target's heads, MLP columns and vocabulary split across ranks.

Every rank holds 1/W of each layer (Megatron's split): q/k/v and gate/up column-parallel (a rank computes its own
attention heads, KV heads included, and its slice of the MLP's hidden units), the output and down projections
row-parallel with one all-reduce each per layer, so a layer costs two collectives. The KV cache is sharded by KV
heads for free: the runner sizes it from the rank's own model arguments.

The embedding and the LM head are split by vocabulary (tied or not): rank r holds rows [r*V', (r+1)*V') of each,
V' = ceil(V/W), the vocabulary padded with zero rows up to W*V' when W does not divide V. The embedding looks up
the ids in the rank's range (the others read zeros) and all-reduces: each entry is the owner's value plus exact
zeros, so the lookup equals the unsharded one bitwise (a -0.0 entry reads back +0.0). The LM head computes the
rank's V' columns of the logits and all-gathers them along the vocabulary, then drops the padded columns (their
logit 0 never reaches a sampler), so every rank holds the full [T, V] logits: one more collective per forward that
scores logits. Only the norms are replicated.

That keeps the SPMD contract: every rank runs the same decode loop, the same verifier on the same full logits, the
same drafters (replicated, fed identical logits) and the same seeded samplers, so they take the same decisions
without exchanging proposals. The all-reduce returns the same bits on every rank (reduce-scatter, then
all-gather) and the gather concatenates the same slices everywhere, so the ranks never drift apart. Trained heads
(EAGLE, Medusa) read the target's whole embedding and LM head: `Transformer.full_embed_weight` /
`full_output_weight` (what the runner's `embed_weight()` / `lm_head_weight()` return) gather them once per rank
and keep them, a replicated V x C copy each (one when tied) on top of the rank's V/W rows, as much as an unsharded
model holds. Methods without heads never gather them. Every gather is a collective: all ranks reach it together.

`shard_config` / `shard_state` cut a Hugging Face config and state dict for one rank; `vocab_rows` is a rank's
share of the vocabulary; `TensorParallel` names the rank, the world size and the process group (torch.distributed:
NCCL on GPUs, gloo on CPUs) and runs the collectives; `init` joins a group with a bounded wait. Row-parallel biases
are kept on rank 0 only (the all-reduce adds the partial products).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paradec.errors import ParadecError


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object | None = None  # a torch.distributed ProcessGroup; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def agree(self, value):
        """Rank 0's `value` on every rank: a host decision the ranks must share although each would take its own
        (a batch's speculation policy decides from timings, which differ between ranks); `broadcast_host`."""
        return broadcast_host(value, self.group)

    def gather_rows(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Every rank's `x` [n, ...] stacked rank by rank along dim 0, the first `size` rows kept: [size, ...]."""
        parts = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        _all_gather(parts, x.contiguous(), self.group)
        return parts[:size]

    def gather_columns(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side along the last dim, rank by rank, the first `size` columns kept:
        [..., size]."""
        if x.dim() == 1:
            return self.gather_rows(x, size)
        parts = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        _all_gather(parts, x.contiguous(), self.group)
        out = parts.view(self.world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], self.world * x.shape[-1])
        return out if size == out.shape[-1] else out[..., :size].contiguous()

    @staticmethod
    def current(group=None) -> TensorParallel:
        """The caller's rank in `group` (default: the initialised default group)."""
        if not dist.is_initialized():
            raise ParadecError(
                "tensor parallelism needs torch.distributed initialised (`paradec.runners.native.tp.init`)"
            )
        return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group)


_HOST_GROUP = None  # beside an NCCL default group, a gloo group of the same ranks for host values (`init`)


def broadcast_host(message=None, group=None):
    """Rank 0's (of `group`; None: the default group) picklable `message` on every rank: a collective, every rank
    calls it at the same point. Over the gloo group `init` makes beside an NCCL one, so nothing waits for the
    device and a step in flight keeps running."""
    box = [message]
    if group is None:
        dist.broadcast_object_list(box, src=0, group=_HOST_GROUP)
    else:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """`out` [W * n, ...] = the ranks' `x` [n, ...] concatenated (NCCL and gloo alike; one tensor, no list)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name (torch 2.13)
    gather(out, x, group=group)


def init(
    rank: int, world: int, init_method: str, *, backend: str | None = None, timeout_s: float = 60.0
) -> TensorParallel:
    """Join a group of `world` ranks (gloo on CPU, NCCL on CUDA by default); a rank that does not show up within
    `timeout_s` is a ParadecError, not a hang."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
    except Exception as exc:  # the store's timeout, a refused connection, a bad init_method
        raise ParadecError(
            f"tensor parallel: rank {rank} of {world} could not join the group at {init_method!r} within "
            f"{timeout_s:g} s ({type(exc).__name__}: {exc})"
        ) from exc
    if backend != "gloo":  # host values travel apart from the device's collectives (every rank makes it, in order)
        global _HOST_GROUP
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return TensorParallel(rank, world)


def _split(n: int, world: int, what: str) -> int:
    if n % world:
        raise ParadecError(f"tensor parallel size {world} must divide the model's {what} ({n})")
    return n // world


def vocab_rows(vocab_size: int, world: int) -> int:
    """Rows of the embedding and of the LM head each rank holds: ceil(V / world), the last rank's padded with zero
    rows when world does not divide V."""
    return -(-vocab_size // world)


def shard_config(config: dict, world: int) -> dict:
    """One rank's config: 1/world of the attention heads, KV heads and MLP hidden units (head_dim kept). The
    vocabulary stays the model's (`vocab_size`: what the logits cover); the rows a rank holds are `vocab_rows`."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {
        **config,
        "num_attention_heads": _split(heads, world, "attention heads"),
        "num_key_value_heads": _split(kv_heads, world, "key/value heads"),
        "intermediate_size": _split(config["intermediate_size"], world, "MLP size"),
        "head_dim": head_dim,
    }


def shard_state(config: dict, state: dict[str, torch.Tensor], tp: TensorParallel) -> dict[str, torch.Tensor]:
    """One rank's slices of a Hugging Face state dict (`config` is the full model's): the embedding's and the LM
    head's rows [r*V', (r+1)*V') of the vocabulary padded to W*V' (`vocab_rows`), the heads and MLP columns."""
    local = shard_config(config, tp.world)
    rows = vocab_rows(config["vocab_size"], tp.world)
    head_dim = local["head_dim"]
    q_rows = local["num_attention_heads"] * head_dim
    kv_rows = local["num_key_value_heads"] * head_dim
    mlp = local["intermediate_size"]
    r = tp.rank
    out = {}
    for name, t in state.items():
        if ".self_attn.q_proj." in name:
            out[name] = t[r * q_rows : (r + 1) * q_rows]
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            out[name] = t[r * kv_rows : (r + 1) * kv_rows]
        elif name.endswith("self_attn.o_proj.weight"):
            out[name] = t[:, r * q_rows : (r + 1) * q_rows]
        elif ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            out[name] = t[r * mlp : (r + 1) * mlp]
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = t[:, r * mlp : (r + 1) * mlp]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = _vocab_slice(t, r * rows, rows)
        elif name.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias")):
            out[name] = t if r == 0 else torch.zeros_like(t)  # added once by the all-reduce
        else:
            out[name] = t
    return out


def _vocab_slice(t: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start + rows) of `t` [V, C], zero rows past V."""
    piece = t[start : start + rows]
    if piece.shape[0] == rows:
        return piece
    return torch.cat((piece, piece.new_zeros(rows - piece.shape[0], *t.shape[1:])))


def run_ranks(world: int, fn, args, *, timeout_s: float = 300.0) -> int:
    """Run `fn(args)` on `world` tensor-parallel ranks and return rank 0's exit code. Under torchrun (RANK and
    WORLD_SIZE set) this process is one of them and joins through the environment; otherwise it spawns the ranks
    (a file rendezvous in a temporary directory) and waits for them. Ranks other than 0 print nothing."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ParadecError(f"--tensor-parallel must be a positive number of ranks, got {world!r}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise ParadecError(f"--tensor-parallel {world} but torchrun started {size} ranks")
        return _as_rank(rank, world, "env://", fn, args, timeout_s)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="paradec-tp-") as tmp:
        try:
            ranks = mp.spawn(
                _spawned, args=(world, f"file://{tmp}/rendezvous", fn, args, timeout_s, tmp), nprocs=world, join=False
            )
            with _forwarding_signals_to(ranks.processes[0].pid):
                while not ranks.join():
                    pass
        except mp.ProcessExitedException as exc:
            raise ParadecError(f"tensor parallel: rank {exc.error_index} exited with code {exc.exit_code}") from exc
        except mp.ProcessRaisedException as exc:
            raise ParadecError(f"tensor parallel: a rank failed:\n{exc}") from exc
        with open(f"{tmp}/rank0.code") as f:
            return int(f.read().strip())


@contextlib.contextmanager
def _forwarding_signals_to(pid: int):
    """SIGTERM / SIGINT sent to this (spawning) process go to rank 0 (a server drains, then stops the others),
    instead of ending this process and leaving the ranks behind. Only where signals can be set (the main thread)."""

    def forward(signum, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to forward
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawned(rank: int, world: int, init_method: str, fn, args, timeout_s: float, tmp: str) -> None:
    code = _as_rank(rank, world, init_method, fn, args, timeout_s)
    if rank == 0:
        with open(f"{tmp}/rank0.code", "w") as f:
            f.write(str(code))


def _as_rank(rank: int, world: int, init_method: str, fn, args, timeout_s: float) -> int:
    if rank != 0:  # one answer on the terminal: rank 0's
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's lifetime)
    init(rank, world, init_method, timeout_s=timeout_s)
    try:
        return int(fn(args) or 0)
    finally:
        dist.destroy_process_group()
