"""Our own small Llama-family transformer: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

This module owns the model's shape (`ModelArgs`, read from a Hugging Face config), its weights (`Transformer`)
and the arithmetic of one forward over T new inputs of one sequence. It keeps no state between calls: the caller
passes the KV cache tensor, the committed length `start` and the inputs' tree (depth + ancestor mask), and the
forward

- places input j at position `start + depth[j]` and writes its keys/values to cache slot `start + j`;
- lets input j attend to the committed slots [0, start) and to the inputs that `tree_mask[j]` allows.

So one code path scores a prompt, a chain or a token tree. Weights follow the Hugging Face checkpoints with two
fusions made at load time (q/k/v is one matrix, gate/up is one matrix): a decode step reads each layer with four
matrix-vector products. All index arithmetic stays on the device, so a forward never synchronises with the host and
can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from paradec import kernels
from paradec.errors import ParadecError
from paradec.layers import RMSNorm, apply_rope, inv_frequencies

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: tuple[tuple[str, float | str], ...]  # the standardized rope_parameters, sorted (hashable)
    sliding_window: int | None  # the attention window where some layer uses one, else None

    @property
    def rope_parameters(self) -> dict:
        return dict(self.rope)

    @staticmethod
    def from_config(config: dict) -> ModelArgs:
        """Parse a config.json dict; raises ParadecError for configs this model cannot run."""
        hf = _hf_config(config)
        architecture = _architecture(config)
        rope = dict(hf.rope_parameters or {})
        sliding_window = None
        if architecture == "mistral" or "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            sliding_window = hf.sliding_window
        bias = bool(getattr(hf, "attention_bias", False))
        return ModelArgs(
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads,
            n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            norm_eps=float(hf.rms_norm_eps),
            hidden_act=getattr(hf, "hidden_act", "silu"),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=True if architecture == "qwen2" else bias,
            o_bias=False if architecture == "qwen2" else bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=architecture == "qwen3",
            rope=tuple(sorted((k, v) for k, v in rope.items() if isinstance(v, (int, float, str)))),
            sliding_window=sliding_window,
        )


def _architecture(config: dict) -> str:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if names:
        raise ParadecError(f"architecture {names[0]!r} is not supported by the native runner")
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES.values():
        return model_type
    raise ParadecError(f"model_type {model_type!r} is not supported by the native runner")


def _hf_config(config: dict):
    """The config as transformers reads it, so defaults and legacy rope keys mean exactly what they mean there."""
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None) or _architecture(config)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as error:
        raise ParadecError(f"cannot read the {model_type!r} config: {error}") from error


def unsupported_reason(config: dict, max_cache_len: int | None = None) -> str | None:
    """Why the native runner cannot run this config exactly (None if it can).

    A sliding window only changes attention once the sequence outgrows it, so it is accepted when it is at least
    `max_cache_len` (default: the config's max_position_embeddings).
    """
    try:
        args = ModelArgs.from_config(config)
    except ParadecError as error:
        return str(error)
    if config.get("quantization_config"):
        return "quantized checkpoints are not supported by the native runner"
    if args.hidden_act != "silu":
        return f"hidden_act {args.hidden_act!r} is not supported by the native runner (only 'silu')"
    rope = args.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        return f"rope_type {rope_type!r} is not supported by the native runner (supported: {', '.join(ROPE_TYPES)})"
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return f"partial_rotary_factor {rope['partial_rotary_factor']!r} is not supported by the native runner"
    if args.n_heads % args.n_kv_heads:
        return f"num_attention_heads {args.n_heads} is not a multiple of num_key_value_heads {args.n_kv_heads}"
    if args.head_dim % 2:
        return f"head_dim {args.head_dim} must be even for rotary embeddings"
    context = max_cache_len or args.max_position_embeddings
    if args.sliding_window is not None and args.sliding_window < context:
        return (
            f"sliding_window {args.sliding_window} is in effect for a context of {context} tokens; the native runner "
            f"implements full attention only (pass max_cache_len <= {args.sliding_window} or use the hf runner)"
        )
    return None


def supports(config: dict) -> bool:
    """True when the native runner computes exactly what transformers computes for this config."""
    return unsupported_reason(config) is None


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2] float32, with the 'linear' or 'llama3' rescaling applied."""
    rope = args.rope_parameters
    inv_freq = inv_frequencies(args.head_dim, float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_context = float(rope.get("original_max_position_embeddings", args.max_position_embeddings))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def add_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's pending add, then the norm: (norm(residual + x), residual + x).

    A block hands its last branch output to the next block un-added, so that add and the next norm are one fused
    kernel (compiled mode) instead of two.
    """
    if norm.exact and kernels.fused:
        return kernels.add_rms_norm(x, residual, norm.weight, norm.eps)
    residual = residual + x
    return norm(residual), residual


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exact: bool) -> torch.Tensor:
    """`apply_rope`; in exact mode one fused kernel (`paradec.kernels.rope`)."""
    return kernels.rope(qk, cos, sin) if exact and kernels.fused else apply_rope(qk, cos, sin)


def swiglu(gate_up: torch.Tensor, exact: bool) -> torch.Tensor:
    """silu(gate) * up of a [gate, up] product; in exact mode one fused kernel (`paradec.kernels.silu_mul`)."""
    if exact and kernels.fused:
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def project(layer: nn.Linear, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """`layer(x)`; in exact mode through the batch-invariant product (`paradec.kernels`)."""
    return kernels.linear(x, layer.weight, layer.bias) if exact else layer(x)


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SDPA with an additive bias: batch-invariant in exact mode, else on `attn.sdpa_backends` (None: PyTorch's)."""
    if attn.exact:
        return kernels.attention(q, k, v, bias)
    if attn.sdpa_backends is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with sdpa_kernel(list(attn.sdpa_backends)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def reduce_partial(module: Attention | MLP, out: torch.Tensor) -> torch.Tensor:
    """A row-parallel projection's partial sum, all-reduced over the tensor-parallel ranks (`paradec.runners.native.tp`)."""
    return out if module.tp is None else module.tp.all_reduce(out)


class Embedding(nn.Embedding):
    """The token embedding. Under tensor parallelism (`tp` set, `Transformer.tensor_parallel`) it holds the rows
    [offset, offset + num_embeddings) of the vocabulary: ids outside them read zeros and the all-reduce adds the
    owner's row, so the result is the unsharded lookup bitwise (each entry is its value plus exact zeros)."""

    tp = None  # a `TensorParallel` when this rank holds a slice of the vocabulary
    offset = 0  # the first id of that slice

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(tokens)
        local = tokens - self.offset
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(inside, local, 0), self.weight).masked_fill(~inside[..., None], 0)
        return self.tp.all_reduce(out)


class Attention(nn.Module):
    exact = False  # batch-invariant products and attention (`Transformer(exact=True)` sets it)
    tp = None  # a `TensorParallel` when this rank holds a slice of the heads (`Transformer.tensor_parallel`)

    def __init__(self, args: ModelArgs, sdpa_backends: tuple[SDPBackend, ...] | None = None) -> None:
        super().__init__()
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(q_size, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.sdpa_backends = sdpa_backends  # None: PyTorch's choice

    def forward(
        self,
        x: torch.Tensor,  # (T, C)
        cos: torch.Tensor,  # (T, 1, hs)
        sin: torch.Tensor,  # (T, 1, hs)
        attn_bias: torch.Tensor,  # (1, 1, g*T, kv) additive
        slots: torch.Tensor,  # (T,) cache slots of the inputs
        cache: torch.Tensor,  # (2, nkv, S, hs) this layer's keys and values
        kv_len: int,
    ) -> torch.Tensor:
        T = x.shape[0]
        # head counts come from tensor shapes, so one compiled graph serves every model size
        n_kv_heads, head_dim = cache.shape[1], cache.shape[3]
        n_heads = (self.wqkv.out_features - 2 * n_kv_heads * head_dim) // head_dim
        group = n_heads // n_kv_heads
        qk, v = project(self.wqkv, x, self.exact).split(
            [(n_heads + n_kv_heads) * head_dim, n_kv_heads * head_dim], dim=-1
        )
        qk = qk.view(T, n_heads + n_kv_heads, head_dim)  # (T, nh + nkv, hs): queries and keys rotate together
        v = v.view(T, n_kv_heads, head_dim)  # (T, nkv, hs)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :n_heads]), self.k_norm(qk[:, n_heads:])), dim=1)
        qk = rotate(qk, cos, sin, self.exact)
        q, k = qk[:, :n_heads], qk[:, n_heads:]  # (T, nh, hs), (T, nkv, hs)
        # one scatter into the layer's cache tensor itself: compiled writes through views of it copied the whole cache
        cache.index_copy_(2, slots, torch.stack((k, v)).transpose(1, 2))  # (2, nkv, T, hs) into (2, nkv, S, hs)
        keys, values = cache[0, :, :kv_len], cache[1, :, :kv_len]  # (nkv, kv, hs)
        # batch-1 GQA: the `group` query heads sharing a KV head become extra query rows of that head, row g*T + t
        q = q.view(T, n_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, n_kv_heads, group * T, head_dim)
        y = attend(self, q, keys[None], values[None], attn_bias)  # (1, nkv, g*T, hs)
        y = y.view(n_kv_heads, group, T, head_dim).permute(2, 0, 1, 3).reshape(T, n_heads * head_dim)
        return reduce_partial(self, project(self.wo, y, self.exact))


class MLP(nn.Module):
    exact = False  # as Attention.exact
    tp = None  # as Attention.tp

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate then up
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = swiglu(project(self.w13, x, self.exact), self.exact)
        return reduce_partial(self, project(self.w2, hidden, self.exact))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, sdpa_backends: tuple[SDPBackend, ...] | None = None) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.attention = Attention(args, sdpa_backends)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, cos, sin, attn_bias, slots, cache, kv_len: int):
        """(x, residual) -> (x', residual'): the residual stream is residual + x before and residual' + x' after."""
        h, residual = add_norm(self.attention_norm, x, residual)
        h, residual = add_norm(self.mlp_norm, self.attention(h, cos, sin, attn_bias, slots, cache, kv_len), residual)
        return self.mlp(h), residual


def step_inputs(
    inv_freq: torch.Tensor,  # (hs/2,) float32
    start: torch.Tensor,  # () int64: committed length
    depth: torch.Tensor,  # (T,) int64
    tree_mask: torch.Tensor,  # (T, T) bool, lower triangular where it matters (see below)
    kv_len: int,
    group: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary cos/sin (T, 1, hs), cache slots (T,) and the additive attention bias (1, 1, g*T, kv) of one forward.

    Column c of the cache holds committed token c when c < start, else provisional input c - start. Input j sees
    every committed column, itself, and the provisional inputs k <= j that tree_mask[j, k] allows (ancestors always
    precede their descendants, so entries above the diagonal, e.g. stale ones of padded static buffers, are never
    read). Seeing itself keeps every row non-empty, padded rows included, so no softmax row is all -inf.
    """
    T = depth.shape[0]
    positions = (start + depth).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (T, hs/2) float32
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, hs)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    row = torch.arange(T, device=depth.device)
    slots = start + row
    rel = torch.arange(kv_len, device=depth.device) - start  # (kv,) provisional input index of each column
    in_tree = tree_mask.gather(1, rel.clamp(0, T - 1).expand(T, kv_len))  # (T, kv)
    own = (rel[None, :] >= 0) & (rel[None, :] <= row[:, None])
    allowed = (rel[None, :] < 0) | (own & (in_tree | (rel[None, :] == row[:, None])))
    bias = torch.zeros(T, kv_len, dtype=dtype, device=depth.device).masked_fill(~allowed, float("-inf"))
    return cos, sin, slots, bias.repeat(group, 1)[None, None]


def _run_block(block: Block, x, residual, cos, sin, attn_bias, slots, cache, kv_len: int):
    """A plain function of the block, so one compiled graph serves every block (weights are its inputs)."""
    return block(x, residual, cos, sin, attn_bias, slots, cache, kv_len)


RECOMPILE_LIMIT = 64  # graphs per compiled function (see `compiled`)


def compiled(fn, backend: str = "inductor"):
    """`fn` through torch.compile(dynamic=True, fullgraph=True), allowed RECOMPILE_LIMIT graphs. Dynamo specialises
    sizes 0 and 1 (one sequence, one input per sequence, one input) and None-or-not (the batched step's slots read
    as a view or gathered): a dozen graphs for the ragged block, more than Dynamo's default limit of 8, which with
    fullgraph=True is a hard error (bench/results/exact-h200-2026-12-02: the batched bench at batch 1, 8, 32).
    Duck sizing is turned off (for the process, as the limit is raised): it gave two sizes that happened to be equal
    when a graph was traced one symbol, and a later step without the coincidence (a step buffer's storage offset
    against a cache dimension, two counts of 3) failed that guard and recompiled: on CUDA an inductor compile of
    seconds, met inside timed batched passes (the likely cause of bench/results/m12-h200-2026-12-03's slow new
    buckets)."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    torch.fx.experimental._config.use_duck_shape = False
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


class Transformer(nn.Module):
    """Weights of a Llama-family causal LM and its forward over a static KV cache.

    `compile=True` runs each piece of the forward (step inputs, each block, the final add + norm) through
    `torch.compile(dynamic=True)`: the elementwise work between the matrix products fuses into a few Triton kernels,
    and because shapes are symbolic every query/cache bucket and every model size shares the same compiled code.
    `sdpa_backends` restricts the attention kernels (e.g. `(SDPBackend.EFFICIENT_ATTENTION,)`); None lets PyTorch
    choose. `exact=True` runs every matrix product and attention through the batch-invariant kernels of
    `paradec.kernels`: each row of a forward's hidden states and logits is then bitwise the same whatever the number
    of inputs, the tree around it, the cache bucket or the other sequences of a batch (the elementwise work and the
    norms are row-wise already).

    `vocab_rows` (default: the vocabulary) sizes the embedding and the LM head: a tensor-parallel rank holds
    ceil(V / W) rows of each (`paradec.runners.native.tp`, `tensor_parallel`); `args.vocab_size` stays the model's.
    """

    tp = None  # a `TensorParallel` when this model holds one rank's slices (`tensor_parallel`)

    def __init__(
        self,
        args: ModelArgs,
        *,
        compile: bool = False,
        sdpa_backends: tuple[SDPBackend, ...] | None = None,
        exact: bool = False,
        vocab_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        self.exact = exact
        rows = args.vocab_size if vocab_rows is None else vocab_rows
        self.embed = Embedding(rows, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, sdpa_backends) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, rows, bias=False)
        self._gathered: dict[str, torch.Tensor] = {}  # the whole embedding / LM head of a sharded model, once asked
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        for module in self.modules():
            if isinstance(module, (Attention, MLP, RMSNorm)):
                module.exact = exact
        self.is_compiled = compile
        if compile:
            self._step_inputs = compiled(step_inputs)
            self._block = compiled(_run_block)
            self._add_norm = compiled(add_norm)
            # the batched runner's block too: an eager ragged forward launches ~40 kernels per layer
            self._ragged_block = compiled(ragged_block)
        else:
            self._step_inputs, self._block, self._add_norm = step_inputs, _run_block, add_norm
            self._ragged_block = ragged_block

    def forward(
        self,
        tokens: torch.Tensor,  # (T,) int64
        depth: torch.Tensor,  # (T,) int64
        tree_mask: torch.Tensor,  # (T, T) bool
        start: torch.Tensor,  # () int64 committed length
        cache: torch.Tensor,  # (L', 2, nkv, S, hs), one entry per layer in `layer_ids`
        kv_len: int,  # attend over cache slots [0, kv_len); must cover start + T
        layer_ids: tuple[int, ...],
        taps: tuple[int, ...] = (),  # layers (of layer_ids) whose outputs to return too
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state after the final norm, (T, C): what the LM head reads. With `taps`, also the outputs of
        those layers (the residual stream after each, before any norm), concatenated in that order: (T, len(taps) * C).
        """
        group = self.args.n_heads // self.args.n_kv_heads
        cos, sin, slots, attn_bias = self._step_inputs(
            self.inv_freq, start, depth, tree_mask, kv_len, group, self.embed.weight.dtype
        )
        if self.exact:  # each token's visible columns, packed (`paradec.kernels.flash`), once for every layer
            attn_bias = kernels.visible_columns(attn_bias[:, :, : tokens.shape[0]])
        x = self.embed(tokens)  # (T, C)
        residual = torch.zeros_like(x)
        outputs: dict[int, torch.Tensor] = {}
        for i, layer_id in enumerate(layer_ids):
            x, residual = self._block(self.layers[layer_id], x, residual, cos, sin, attn_bias, slots, cache[i], kv_len)
            if layer_id in taps:  # the stream is residual + x (the add is pending, fused into the next norm)
                outputs[layer_id] = residual + x
        hidden = self._add_norm(self.norm, x, residual)[0]
        if not taps:
            return hidden
        return hidden, torch.cat([outputs[i] for i in taps], -1)  # (T, C), (T, len(taps) * C)

    def tensor_parallel(self, tp) -> None:
        """This model holds one rank's slices (`paradec.runners.native.tp.shard_state`): all-reduce the row-parallel
        projections' outputs and the vocabulary-parallel embedding's lookups over `tp`'s group, and all-gather the
        LM head's slices of the logits (`logits`). The embedding and the head hold rows [r*V', (r+1)*V')."""
        rows, vocab = self.embed.num_embeddings, self.args.vocab_size
        if rows != -(-vocab // tp.world):
            raise ParadecError(
                f"a tensor-parallel model of {tp.world} ranks holds ceil({vocab} / {tp.world}) = "
                f"{-(-vocab // tp.world)} rows of the embedding, this one {rows} (build it with vocab_rows)"
            )
        self.tp = tp
        self.embed.tp, self.embed.offset = tp, tp.rank * rows
        self._gathered.clear()
        for block in self.layers:
            block.attention.tp = block.mlp.tp = tp

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head this model holds, [V, C] (the embedding when tied); a tensor-parallel rank's rows [V', C]."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def full_embed_weight(self) -> torch.Tensor:
        """The whole embedding [V, C]: the model's own, or on a tensor-parallel rank every rank's rows gathered on
        the first call and kept (a V x C copy per rank; a collective, so every rank calls it)."""
        return self._full("embed", self.embed.weight)

    def full_output_weight(self) -> torch.Tensor:
        """The whole LM head [V, C] (the embedding when tied), gathered and kept as `full_embed_weight`."""
        return self.full_embed_weight() if self.lm_head is None else self._full("lm_head", self.lm_head.weight)

    def _full(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return weight
        if name not in self._gathered:
            self._gathered[name] = self.tp.gather_rows(weight, self.args.vocab_size)
        return self._gathered[name]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (T, V) in the model dtype. A tensor-parallel rank computes its V' columns and all-gathers
        them: every rank returns the full logits, the padded columns dropped."""
        weight = self.output_weight
        out = kernels.linear(hidden, weight) if self.exact else F.linear(hidden, weight)
        return out if self.tp is None else self.tp.gather_columns(out, self.args.vocab_size)


# --- Ragged forwards over B sequences (`paradec.runners.native.batch`) ------------------------------------------
#
# The same weights and the same ops as `Transformer.forward`, over the flat inputs of B sequences back to back
# (`paradec.step.Step`): every row-wise op (embedding, q/k/v, norms, rope, MLP, LM head) runs on the flat [N] rows
# unpadded; only attention runs per sequence, in a padded-query layout over a cache of B slots (see
# `ragged_attention`). Nothing above this line calls these functions.


@dataclass(frozen=True)
class RaggedLayout:
    """Where the N flat inputs of a ragged forward over B sequences go (tensors on the device, built by the caller).

    Flat input i is input j of sequence b: `rows[i] = b * n_max + j` is its row in the padded-query layout, and
    (`slots[i]`, `columns[i]`) = (the sequence's cache slot, its committed length + j) is the cache entry its keys
    and values go to. `bias` is `ragged_attention_bias`'s; keys and values are read from columns [0, kv_len) of the
    slots `seq_slots` (`slot_range`: those slots when they are consecutive, read as a view instead of a gather).

    A bucketed forward (`paradec.runners.native.graphs.StaticRagged`) pads the flat inputs: a padding input writes
    its query to one of `spare_rows` rows past the B * n_max real ones (nothing reads them), its keys/values to a
    scratch slot, and reads its output from any row (`out_rows`: the rows outputs are read from, default `rows`).
    """

    rows: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64
    columns: torch.Tensor  # [N] int64
    seq_slots: torch.Tensor  # [B] int64
    bias: torch.Tensor  # [B, 1, group * n_max, kv_len] additive (exact mode: ragged_forward packs it)
    n_max: int
    kv_len: int
    slot_range: tuple[int, int] | None = None  # (first, end) when seq_slots is range(first, end)
    out_rows: torch.Tensor | None = None  # [N] int64, default `rows`
    spare_rows: int = 0


def ragged_index(sizes: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the n flat inputs of sequences of `sizes` [B] (host int64): each input's sequence and its index within
    it, both [n] (the host side of a `RaggedLayout`)."""
    seq_of = torch.repeat_interleave(torch.arange(sizes.shape[0]), sizes, output_size=n)
    return seq_of, torch.arange(n) - (sizes.cumsum(0) - sizes)[seq_of]


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin (N, 1, hs) of inputs at `positions` [N] int64: `step_inputs`' ops, per-input start."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (N, hs/2) float32
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def ragged_attention_bias(
    starts: torch.Tensor,  # [B] int64: committed length of each sequence's slot
    sizes: torch.Tensor,  # [B] int64: inputs of each sequence
    masks: torch.Tensor,  # [B, n_max, n_max] bool: each sequence's tree mask, padded
    kv_len: int,
    group: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive bias (B, 1, g*n_max, kv) of a ragged forward, `step_inputs`' rule per sequence.

    Row j of sequence b (j < sizes[b]) sees the slot's committed columns [0, starts[b]), itself, and the provisional
    inputs k <= j that masks[b, j, k] allows (column starts[b] + k). A padded row (j >= sizes[b]) sees column 0
    only, so that no softmax row is all -inf; its output is dropped.
    """
    B, n_max = masks.shape[0], masks.shape[1]
    device = masks.device
    row = torch.arange(n_max, device=device)[None, :, None]  # (1, n, 1)
    column = torch.arange(kv_len, device=device)
    rel = column[None, :] - starts[:, None]  # (B, kv): provisional input index of each column
    in_tree = masks.gather(2, rel.clamp(0, n_max - 1)[:, None, :].expand(B, n_max, kv_len))  # (B, n, kv)
    rel = rel[:, None, :]  # (B, 1, kv)
    own = (rel >= 0) & (rel <= row)
    allowed = (rel < 0) | (own & (in_tree | (rel == row)))
    real = row < sizes[:, None, None]  # (B, n, 1)
    allowed = torch.where(real, allowed, (column == 0)[None, None, :])
    bias = torch.zeros(B, n_max, kv_len, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return bias.repeat(1, group, 1)[:, None]  # row g * n_max + j, as the batch-1 layout's g * T + t


def ragged_attention(
    attn: Attention,
    x: torch.Tensor,  # (N, C) flat inputs of B sequences
    cos: torch.Tensor,  # (N, 1, hs)
    sin: torch.Tensor,  # (N, 1, hs)
    layout: RaggedLayout,
    cache: torch.Tensor,  # (2, slots, nkv, S, hs) this layer's keys and values
) -> torch.Tensor:
    """`Attention.forward` over B sequences: projections, norms and rope on the flat rows (the same ops), keys and
    values written to (slot, column) pairs, then one SDPA over [B, nkv, g*n_max, hs] padded queries against each
    sequence's own slot, and the real rows gathered back to flat order."""
    N = x.shape[0]
    n_kv_heads, head_dim = cache.shape[2], cache.shape[4]
    n_heads = (attn.wqkv.out_features - 2 * n_kv_heads * head_dim) // head_dim
    group = n_heads // n_kv_heads
    B, n_max, kv_len = layout.seq_slots.shape[0], layout.n_max, layout.kv_len
    qk, v = project(attn.wqkv, x, attn.exact).split([(n_heads + n_kv_heads) * head_dim, n_kv_heads * head_dim], dim=-1)
    qk = qk.view(N, n_heads + n_kv_heads, head_dim)
    v = v.view(N, n_kv_heads, head_dim)
    if attn.q_norm is not None:
        qk = torch.cat((attn.q_norm(qk[:, :n_heads]), attn.k_norm(qk[:, n_heads:])), dim=1)
    qk = rotate(qk, cos, sin, attn.exact)
    q, k = qk[:, :n_heads], qk[:, n_heads:]  # (N, nh, hs), (N, nkv, hs)
    # one scatter into the layer's cache tensor itself, indexed by (kind, slot, head, column): written through a
    # view of it (a permute), the compiled block copied every slot's cache of the layer twice per step (at batch 32
    # on the 1.5B, 19 of the step's 32 ms on an H200: bench/results/profile-batch-h200-2026-12-02)
    kinds = torch.arange(2, device=cache.device)[:, None, None]
    heads = torch.arange(n_kv_heads, device=cache.device)[None, None, :]
    where = (kinds, layout.slots[None, :, None], heads, layout.columns[None, :, None])  # each broadcast to (2, N, nkv)
    cache.index_put_(where, torch.stack((k, v)))  # (2, N, nkv, hs)
    if layout.slot_range is not None:
        first, end = layout.slot_range
        kv = cache[:, first:end, :, :kv_len]  # (2, B, nkv, kv, hs), a view
    else:
        kv = cache[:, :, :, :kv_len].index_select(1, layout.seq_slots)  # (2, B, nkv, kv, hs), a gather
    # GQA as in the batch-1 layout: the `group` query heads of a KV head are extra query rows, row g*n_max + j
    padded = q.new_zeros(B * n_max + layout.spare_rows, n_kv_heads, group, head_dim)
    padded.index_copy_(0, layout.rows, q.reshape(N, n_kv_heads, group, head_dim))
    q = padded[: B * n_max].view(B, n_max, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(B, n_kv_heads, group * n_max, head_dim)
    y = attend(attn, q, kv[0], kv[1], layout.bias)  # (B, nkv, g*n_max, hs)
    y = y.view(B, n_kv_heads, group, n_max, head_dim).permute(0, 3, 1, 2, 4).reshape(B * n_max, n_heads * head_dim)
    out_rows = layout.rows if layout.out_rows is None else layout.out_rows
    return reduce_partial(attn, project(attn.wo, y.index_select(0, out_rows), attn.exact))


def ragged_block(block: Block, x, residual, cos, sin, layout: RaggedLayout, cache: torch.Tensor):
    """`Block.forward` with `ragged_attention`."""
    h, residual = add_norm(block.attention_norm, x, residual)
    h, residual = add_norm(block.mlp_norm, ragged_attention(block.attention, h, cos, sin, layout, cache), residual)
    return block.mlp(h), residual


def ragged_forward(
    model: Transformer,
    tokens: torch.Tensor,  # (N,) int64: B sequences' inputs back to back
    positions: torch.Tensor,  # (N,) int64: committed length of the input's slot + its depth
    layout: RaggedLayout,
    cache: torch.Tensor,  # (L, 2, slots, nkv, S, hs), every layer of the model
    taps: tuple[int, ...] = (),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`Transformer.forward` over B sequences (every layer; each block through torch.compile(dynamic=True) when the
    model is compiled, else eagerly): the last hidden state after the final norm, (N, C), and with `taps` also those
    layers' outputs, (N, len(taps) * C), rows in flat order."""
    cos, sin = rope_tables(model.inv_freq, positions, model.embed.weight.dtype)
    if model.exact:  # each input's visible columns, packed (`paradec.kernels.flash`), once for every layer
        layout = replace(layout, bias=kernels.visible_columns(layout.bias[:, :, : layout.n_max]))
    x = model.embed(tokens)  # (N, C)
    residual = torch.zeros_like(x)
    outputs: dict[int, torch.Tensor] = {}
    for layer_id, block in enumerate(model.layers):
        x, residual = model._ragged_block(block, x, residual, cos, sin, layout, cache[layer_id])
        if layer_id in taps:
            outputs[layer_id] = residual + x
    hidden = add_norm(model.norm, x, residual)[0]
    if not taps:
        return hidden
    return hidden, torch.cat([outputs[i] for i in taps], -1)
