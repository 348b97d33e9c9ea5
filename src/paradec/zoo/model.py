"""The zoo's training module: a Llama decoder written for fast training, saved as a plain `LlamaForCausalLM`.

The module tree and parameter names mirror `transformers`' LlamaForCausalLM (`model.layers.0.self_attn.q_proj`,
...), so the state dict *is* a Llama checkpoint. The math matches it too (RMSNorm in float32, rotate-half RoPE,
SwiGLU MLP, grouped-query attention), which a test checks by comparing logits with the `transformers` model loaded
from the saved directory. Training-only choices live here: SDPA with `is_causal`, no KV cache, GPT-2 style init
(output projections scaled by 1/sqrt(2 * layers)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from paradec.zoo.presets import ModelShape
from paradec.zoo.tokenizer import EOT_ID

if TYPE_CHECKING:
    from transformers import LlamaConfig

from paradec.layers import RMSNorm, inv_frequencies, rotate_half

RMS_EPS = 1e-5
INIT_STD = 0.02


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim): frequencies repeated for both halves, as Llama's rotate-half wants."""
    inv_freq = inv_frequencies(head_dim, theta)  # (hs/2,)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos/sin (T, hs)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        h, hs = shape.hidden_size, shape.head_dim
        self.n_head, self.n_kv_head, self.head_dim = shape.num_heads, shape.num_kv_heads, hs
        self.q_proj = nn.Linear(h, shape.num_heads * hs, bias=False)
        self.k_proj = nn.Linear(h, shape.num_kv_heads * hs, bias=False)
        self.v_proj = nn.Linear(h, shape.num_kv_heads * hs, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * hs, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:
            # query head i reads kv head i // group, as in transformers' repeat_kv
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, RMS_EPS)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, RMS_EPS)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, shape: ModelShape, vocab_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, RMS_EPS)


class ZooLlama(nn.Module):
    """Llama decoder for training; `hidden` -> `logits` is split so the trainer can compile the loss on its own."""

    def __init__(self, shape: ModelShape, vocab_size: int, context: int, rope_theta: float) -> None:
        super().__init__()
        self.shape, self.vocab_size, self.context, self.rope_theta = shape, vocab_size, context, rope_theta
        self.model = Backbone(shape, vocab_size)
        self.lm_head = nn.Linear(shape.hidden_size, vocab_size, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(shape.head_dim, context, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = INIT_STD / math.sqrt(2 * self.shape.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            elif p.dim() == 2:
                nn.init.normal_(p, std=INIT_STD)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> final-normed hidden states (B, T, H)."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)  # (B, T, H)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V)."""
        return self.lm_head(self.hidden(idx))


def lm_loss(model: ZooLlama, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of hidden (B, T, H) against targets (B, T)."""
    logits = model.lm_head(hidden)  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def llama_config(shape: ModelShape, vocab_size: int, context: int, rope_theta: float, dtype: str) -> LlamaConfig:
    """The `transformers.LlamaConfig` of a zoo model (plain Llama: loadable with no paradec code)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=context,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=shape.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=INIT_STD,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def save_hf(model: ZooLlama, out_dir: Path, dtype: str) -> None:
    """Write config.json, generation_config.json and model.safetensors (weights cast to `dtype`)."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    llama_config(model.shape, model.vocab_size, model.context, model.rope_theta, dtype).save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID).save_pretrained(str(out_dir))
    torch_dtype = getattr(torch, dtype)
    tensors = {
        name: p.detach().to(device="cpu", dtype=torch_dtype).contiguous()
        for name, p in model.state_dict().items()
        if not (model.shape.tie_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
