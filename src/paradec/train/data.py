"""Training data made by the target itself (self-distillation).

Drafters must learn the *target's* distribution, not the corpus': the data are token windows cut from text
(prompts), continued by the target's own greedy (or sampled) decoding, plus the target's last hidden state at
every position. The target's next-token distribution at position t is softmax(lm_head(f_t)), so storing the
hidden states f [N, T, H] is enough to recover every soft label without keeping [N, T, V] logits around.

Text sources: `--data FILE` (a .jsonl file whose records carry a "text" or "prompt" field, or any text file, cut
into chunks), or by default the Python source on this machine read by the zoo's corpus reader. Validation texts
are held out by content hash (the zoo's rule), so with the default corpus they are the zoo's validation files.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from paradec.errors import ParadecError

TEXT_CHUNK_CHARS = 4000  # plain text files are cut into chunks of about this size
VAL_PER_MILLE = 50  # share of --data records held out for validation (by content hash)


@dataclass
class TextSource:
    train: list[str]
    val: list[str]
    description: str


@dataclass
class DistillData:
    """Token windows and the target's hidden states over them (on the training device)."""

    tokens: torch.Tensor  # [N, T] int64
    valid: torch.Tensor  # [N, T] bool: real tokens (False after an end-of-text the target emitted)
    features: torch.Tensor  # [N, T, H] the target's last hidden states (after its final norm), target dtype
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _held_out(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 1000 < VAL_PER_MILLE


def _chunks(text: str) -> list[str]:
    """Cut `text` at line ends into pieces of about TEXT_CHUNK_CHARS characters."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= TEXT_CHUNK_CHARS:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def read_texts(data: Path | None, *, max_corpus_chars: int = 40_000_000, progress: bool = True) -> TextSource:
    """Training and validation texts from `data` (see the module docstring), or from the machine's Python corpus."""
    if data is None:
        from paradec.zoo.corpus import load_corpus

        corpus = load_corpus(max_chars=max_corpus_chars, progress=progress)
        return TextSource(
            [f.text for f in corpus.train],
            [f.text for f in corpus.val],
            f"python corpus of this machine ({corpus.stats['files']} files, {corpus.stats['chars']} chars)",
        )
    path = Path(data)
    if not path.is_file():
        raise ParadecError(f"data file {str(data)!r} does not exist")
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read data file {str(data)!r}: {exc}") from exc
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record.get("text") or record["prompt"]))
            except (ValueError, KeyError, AttributeError) as exc:
                raise ParadecError(
                    f"{str(data)!r} line {number}: expected a JSON object with a 'text' or 'prompt'"
                ) from exc
    else:
        texts = _chunks(raw)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ParadecError(f"data file {str(data)!r} holds no text")
    val = [t for t in texts if _held_out(t)]
    train = [t for t in texts if not _held_out(t)]
    if not val:  # tiny files: hold out the last text, unless it is the only one
        val = train[-1:]
        train = train[:-1] or train
    return TextSource(train, val, f"{path.name} ({len(texts)} texts, {len(raw)} chars)")


def make_windows(tokenizer, texts: list[str], count: int, length: int, *, seed: int) -> torch.Tensor:
    """Up to `count` windows of `length` tokens, spread over the texts: visiting them in a seeded order, each text
    (followed by end-of-text) gives up to ceil(count / texts) of its non-overlapping windows, picked at random;
    texts shorter than a window are joined until they fill one. An error if not even one window fits."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    per_text = -(-count // max(1, len(texts)))
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    windows: list[list[int]] = []
    carry: list[int] = []
    for start in range(0, len(order), 64):
        batch = [texts[i] for i in order[start : start + 64]]
        for ids in tokenizer(batch, verbose=False)["input_ids"]:  # long texts are cut into windows below
            ids = ids + eos
            if len(ids) < length:
                carry += ids
                if len(carry) >= length:
                    windows.append(carry[:length])
                    carry = []
                continue
            pieces = len(ids) // length
            for piece in sorted(rng.sample(range(pieces), min(per_text, pieces))):
                windows.append(ids[piece * length : (piece + 1) * length])
        if len(windows) >= count:
            break
    if not windows:
        raise ParadecError(f"the texts hold fewer tokens than one window of {length}")
    return torch.tensor(windows[:count], dtype=torch.long)


@torch.no_grad()
def continue_with_target(
    model,
    prompts: torch.Tensor,  # [N, P] int64
    new_tokens: int,
    *,
    eos_token_ids: list[int],
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own continuations: tokens [N, P + new_tokens] and valid [N, P + new_tokens] (False after the
    first end-of-text the target emitted; those slots hold the pad id)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = eos_token_ids[0] if eos_token_ids else 0
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        eos_token_id=eos_token_ids or None,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    n, p = prompts.shape
    tokens = torch.full((n, p + new_tokens), pad, dtype=torch.long)
    for start in tqdm(range(0, n, batch_size), desc="self-distillation", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size].to(device)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config
        )  # [b, P + g], g <= new_tokens
        tokens[start : start + batch.shape[0], : out.shape[1]] = out.cpu()
    generated = tokens[:, p:]
    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= generated == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first end-of-text
    valid = torch.cat([torch.ones(n, p, dtype=torch.bool), ~after_eos], 1)
    return tokens, valid


@torch.no_grad()
def target_features(model, tokens: torch.Tensor, *, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """The target's last hidden states (after its final norm: what its LM head reads) [N, T, H], on its device."""
    device = next(model.parameters()).device
    base = model.base_model
    chunks = []
    for start in tqdm(
        range(0, tokens.shape[0], batch_size), desc="target features", unit="batch", disable=not progress
    ):
        chunks.append(base(input_ids=tokens[start : start + batch_size].to(device)).last_hidden_state)
    return torch.cat(chunks)


def build_data(
    model,
    tokenizer,
    texts: list[str],
    *,
    sequences: int,
    prompt_len: int,
    new_tokens: int,
    eos_token_ids: list[int],
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> DistillData:
    """`sequences` windows of `prompt_len` text tokens, each continued by the target for `new_tokens` tokens
    (none: the text windows alone), with the target's hidden states."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    if new_tokens > 0:
        prompts = make_windows(tokenizer, texts, sequences, prompt_len, seed=seed)
        tokens, valid = continue_with_target(
            model,
            prompts,
            new_tokens,
            eos_token_ids=eos_token_ids,
            temperature=temperature,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    else:
        tokens = make_windows(tokenizer, texts, sequences, prompt_len, seed=seed)
        valid = torch.ones_like(tokens, dtype=torch.bool)
    generated = time.perf_counter()
    features = target_features(model, tokens, batch_size=batch_size, progress=progress)
    stats = {
        "sequences": int(tokens.shape[0]),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "temperature": temperature if new_tokens > 0 else None,
        "tokens": int(valid.sum()),
        "generate_seconds": round(generated - started, 1),
        "feature_seconds": round(time.perf_counter() - generated, 1),
    }
    return DistillData(tokens.to(device), valid.to(device), features, stats)
