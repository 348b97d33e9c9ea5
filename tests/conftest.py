"""Shared fixtures: tiny random-weight models of several architectures with a small byte-level BPE tokenizer.

Models are built from configs (no hub), saved once per test session in Hugging Face format, and loaded by path
exactly as a user would. A large `initializer_range` makes the logits well separated, so greedy decoding has no
near-ties that float rounding could flip between a 1-token and an n-token forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the models are tiny: threads cost more than they bring, and CI has 2 cores

CORPUS = (
    '''
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


def read_lines(path):
    with open(path) as handle:
        return [line.rstrip("\\n") for line in handle]
'''
    * 4
    + "The quick brown fox jumps over the lazy dog. " * 8
)


def build_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


ARCHS = ("llama", "qwen2", "gpt2")


def make_config(arch: str, vocab_size: int, *, layers: int = 2, hidden: int = 64, seed_range: float = 0.2):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, eos_token_id=0, bos_token_id=0, initializer_range=seed_range)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
        **common,
    )


def save_model(config, out: Path, tokenizer_dir: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    for name in tokenizer_dir.iterdir():
        (out / name.name).write_bytes(name.read_bytes())
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir, vocab_size) -> dict[str, Path]:
    """arch -> target checkpoint dir; plus '<arch>-draft' (a different, 1-layer random model)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, arch in enumerate(ARCHS):
        out[arch] = save_model(make_config(arch, vocab_size), root / arch, tokenizer_dir, seed=100 + i)
        out[f"{arch}-draft"] = save_model(
            make_config(arch, vocab_size, layers=1, hidden=32), root / f"{arch}-draft", tokenizer_dir, seed=200 + i
        )
    return out


@pytest.fixture(scope="session")
def loop_dirs(tmp_path_factory, tokenizer_dir, vocab_size) -> dict[str, Path]:
    """arch -> a target whose attention output is zeroed: its next token depends on the current token only, so
    greedy decoding falls into a short cycle and prompt lookup gets most drafts accepted."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("loops")
    out = {}
    for i, arch in enumerate(ARCHS):
        path = save_model(make_config(arch, vocab_size), root / arch, tokenizer_dir, seed=300 + i)
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(
                    ("o_proj.weight", "o_proj.bias", "attn.c_proj.weight", "attn.c_proj.bias", "wpe.weight")
                ):
                    param.zero_()
        model.save_pretrained(path)
        out[arch] = path
    return out


@pytest.fixture(scope="session")
def checkpoints(model_dirs, loop_dirs) -> dict[str, Path]:
    """Every test checkpoint by name: an arch, '<arch>-draft', or 'loop-<arch>'."""
    return {**model_dirs, **{f"loop-{arch}": path for arch, path in loop_dirs.items()}}


@pytest.fixture(scope="session")
def engines(checkpoints):
    """`engines(target, draft=None, runner="hf")`: a loaded paradec Engine, cached per session."""
    import paradec

    cache = {}

    def get(target: str, draft: str | None = None, *, runner: str = "hf"):
        key = (target, draft, runner)
        if key not in cache:
            cache[key] = paradec.load(checkpoints[target], None if draft is None else checkpoints[draft], runner=runner)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """Loaded `transformers` models (fp32, eval) for reference generation, cached per session
    (names: an arch, '<arch>-draft', or 'loop-<arch>')."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
        return cache[name]

    return get


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = 0) -> list[int]:
    """Reference: `transformers` greedy generate, new tokens only."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))
