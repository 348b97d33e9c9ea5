"""Zoo presets: the shapes, training plans and data settings of each target/draft pair.

- `tiny`  the committed code pair `code-8m` (fp16): target <= 10M parameters, draft <= 2M, vocabulary 8192.
- `bench` the pair GPU benchmarks measure: a ~115M target and a ~6M draft, vocabulary 16384, context 2048.

Step counts come from throughput measured on an H200 (tiny target 3.7M tokens/s, bench target 0.56M tokens/s,
bf16, compiled): the tiny pair trains in about 2.5 minutes and the bench pair in about 4.5. Five minutes cannot
train a 115M model to convergence, so the bench target gets 90% of the time and small batches (more steps per
token), and its draft is kept small (2 layers, 65M tokens); a draft trained for as long as the target would match
it on validation loss.

A preset is a frozen dataclass; its `config_hash` names the cache directory `<preset>-<hash>`, so changing any
field (a `--seconds` budget included) builds a new pair instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from paradec.errors import ParadecError
from paradec.zoo.tokenizer import SPLIT_PATTERN


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self, vocab_size: int) -> int:
        """Exact parameter count of the Llama model this shape builds (embeddings counted once when tied)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + h


@dataclass(frozen=True)
class TrainPlan:
    steps: int  # optimizer steps when no time budget is given
    batch_tokens: int  # tokens per optimizer step
    micro_batch: int  # sequences per forward/backward (gradient accumulation makes up the rest)
    lr: float  # peak learning rate
    warmup_steps: int
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    time_share: float = 0.5  # this model's share of a --seconds budget


@dataclass(frozen=True)
class Preset:
    name: str
    vocab_size: int
    context: int  # training sequence length = max_position_embeddings
    target: ModelShape
    draft: ModelShape
    target_plan: TrainPlan
    draft_plan: TrainPlan
    save_dtype: str  # "float16" | "bfloat16" | "float32"
    max_corpus_chars: int = 600_000_000
    val_per_mille: int = 20
    tokenizer_sample_chars: int = 64_000_000
    split_pattern: str = SPLIT_PATTERN  # BPE pre-tokenization regex
    val_tokens: int = 2_000_000  # validation tokens scored for the card's loss
    loop_new_tokens: int = 256  # greedy continuation length for the repetition-loop rate
    loop_batch: int = 32
    rope_theta: float = 10000.0
    seed: int = 0
    seconds: float | None = None  # total training time budget (target + draft); None = the plans' fixed steps

    def config_hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def with_options(self, *, seconds: float | None = None, seed: int | None = None) -> Preset:
        return dataclasses.replace(self, seconds=seconds, seed=self.seed if seed is None else seed)


TINY = Preset(
    name="tiny",
    vocab_size=8192,
    context=1024,
    target=ModelShape(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=704),
    draft=ModelShape(hidden_size=128, num_layers=3, num_heads=2, num_kv_heads=2, intermediate_size=384),
    target_plan=TrainPlan(steps=1500, batch_tokens=262_144, micro_batch=128, lr=2e-3, warmup_steps=50, time_share=0.8),
    draft_plan=TrainPlan(steps=1000, batch_tokens=262_144, micro_batch=256, lr=3e-3, warmup_steps=30, time_share=0.2),
    save_dtype="float16",
    loop_batch=128,
)

BENCH = Preset(
    name="bench",
    vocab_size=16384,
    context=2048,
    target=ModelShape(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2560, tie_embeddings=False
    ),
    draft=ModelShape(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=768),
    target_plan=TrainPlan(steps=2000, batch_tokens=65_536, micro_batch=32, lr=1.5e-3, warmup_steps=100, time_share=0.9),
    draft_plan=TrainPlan(steps=500, batch_tokens=131_072, micro_batch=64, lr=2e-3, warmup_steps=30, time_share=0.1),
    save_dtype="bfloat16",
    loop_batch=64,
)

PRESETS = {p.name: p for p in (TINY, BENCH)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ParadecError(f"unknown zoo preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
