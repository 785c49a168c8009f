"""An offline corpus present on every machine: the Python standard library's own ``.py`` sources.

Files are listed in a deterministic order (sorted relative paths) and split into train / test *by file* with a
hash of the relative path, so the split of a file does not depend on which other files exist (machines with other
Python versions share most of their held-out files). Text is tokenized as raw bytes (see ``ByteTokenizer``).
"""
from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass

import torch

from ..tokenizer import ByteTokenizer  # noqa: F401  (re-exported: the corpus is tokenized by it)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted; site-packages and caches excluded."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def split_of(relpath: str, test_percent: int = 5) -> str:
    """'test' for a stable ``test_percent`` % of files (crc32 of the relative path), else 'train'."""
    return "test" if zlib.crc32(relpath.replace(os.sep, "/").encode()) % 100 < test_percent else "train"


@dataclass
class Corpus:
    """Concatenated token stream of one split plus where each file starts."""

    split: str
    files: list[str]
    tokens: torch.Tensor  # uint8-range ids as int16 (bos/eos need > 255)
    starts: list[int]

    def __len__(self) -> int:
        return self.tokens.numel()

    def texts(self, root: str | None = None):
        root = root or stdlib_root()
        for f in self.files:
            with open(os.path.join(root, f), "rb") as fh:
                yield f, fh.read()

    def random_windows(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` windows of ``length`` tokens at random offsets of the stream, int64 [n, length]."""
        hi = len(self) - length
        if hi <= 0:
            raise ValueError(f"corpus split {self.split!r} has {len(self)} tokens, fewer than a window of {length}")
        offs = torch.randint(0, hi, (n,), generator=generator)
        idx = offs[:, None] + torch.arange(length)[None]
        return self.tokens[idx].long()

    def sequential_windows(self, length: int, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping windows from the start of the stream (held-out evaluation), int64 [n, length]."""
        n = len(self) // length
        if max_windows is not None:
            n = min(n, max_windows)
        return self.tokens[: n * length].view(n, length).long()


def load_corpus(split: str, *, test_percent: int = 5, max_bytes: int | None = None,
                root: str | None = None) -> Corpus:
    """The ``split`` ('train' or 'test') of the stdlib corpus, files in sorted order, optionally truncated."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or stdlib_root()
    tok = ByteTokenizer()
    chunks, starts, files, total = [], [], [], 0
    for rel in list_files(root):
        if split_of(rel, test_percent) != split:
            continue
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        if not data:
            continue
        t = torch.empty(len(data) + 2, dtype=torch.int16)
        t[0], t[-1] = tok.BOS, tok.EOS
        t[1:-1] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)
        chunks.append(t)
        starts.append(total)
        files.append(rel)
        total += t.numel()
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise ValueError(f"no .py files found for split {split!r} under {root!r}")
    return Corpus(split, files, torch.cat(chunks), starts)
