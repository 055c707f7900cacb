"""Tokenizers: a byte-level default and Hugging Face ``tokenizer.json`` files loaded from a local path.

Both expose the same small interface and the special ids the sequence layout needs:
BOS / EOS frame a document, BOI / EOI frame an image block, IMAGE is the placeholder id held by every image slot
(its embedding is never used: image slots are filled by the patch adapter), PAD fills the end of a packed row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi", "image")
HF_SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "boi": "<|boi|>",
    "eoi": "<|eoi|>",
    "image": "<|image|>",
}


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the six special ids follow."""

    spec = "bytes"

    def __init__(self) -> None:
        for i, name in enumerate(SPECIAL_NAMES):
            setattr(self, f"{name}_id", 256 + i)
        self.vocab_size = 256 + len(SPECIAL_NAMES)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` from a local path. Special tokens named in ``HF_SPECIAL_TOKENS`` are used
    when the file defines them; the missing ones get fresh ids after the file's vocabulary."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF  # local import: only needed for this tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.spec = str(path)
        self._tok = _HF.from_file(str(path))
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True  # "<|boi|>" typed in a prompt is text, not a control id
        size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special: set[int] = set()
        for name in SPECIAL_NAMES:
            tid = self._tok.token_to_id(HF_SPECIAL_TOKENS[name])
            if tid is None:
                tid, size = size, size + 1
            setattr(self, f"{name}_id", tid)
            self._special.add(tid)
        self.vocab_size = size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        inner = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([i for i in ids if i not in self._special and i < inner])


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` for the byte-level tokenizer, else a local path to a ``tokenizer.json``."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
