"""The zoo's tokenizer: byte-level BPE trained on the corpus, and the token arrays the models train on.

One special token, `<|endoftext|>` (id 0), is bos, eos and pad. Training data is the concatenation of
`[<|endoftext|>] + tokens(file)` over the files, and the saved tokenizer's post-processor prepends the same token
to every encoded text, so a prompt starts the way every training file did.

Saved so that `transformers.AutoTokenizer.from_pretrained(dir)` loads it offline (`tokenizer.json` +
`tokenizer_config.json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from paradec.zoo.corpus import SourceFile

EOT = "<|endoftext|>"
EOT_ID = 0
# Pre-tokenization (the cl100k pattern): a run of newlines never joins the indentation after it, so a prompt that
# ends at a line break ("...):\n") is tokenized exactly as that text is inside a longer file. With GPT-2's pattern
# "\n" + indentation is one token, and a prompt ending in a bare "\n" tells the model the next line is not
# indented: a function body after a docstring becomes unlikely and the model ends the file instead.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_ENCODE_CHUNK_CHARS = 8_000_000  # texts per encode_batch call: bounded memory, a progress tick every few MB


def training_sample(files: Sequence[SourceFile], max_chars: int) -> list[str]:
    """A deterministic sample of the training files for BPE training: files in content-hash order up to max_chars."""
    sample, total = [], 0
    for f in sorted(files, key=lambda f: f.digest):
        if total >= max_chars:
            break
        sample.append(f.text)
        total += len(f.text)
    return sample


def train_tokenizer(texts: Sequence[str], vocab_size: int, split_pattern: str = SPLIT_PATTERN) -> Tokenizer:
    """Byte-level BPE over the pre-tokens that `split_pattern` cuts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, EOT_ID)]
    )
    assert tok.token_to_id(EOT) == EOT_ID, "the end-of-text token must be id 0"
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, context: int) -> None:
    """Write tokenizer.json and tokenizer_config.json loadable by `AutoTokenizer.from_pretrained(out_dir)`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, model_max_length=context
    )
    fast.save_pretrained(str(out_dir))


def encode_files(tok: Tokenizer, files: Sequence[SourceFile], *, desc: str, progress: bool = True) -> np.ndarray:
    """Concatenate [EOT] + tokens(file) over files: a flat uint16 array (int32 past 65536 tokens of vocabulary)."""
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    chunks: list[list[str]] = [[]]
    size = 0
    for f in files:
        if size >= _ENCODE_CHUNK_CHARS:
            chunks.append([])
            size = 0
        chunks[-1].append(f.text)
        size += len(f.text)
    parts: list[np.ndarray] = []
    eot = np.array([EOT_ID], dtype=dtype)
    for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=not progress):
        for enc in tok.encode_batch_fast(chunk, add_special_tokens=False):
            parts.append(eot)
            parts.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
