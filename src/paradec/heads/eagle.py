"""The EAGLE-style feature head (Li et al. 2024): one decoder layer that extrapolates the target's hidden states.

Entry t of the head reads the pair (token x_{t+1}, feature g_t) where g_t is the target's feature at position t or,
deeper in a draft, the head's own prediction of it. The target's feature is its last hidden state (after its final
norm) for an EAGLE-1/2 head (`feature_layers` None), or for an EAGLE-3 head the fusion of three of its layers:

    g_t    = fc_fuse([h_low, h_mid, h_high])                    [3H] -> [H]  (`fuse`; layer outputs, before any norm)

    u_t    = fc([norm_e(embed(x_{t+1})), norm_g(g_t)])          [2H] -> [H]
    ĥ_t+1  = u_t + Attn(norm(u_t)) + MLP(...)                   one pre-norm Llama-style layer (RoPE, SwiGLU)
    logits = lm_head(ĥ_t+1)                                     a guess at x_{t+2}

The token embedding is the target's own (shared, frozen). The LM head is the target's too (shared, frozen: logits
over its whole vocabulary V), unless the head has a reduced draft vocabulary (`draft_vocab_size` N, as in EAGLE-3):
then it owns a small LM head [N, H], trained, initialised from the target's rows of its N tokens, and a buffer
`d2t` [N] int64 (draft id -> target id, most frequent first) saved with it. Its logits are over the N draft ids;
the drafter maps the ids it picks through `d2t`, so what leaves the head is always target ids. Entry t sits at
position t and attends causally to earlier entries, which at decode time live in a small KV cache of the head's
own (owned by the `eagle` drafter).

An EAGLE-3 head's predictions ĥ live in its own feature space (where `fc_fuse` maps the target's layers), not in the
target's: they feed the next draft level and the head's LM head, and training scores them by their logits only.

`forward` serves training (batches of whole sequences, several unrolled passes whose keys are concatenated);
decoding calls its two halves, `project` and `attend`, around writing the new keys into a preallocated cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from paradec.errors import ParadecError
from paradec.layers import RMSNorm, apply_rope, inv_frequencies


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    draft_vocab_size: int | None = None  # N draft ids (a `d2t` map to target ids); None: the target's whole vocabulary
    # target decoder layers whose outputs are fused into the head's feature (EAGLE-3; `default_feature_layers`);
    # None: the target's last hidden state after its final norm (EAGLE-1/2)
    feature_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParadecError(f"EAGLE head {name} must be an integer >= 1, got {value!r}")
        if self.head_dim % 2:
            raise ParadecError(f"EAGLE head head_dim must be even (rotary embeddings), got {self.head_dim}")
        n = self.draft_vocab_size
        if n is not None and not (isinstance(n, int) and 1 <= n <= self.vocab_size):
            raise ParadecError(
                f"EAGLE head draft_vocab_size must be an integer in [1, {self.vocab_size}] (the vocabulary) or "
                f"none, got {n!r}"
            )
        layers = self.feature_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ParadecError(f"EAGLE head feature_layers must be a non-empty list of layers, got {layers!r}")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ParadecError(f"EAGLE head feature_layers must be layer indices >= 0, got {list(layers)}")
            object.__setattr__(self, "feature_layers", tuple(layers))  # a list when read from config.json

    @staticmethod
    def for_target(
        hidden_size: int,
        vocab_size: int,
        *,
        intermediate_size: int | None = None,
        draft_vocab_size: int | None = None,
        feature_layers: tuple[int, ...] | None = None,
    ) -> EagleConfig:
        """A layer of the target's width: heads of 64 dimensions (fewer heads for narrow targets), MLP ~2.75x."""
        num_heads = max(1, hidden_size // 64)
        while hidden_size % num_heads:
            num_heads -= 1
        return EagleConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_heads=num_heads,
            head_dim=hidden_size // num_heads,
            intermediate_size=intermediate_size or 64 * -(-(11 * hidden_size // 4) // 64),
            draft_vocab_size=draft_vocab_size,
            feature_layers=feature_layers,
        )

    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads: H, or len(feature_layers) * H fused."""
        return self.hidden_size * (1 if self.feature_layers is None else len(self.feature_layers))

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        if self.feature_layers is not None:
            out["feature_layers"] = list(self.feature_layers)
        return out


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers of a target of `num_layers` decoder layers, as layer outputs.

    EAGLE-3's code (and vLLM's and SpecForge's) records the residual stream entering layers 2, L // 2 and L - 3, that
    is the outputs of layers 1, L // 2 - 1 and L - 4: early enough to still carry the current token's identity,
    mid-way for the context, and close to the top (not the last layer, whose output the final norm turns into the
    next-token prediction, which the LM head already gives). SmolLM2-135M (30 layers): (1, 14, 26);
    Qwen2.5-1.5B (28): (1, 13, 24). Clamped into [0, L - 2] for tiny targets (the last layer's output before the
    norm is not one `transformers` hands out), keeping low <= middle <= high (2 layers: (0, 0, 0))."""
    top = max(num_layers - 2, 0)
    low = min(1, top)
    middle = min(max(low, num_layers // 2 - 1), top)
    return low, middle, min(max(middle, num_layers - 4), top)


def check_draft_map(d2t: torch.Tensor, config: EagleConfig, where: str) -> None:
    """Raise unless `d2t` is a draft -> target id map for `config`: [draft_vocab_size] distinct ids in [0, V)."""
    n, vocab = config.draft_vocab_size, config.vocab_size
    if d2t.shape != (n,) or d2t.dtype != torch.int64:
        raise ParadecError(
            f"{where}: the draft -> target id map must be [{n}] int64, got {list(d2t.shape)} {d2t.dtype}"
        )
    if n and not (int(d2t.min()) >= 0 and int(d2t.max()) < vocab and d2t.unique().numel() == n):
        raise ParadecError(f"{where}: the draft -> target id map must hold {n} distinct target ids in [0, {vocab})")


class EagleHead(nn.Module):
    kind = "eagle"
    config_class = EagleConfig

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        self.config = config
        h, nh, hd, inter = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
        self.embed_norm = RMSNorm(h, config.norm_eps)
        self.feature_norm = RMSNorm(h, config.norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        # EAGLE-3: the target's fused layers [k * H] -> a feature [H]; absent from EAGLE-1/2 heads (old files load)
        self.fc_fuse = None if config.feature_layers is None else nn.Linear(config.feature_size, h, bias=False)
        self.attn_norm = RMSNorm(h, config.norm_eps)
        self.qkv = nn.Linear(h, 3 * nh * hd, bias=False)
        self.o = nn.Linear(nh * hd, h, bias=False)
        self.mlp_norm = RMSNorm(h, config.norm_eps)
        self.gate_up = nn.Linear(h, 2 * inter, bias=False)
        self.down = nn.Linear(inter, h, bias=False)
        n = config.draft_vocab_size
        # a reduced draft vocabulary: its own LM head and the draft -> target id map (set by `init_draft_vocab` or
        # loading); without one, logits come from the target's LM head and ids are target ids (d2t None)
        self.lm_head = None if n is None else nn.Linear(h, n, bias=False)
        self.register_buffer("d2t", None if n is None else torch.arange(n))

    def init_draft_vocab(self, d2t: torch.Tensor, target_lm_head: torch.Tensor) -> None:
        """Set the draft vocabulary: `d2t` [N] (draft id -> target id) and the LM head's rows copied from the target's
        LM head [V, H] at those ids (the start of training)."""
        check_draft_map(d2t, self.config, "the given draft vocabulary")
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.lm_head.weight.copy_(target_lm_head[d2t.to(target_lm_head.device)])

    def logits_weight(self, target_lm_head: torch.Tensor) -> torch.Tensor:
        """The LM head the head's logits read: its own [N, H], or the target's [V, H] (full vocabulary)."""
        return target_lm_head if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor, target_lm_head: torch.Tensor) -> torch.Tensor:
        """Predicted hidden states [..., H] -> logits over the draft ids [..., N] (target ids [..., V] if full)."""
        return hidden @ self.logits_weight(target_lm_head).t()

    def target_rows(self, target_lm_head: torch.Tensor) -> torch.Tensor:
        """The target's LM-head rows of the draft ids [N, H], in draft-id order (the whole LM head if full): the
        target's logits restricted to the draft vocabulary are `f @ target_rows.t()`."""
        return target_lm_head if self.d2t is None else target_lm_head[self.d2t]

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [..., k * H] -> the head's feature space [..., H] (identity for an EAGLE-1/2 head,
        whose target feature is already the last hidden state). Only real target features pass here; deeper draft
        levels feed the head's own predictions, already [..., H]."""
        return features if self.fc_fuse is None else self.fc_fuse(features)

    def inputs(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(token embeddings [..., H], features [..., H]) -> layer inputs u [..., H]."""
        return self.fc(torch.cat([self.embed_norm(embeds), self.feature_norm(features)], -1))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, hd]. Angles in float32 whatever the weights' dtype (not a buffer, which
        `.to(dtype)` would round)."""
        hd = self.config.head_dim
        inv_freq = inv_frequencies(hd, self.config.rope_theta, positions.device)
        angles = positions.float()[:, None] * inv_freq  # (T, hd/2)
        angles = torch.cat([angles, angles], -1)  # (T, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer inputs (B, T, H) at positions (T,), or per row (B, T) -> rotated queries, keys and values
        (B, nh, T, hd)."""
        B, T, _ = x.shape
        nh, hd = self.config.num_heads, self.config.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        cos, sin = self.rope(positions.reshape(-1), q.dtype)  # (T or B * T, hd)
        if positions.dim() == 2:
            cos, sin = cos.view(B, 1, T, hd), sin.view(B, 1, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self,
        x: torch.Tensor,  # (B, T, H) layer inputs
        q: torch.Tensor,  # (B, nh, T, hd)
        keys: torch.Tensor,  # (B, nh, S, hd)
        values: torch.Tensor,  # (B, nh, S, hd)
        mask: torch.Tensor,  # (T, S) bool: True where query t may attend to key s
        attention: Callable = nn.functional.scaled_dot_product_attention,  # (q, keys, values, attn_mask=)
    ) -> torch.Tensor:
        """The rest of the layer: attention over (keys, values), output projection and MLP -> (B, T, H)."""
        B, T, _ = x.shape
        att = attention(q, keys, values, attn_mask=mask)  # (B, nh, T, hd)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H) layer inputs from `inputs`
        positions: torch.Tensor,  # (T,) int64
        mask: torch.Tensor,  # (T, S + T) bool: True where query t may attend to key s (past keys first)
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # keys, values (B, nh, S, hd)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predicted next features (B, T, H), and this call's keys and values (B, nh, T, hd) for later queries."""
        q, k, v = self.project(x, positions)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        return self.attend(x, q, keys, values, mask), k, v
