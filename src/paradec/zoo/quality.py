"""How a saved zoo model behaves under greedy decoding: continuations and the repetition-loop rate.

Greedy decoding of small code LMs falls into verbatim loops (the same lines again and again). Loops inflate the
acceptance of every speculative method, so each card reports how often they happen on the dev prompts.

Definition: a greedy continuation of `new_tokens` tokens is a *verbatim loop* when its last `LOOP_TAIL` tokens
equal the `LOOP_TAIL` tokens `p` positions earlier, for some period `1 <= p <= LOOP_MAX_PERIOD`. A continuation
that stops at end-of-text before `LOOP_TAIL + LOOP_MAX_PERIOD` tokens is not a loop.

Everything here goes through `transformers` Auto classes on the saved directory, which also proves the checkpoint
loads with no paradec code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

LOOP_TAIL = 64
LOOP_MAX_PERIOD = 128
LOOP_DEFINITION = (
    f"greedy continuation whose last {LOOP_TAIL} tokens repeat verbatim the {LOOP_TAIL} tokens p positions "
    f"earlier, for some period 1 <= p <= {LOOP_MAX_PERIOD}"
)


def is_verbatim_loop(tokens: Sequence[int], tail: int = LOOP_TAIL, max_period: int = LOOP_MAX_PERIOD) -> bool:
    n = len(tokens)
    if n < tail + max_period:
        return False
    end = list(tokens[n - tail :])
    return any(list(tokens[n - tail - p : n - p]) == end for p in range(1, max_period + 1))


@torch.no_grad()
def greedy_continuations(
    model_dir: Path,
    prompts: Sequence[str],
    *,
    new_tokens: int,
    device: str | torch.device,
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations (new token ids, cut after end-of-text) of each prompt, batched with left padding.

    Prompts are cut from the left to leave room for `new_tokens` inside the model's context.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    room = model.config.max_position_embeddings - new_tokens
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p, verbose=False)["input_ids"][-room:] for p in prompts]
    out: list[list[int]] = []
    batches = range(0, len(encoded), batch_size)
    for i in tqdm(batches, desc=f"greedy {model_dir.name}", unit="batch", disable=not progress):
        batch = encoded[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def loop_rate(continuations: Sequence[Sequence[int]]) -> float:
    return sum(map(is_verbatim_loop, continuations)) / max(1, len(continuations))
