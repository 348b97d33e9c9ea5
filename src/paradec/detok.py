"""Incremental detokenization for streaming, and stop-string handling.

Text is produced from token ids by decoding a small sliding window (the method of vLLM/TGI): decoding
`ids[prefix:]` and `ids[prefix:read]` and emitting the difference keeps word-boundary spaces right for
SentencePiece-style tokenizers, and holding back a trailing U+FFFD waits for the rest of a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first generated tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # decoded generated text so far
        self._decode = text_decoder(tokenizer)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly decodable text (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Emit whatever is left undecoded (e.g. an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        piece = after[len(before) :] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += piece
        return piece


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text as `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` gives it.
    For a `tokenizers`-backed transformers tokenizer whose class overrides neither `decode` nor `_decode`, that call
    is exactly its backend's decode, called here directly: transformers' argument handling around it is most of a
    call's cost, and a streamed token costs two calls (per sequence of a batch, per step)."""
    if _plain_backend(type(tokenizer)):
        backend = getattr(tokenizer, "_tokenizer", None)  # what `_decode` calls
        decode = getattr(backend, "decode", None)
        if decode is not None:
            return lambda ids: decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@cache
def _plain_backend(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: go through its decode
        return False
    return (
        issubclass(cls, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    )


class StopStrings:
    """Finds the first stop string in generated text; tells how much text is safe to stream."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string in text[start':] (start' covers strings straddling `start`), or -1."""
        if not self.stops:
            return -1
        lo = max(0, start - self.longest + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that cannot turn into the start of a stop string."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - k
        return len(text)
