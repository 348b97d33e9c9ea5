"""Incremental detokenization for streaming, and stop-string handling.

Text is produced from token ids by decoding a small sliding window (the method of vLLM/TGI): decoding
`ids[prefix:]` and `ids[prefix:read]` and emitting the difference keeps word-boundary spaces right for
SentencePiece-style tokenizers, and holding back a trailing U+FFFD waits for the rest of a multi-byte character.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first generated tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # decoded generated text so far

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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
