"""Output text of one choice, token by token, without decoding the whole output at every step.

Each new piece is decoded with the previous piece as context (tokenizers may drop a leading space when a token is
decoded alone), and held back while it ends in an incomplete UTF-8 sequence (U+FFFD)."""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # start of the context window
        self.read = 0     # ids up to here are already in ``text``
        self.text = ""

    def add(self, ids: list[int]) -> str:
        """Append token ids; returns the text they complete (may be empty)."""
        self.ids += ids
        if self.tok is None or len(self.ids) == self.read:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if now.endswith("\ufffd") or len(now) <= len(before) or not now.startswith(before):
            return ""
        delta = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The whole text once the output is complete (a held-back tail included)."""
        if self.tok is None:
            return ""
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.startswith(self.text):
            self.text = full
        else:
            self.text += self.tok.decode(self.ids[self.read:], skip_special_tokens=True)
        self.read = self.prefix = len(self.ids)
        return self.text

    def token_text(self, token_id: int, prev: int | None = None) -> str:
        """The text one token adds after ``prev`` (alone, a token may lose its leading space)."""
        if self.tok is None:
            return ""
        if prev is None:
            return self.tok.decode([token_id], skip_special_tokens=False)
        head = self.tok.decode([prev], skip_special_tokens=False)
        both = self.tok.decode([prev, token_id], skip_special_tokens=False)
        return both[len(head):] if both.startswith(head) else self.tok.decode([token_id], skip_special_tokens=False)
