"""`NativeRunner`: the `Runner` protocol over our own Llama-family Transformer and a static KV cache.

Input j of a forward sits at position `length + depth[j]` and writes its keys/values to slot `length + j`
(provisional). `commit(keep)` makes the kept inputs (one root path) the next committed slots, moving them only when
they are not already in place; `rollback` is a length reset (it cancels a pending forward). The bookkeeping (the
committed length, the pending forward, the rules of commit and rollback) is a `Ledger`'s (`paradec.runners.ledger`);
the runner applies what it returns to its `KVCache`. Forwards of up to Q_BUCKETS[-1] inputs run on static buckets
(CUDA graphs on CUDA). A longer chain (a prompt) runs as consecutive forwards of the largest bucket over the
same graphs; without static shapes it runs eagerly in chunks, so memory stays bounded. Longer trees run eagerly.
Hidden states of decoder layers (`forward(hidden=(i, ...))`, `paradec.runners.base`) come from the same forward on
every path; on the static buckets each requested layer set has its own output buffer and graphs.

No host synchronisation happens in forward/commit/rollback: shapes come from host ints the runner tracks, the
committed length the kernels read is a device scalar, and the only host-to-device copies (the index list of a tree
compaction, token ids passed on the host) are asynchronous.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from paradec.config import SamplingParams
from paradec.errors import ParadecError
from paradec.runners.base import HiddenWanted, LogitsWanted, RunnerOutput, check_inputs, layer_taps
from paradec.runners.ledger import DEVICE_TREE, Ledger, input_parents
from paradec.runners.native.graphs import Q_BUCKETS, ChainGraph, StaticForward, kv_bucket
from paradec.runners.native.kv_cache import KVCache
from paradec.runners.native.loading import load_transformer, read_config, resolve_dtype
from paradec.runners.native.model import ModelArgs, Transformer, unsupported_reason
from paradec.tree import TreeBuffers

DEFAULT_MAX_CACHE_LEN = 4096
PREFILL_CHUNK = 1024  # eager chains longer than this run in chunks (the attention bias is chunk x cache)
CHAIN_PARENTS = tuple(range(-1, Q_BUCKETS[-1] - 1))  # input-index parents of a chain; slice [:n]


class NativeRunner:
    """One sequence on the native model (batch 1). Serves targets and draft models alike."""

    max_step_inputs = Q_BUCKETS[-1]  # the largest forward on the static buckets (method options are bounded by it)
    max_chain = ChainGraph.max_tokens  # the longest `draft_chain`
    _chain: ChainGraph | None = None  # built on the first `draft_chain` (its buffers are vocabulary-wide)
    pard: dict | None = None  # {"mask_token_id", "k"} of a PARD-adapted draft checkpoint (`paradec.drafters.pard`)

    def __init__(
        self,
        model: Transformer,
        *,
        max_cache_len: int | None = None,
        layers: Sequence[int] | None = None,
        static_shapes: bool | None = None,
    ) -> None:
        """`layers` runs a subset of the model's layers (shared weights, own cache); `static_shapes` (default: on
        CUDA) pads forwards to fixed buckets over static buffers, captured as CUDA graphs on CUDA."""
        args = model.args
        self.model = model
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.vocab_size = args.vocab_size
        self.hidden_size = args.hidden_size
        self.num_layers = args.n_layers
        max_cache_len = max_cache_len or min(args.max_position_embeddings, DEFAULT_MAX_CACHE_LEN)
        if not 0 < max_cache_len <= args.max_position_embeddings:
            raise ParadecError(
                f"max_cache_len {max_cache_len} must lie in [1, max_position_embeddings={args.max_position_embeddings}]"
            )
        self.max_length = max_cache_len
        layers = tuple(range(args.n_layers)) if layers is None else tuple(int(i) for i in layers)
        if not layers or any(not 0 <= i < args.n_layers for i in layers):
            raise ParadecError(f"layers {list(layers)} must be a non-empty list of indices in [0, {args.n_layers})")
        self.layer_ids = layers
        self.static_shapes = self.device.type == "cuda" if static_shapes is None else static_shapes
        slack = Q_BUCKETS[-1] if self.static_shapes else 0  # padded inputs write past the provisional slots
        capacity = -(-(max_cache_len + slack) // 128) * 128
        self.cache = KVCache(len(layers), args.n_kv_heads, args.head_dim, capacity, self.device, self.dtype)
        self._static = (
            StaticForward(model, self.cache, layers, capture=self.device.type == "cuda") if self.static_shapes else None
        )
        self._arange = torch.arange(max(capacity, Q_BUCKETS[-1]), device=self.device)
        self._tril = torch.ones(Q_BUCKETS[-1], Q_BUCKETS[-1], dtype=torch.bool, device=self.device).tril()
        # committed length (== cache.length between calls) and the pending forward: (inputs, parents: None = chain)
        self._ledger = Ledger(
            max_cache_len, name="NativeRunner", what="the native runner", hint=" (raise max_cache_len)"
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = "float32",
        max_cache_len: int | None = None,
        compile: bool | None = None,
        static_shapes: bool | None = None,
        exact: bool = False,
        tensor_parallel=None,
    ) -> NativeRunner:
        """Load a Llama/Mistral/Qwen2/Qwen3 checkpoint directory. `compile` (default: on CUDA when Triton is
        installed) fuses the elementwise work with torch.compile, about 15 s of warm-up on first use;
        `max_cache_len` defaults to min(max_position_embeddings, 4096); `exact` runs the batch-invariant kernels
        (`Transformer(exact=True)`: every forward's rows bitwise independent of what else it scores);
        `tensor_parallel` (a `paradec.runners.native.tp.TensorParallel`) loads this rank's slices of the heads and
        the MLP, all-reduced per layer (not compiled: the elementwise work runs eagerly)."""
        config = read_config(path)
        reason = unsupported_reason(config, max_cache_len)
        if reason is not None:
            raise ParadecError(f"{str(path)!r}: {reason}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if compile is None:  # exact: eager elementwise work until compiled exact forwards are measured invariant
            compile = (
                device.type == "cuda"
                and importlib.util.find_spec("triton") is not None
                and not exact
                and tensor_parallel is None
            )
        if compile and exact and device.type != "cuda":
            raise ParadecError(
                "compile=True and exact=True needs CUDA: on the CPU, Inductor's vectorised loops round a row "
                "differently by the number of rows (measured: logits 0.17 apart); use compile=False"
            )
        model = load_transformer(
            path,
            device=device,
            dtype=resolve_dtype(dtype, config),
            compile=compile,
            exact=exact,
            tensor_parallel=tensor_parallel,
        )
        runner = cls(model, max_cache_len=max_cache_len, static_shapes=static_shapes)
        pard = config.get("pard")  # a PARD-adapted draft's mask token and trained k (`paradec train pard`)
        runner.pard = dict(pard) if isinstance(pard, dict) else None
        return runner

    def view(self, layers: Sequence[int], *, max_cache_len: int | None = None) -> NativeRunner:
        """A runner over a subset of this model's layers: same weights (no copy), its own cache and graphs."""
        view = NativeRunner(
            self.model, max_cache_len=max_cache_len or self.max_length, layers=layers, static_shapes=self.static_shapes
        )
        view.pard = self.pard
        return view

    def embed_weight(self) -> torch.Tensor:
        """Token embedding [V, H] (trained heads share it); on a tensor-parallel model the whole matrix, gathered
        once from the ranks and kept (a V x H copy per rank, `Transformer.full_embed_weight`; every rank asks)."""
        return self.model.full_embed_weight()

    def lm_head_weight(self) -> torch.Tensor:
        """LM head [V, H] (the embedding when tied); gathered once under tensor parallelism, as `embed_weight`."""
        return self.model.full_output_weight()

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far (one per query bucket x cache bucket x logits wanted that was used)."""
        return 0 if self._static is None or self._static.bank is None else len(self._static.bank.graphs)

    @property
    def length(self) -> int:
        return self._ledger.length

    def reset(self) -> None:
        self._ledger.reset()  # cancels a pending forward
        self.cache.truncate(0)

    def rollback(self, length: int) -> None:
        self._ledger.rollback(length)  # cancels a pending forward: its slots lie past `length`
        self.cache.truncate(length)

    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor,
        tree: TreeBuffers | None = None,
        *,
        logits: LogitsWanted = "all",
        hidden: HiddenWanted = False,
    ) -> RunnerOutput:
        self._ledger.check_idle()
        check_inputs(token_ids, logits)
        taps = layer_taps(hidden, self.num_layers, "the native runner")
        if any(i not in self.layer_ids for i in taps):
            raise ParadecError(f"hidden states of layers {list(taps)} asked for; this view runs {list(self.layer_ids)}")
        n = token_ids.shape[0]
        self._ledger.check_forward(n)
        parents: tuple[int, ...] | None = None  # None: a chain
        if tree is not None:
            if tree.size != n:
                raise ValueError(f"tree has {tree.size} inputs but {n} token ids were given")
            if tree.mask.device != self.device:
                tree = tree.to(self.device)
            parents = input_parents(tree.parents) if tree.on_host else DEVICE_TREE
        if self._static is not None and n <= Q_BUCKETS[-1]:
            out_logits, out_hidden = self._static_forward(token_ids, parents, tree, logits, taps)
            result = RunnerOutput(logits=out_logits, hidden=out_hidden.clone() if hidden else None)
        elif tree is None:  # a chain (a prompt): in chunks, over the static buckets when there are
            size = Q_BUCKETS[-1] if self._static is not None else PREFILL_CHUNK
            run = self._static_forward if self._static is not None else self._eager_forward
            tokens = token_ids.to(self.device, non_blocking=True)
            result = self._forward_chain(tokens, logits, bool(hidden), taps, size, run)
        else:
            out_logits, out_hidden = self._eager_forward(
                token_ids.to(self.device, non_blocking=True), parents, tree, logits, taps
            )
            result = RunnerOutput(logits=out_logits, hidden=out_hidden if hidden else None)
        self._ledger.begin(int(n), parents)
        return result

    def commit(self, keep: list[int] | int) -> None:
        commit = self._ledger.commit(keep)  # checked (a failed commit leaves the forward pending), then settled
        if not commit.moves:  # a chain prefix, or a path whose entries already sit in place
            self.cache.advance(commit.count)
            return
        slots = torch.tensor(commit.moves, dtype=torch.long).T.contiguous()  # (2, m): sources, destinations
        self.cache.compact(slots.to(self.device, non_blocking=True), commit.count)

    def _forward_chain(
        self, tokens: torch.Tensor, logits: LogitsWanted, hidden: bool, taps: tuple[int, ...], size: int, run
    ) -> RunnerOutput:
        """A chain in consecutive forwards of at most `size` inputs (`run`: `_static_forward` or `_eager_forward`).
        Each chunk's inputs count as committed for the next (every later input attends to them in full); the length
        is restored afterwards, so `commit` sees one forward of n inputs. Over the static buckets this keeps a long
        prompt on the CUDA graphs: eagerly a 400-token prompt of the 115M bench target took ~11 ms on an H200, and
        a graph replay of up to 128 inputs ~0.3 ms."""
        n, start = tokens.shape[0], self.cache.length
        hiddens, all_logits = [], []
        try:
            for offset in range(0, n, size):
                count = min(size, n - offset)
                want = logits if logits == "all" or offset + count == n else "none"
                out_logits, out_hidden = run(tokens[offset : offset + count], None, None, want, taps)
                if hidden:
                    hiddens.append(out_hidden.clone())
                if out_logits is not None:
                    all_logits.append(out_logits)
                self.cache.advance(count)
        finally:
            self.cache.truncate(start)
        return RunnerOutput(
            logits=torch.cat(all_logits) if all_logits else None,
            hidden=torch.cat(hiddens) if hidden else None,
        )

    def _static_forward(
        self,
        tokens: torch.Tensor,
        parents: tuple[int, ...] | None,
        tree: TreeBuffers | None,
        logits: LogitsWanted,
        taps: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Up to Q_BUCKETS[-1] inputs on the static buckets: logits (a copy) and hidden, or the outputs of layers
        `taps` (a view of a static buffer, valid until the next forward)."""
        n = tokens.shape[0]
        out_logits, out_hidden = self._static(
            tokens,
            CHAIN_PARENTS[:n] if parents is None else parents,
            self._arange[:n] if tree is None else tree.depth,
            self._tril[:n, :n] if tree is None else tree.mask,
            logits != "none",
            taps,
        )
        if out_logits is not None:
            out_logits = (out_logits[-1:] if logits == "last" else out_logits).clone()
        return out_logits, out_hidden

    def _eager_forward(
        self,
        tokens: torch.Tensor,
        parents: tuple[int, ...] | None,
        tree: TreeBuffers | None,
        logits: LogitsWanted,
        taps: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One eager forward of any size (a chain when `tree` is None): logits (float32) and hidden, or the outputs
        of layers `taps`."""
        n = tokens.shape[0]
        if tree is None:
            depth = self._arange[:n]
            mask = (
                self._tril[:n, :n]
                if n <= Q_BUCKETS[-1]
                else torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            )
        else:
            depth, mask = tree.depth, tree.mask
        kv = kv_bucket(self.cache.length + n, self.cache.capacity)
        out = self.model(tokens, depth, mask, self.cache.length_t, self.cache.data, kv, self.layer_ids, taps)
        h, states = out if taps else (out, out)
        out_logits = None if logits == "none" else self.model.logits(h[-1:] if logits == "last" else h).float()
        return out_logits, states

    @torch.no_grad()
    def draft_chain(
        self,
        token_ids: torch.Tensor,
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`ChainDrafting`: feed `token_ids`, then k - 1 of its own drafts, as one CUDA graph on CUDA (`ChainGraph`).
        A feed longer than `ChainGraph.max_fed` is prefilled first, so the graphs stay few."""
        self._ledger.check_idle("draft_chain")
        if not 1 <= k <= self.max_chain:
            raise ValueError(f"k must lie in [1, {self.max_chain}], got {k}")
        if token_ids.dim() != 1 or token_ids.shape[0] == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
        if self.cache.length + token_ids.shape[0] + k - 1 > self.max_length:
            raise ParadecError(
                f"a chain of {k} drafts after {self.cache.length + token_ids.shape[0]} tokens exceeds the native "
                f"runner's max_length {self.max_length} (raise max_cache_len)"
            )
        token_ids = token_ids.to(self.device, non_blocking=True)
        if token_ids.shape[0] > ChainGraph.max_fed:
            self.forward(token_ids[:-1], logits="none")
            self.commit(token_ids.shape[0] - 1)
            token_ids = token_ids[-1:]
        if self._chain is None or self._chain.vocab_size != vocab_size:
            capture = self.static_shapes and self.device.type == "cuda"
            with torch.inference_mode(False):  # buffers that later calls outside inference mode may update too
                self._chain = ChainGraph(self.model, self.cache, self.layer_ids, vocab_size, capture=capture)
        tokens, probs = self._chain(token_ids, k, sampling, generator)
        self.cache.advance(token_ids.shape[0] + k - 1)  # the fed tokens and drafts 1..k-1, as k prefills would
        self._ledger.advance(int(token_ids.shape[0]) + k - 1)
        return tokens, probs

    @property
    def chain_graphs_captured(self) -> int:
        """CUDA graphs of whole draft chains captured so far (one per fed tokens x k x cache buckets x warp)."""
        return 0 if self._chain is None or self._chain.bank is None else len(self._chain.bank.graphs)
