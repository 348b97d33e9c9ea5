"""A random-weight Hugging Face checkpoint of one of `bench_runner.py`'s shapes, with a real tokenizer, for benches
that load a model directory (`paradec bench --tensor-parallel 2 --model DIR`): e.g. the 8B shape with the
Qwen2.5 tokenizer of a zoo model. The vocabulary grows to hold the tokenizer's ids.

    python3 scripts/make_random_checkpoint.py --shape 8b --tokenizer ~/.cache/paradec/models/qwen2.5-coder-1.5b-instruct \
        --out /tmp/random-8b --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import SHAPES, llama_config

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model directory whose tokenizer to copy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--max-positions", type=int, default=4096)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = llama_config(args.shape, args.max_positions)
    config.vocab_size = max(config.vocab_size, -(-len(tokenizer) // 64) * 64)
    eos = tokenizer.eos_token_id
    config.eos_token_id, config.bos_token_id, config.pad_token_id = eos, tokenizer.bos_token_id or eos, eos
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {args.shape} shape, vocabulary {config.vocab_size}, {params / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
