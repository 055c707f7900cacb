"""Tokenizers: a byte-level default, Hugging Face ``tokenizer.json`` files loaded from a local path, and a
pretrained checkpoint's tokenizer as ``PretrainedTokenizer.save`` wrote it (what an export of such a run carries).

All expose the same small interface and the special ids the sequence layout needs:
BOS / EOS frame a document, BOI / EOI frame an image block, IMAGE is the placeholder id held by every image slot
(its embedding is never used: image slots are filled by the patch adapter), PAD fills the end of a packed row.

``PretrainedTokenizer`` lives here, in the contract, so that every reader of a saved one (the engine, the server,
the data pipeline) needs neither ``transfusion.pretrained`` nor transformers; reading it out of a checkpoint (a
Hugging Face directory or a ``.gguf`` file) is ``transfusion/pretrained/tokenizer.py``'s job.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
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


# -- a pretrained checkpoint's tokenizer -----------------------------------------------------------------------------
SAVED = "tokenizer_meta.json"  # beside tokenizer.json: special ids and tokens, vocab size, chat template
CHECKPOINT_SPECIALS = ("bos", "eos", "pad", "unk")  # the names a checkpoint may define (unk: a template variable)


class TokenizerError(ValueError):
    """A tokenizer source that is missing or malformed. The message is one line naming the path."""


def read_json(path: Path) -> dict:
    """A JSON object file; ``{}`` when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer: {path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


@lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """Chat templates ship with a checkpoint, i.e. are untrusted code: Jinja2's immutable sandbox, in the
    environment transformers renders them in (trim_blocks / lstrip_blocks, loopcontrols, ``raise_exception``,
    ``strftime_now``, a ``tojson`` that does not escape HTML), so the same messages give the same text."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables: str) -> str:
    """What transformers' ``apply_chat_template(tokenize=False)`` renders. ``messages``: ``[{"role", "content"}]``
    (plain strings: the template sees nothing with methods to call); ``variables``: the special token strings it
    may name (``bos_token``, ...). Raises ``jinja2.TemplateError`` when the template refuses the messages."""
    plain = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return _compile_chat_template(template).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                                   **variables)


class PretrainedTokenizer:
    """A checkpoint's tokenizer with our special ids. BOS / EOS / PAD are the checkpoint's own tokens when it names
    them (a pretrained model keeps the ids it was trained with); BOI / EOI / IMAGE and any missing one are NEW ids
    after ``max(tokenizer size, vocab_rows)`` (``vocab_rows``: rows of the checkpoint's embedding, which may exceed
    its tokenizer: Qwen pads the matrix), so every pretrained row keeps its meaning and the new rows are new.

    ``encode`` adds no special tokens and reads "<|im_start|>" or "<|boi|>" typed in text as text (a user cannot
    forge a control id); ``encode_chat`` is the one place special tokens in text are honoured: the chat template
    writes them. Built by ``transfusion.pretrained.tokenizer.open_tokenizer`` from a checkpoint, or ``load``."""

    def __init__(self, backend, tokens: dict[str, str | None], chat_template: str | None, *, vocab_rows: int = 0,
                 special_ids: dict[str, int] | None = None, spec: str = "") -> None:
        """``backend``: a ``tokenizers.Tokenizer``; ``tokens``: the checkpoint's special token strings by name;
        ``special_ids``: a saved id map with ``vocab_size`` (``load``), else ids are assigned as above."""
        from tokenizers import Tokenizer

        self.spec = spec
        self._text = Tokenizer.from_str(backend.to_str())
        self._text.encode_special_tokens = True  # typed "<|im_start|>" is text
        self._chat = Tokenizer.from_str(backend.to_str())  # a rendered template: its special tokens are tokens
        self._inner = backend.get_vocab_size(with_added_tokens=True)
        self.tokens = {k: v for k, v in tokens.items() if v}
        self.chat_template = chat_template or None
        if special_ids is None:
            special_ids, size = self._assign_ids(max(self._inner, vocab_rows))
        else:
            special_ids = dict(special_ids)
            size = max(int(special_ids.pop("vocab_size")), self._inner)
        for name in SPECIAL_NAMES:
            setattr(self, f"{name}_id", int(special_ids[name]))
        self.vocab_size = size

    def _assign_ids(self, first_new: int) -> tuple[dict[str, int], int]:
        ids, size = {}, first_new
        for name in SPECIAL_NAMES:
            own = self.tokens.get(name) if name in CHECKPOINT_SPECIALS else None
            tid = self._text.token_to_id(own) if own else None
            if tid is None:
                tid, size = size, size + 1
            ids[name] = tid
        return ids, size

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedTokenizer":
        """From a directory ``save`` wrote (or its ``SAVED`` file): the same ids, tokens and template."""
        from tokenizers import Tokenizer

        path = Path(path)
        meta_path = path / SAVED if path.is_dir() else path
        meta = read_json(meta_path)
        if not isinstance(meta.get("special_ids"), dict) or "vocab_size" not in meta:
            raise TokenizerError(f"tokenizer: {meta_path} is not a saved pretrained tokenizer")
        tok_path = meta_path.parent / meta.get("tokenizer_file", "tokenizer.json")
        if not tok_path.is_file():
            raise TokenizerError(f"tokenizer: {tok_path} not found")
        ids = dict(meta["special_ids"], vocab_size=meta["vocab_size"])
        return cls(Tokenizer.from_file(str(tok_path)), meta.get("special_tokens") or {}, meta.get("chat_template"),
                   special_ids=ids, spec=str(meta_path))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``SAVED`` into ``out_dir``; returns the ``SAVED`` path (``build_tokenizer``
        takes it, or the directory)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._chat.save(str(out_dir / "tokenizer.json"))
        meta = {"kind": "pretrained", "tokenizer_file": "tokenizer.json", "vocab_size": self.vocab_size,
                "special_ids": {name: getattr(self, f"{name}_id") for name in SPECIAL_NAMES},
                "special_tokens": self.tokens, "chat_template": self.chat_template}
        (out_dir / SAVED).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir / SAVED

    def encode(self, text: str) -> list[int]:
        return self._text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Our new ids (beyond the tokenizer) and the checkpoint's special tokens are left out."""
        return self._text.decode([i for i in ids if 0 <= i < self._inner])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError(f"tokenizer {self.spec} has no chat template")
        variables = {f"{name}_token": tok for name, tok in self.tokens.items()}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered template's ids, its special tokens as tokens and nothing added: the template writes BOS
        where the checkpoint wants one (transformers' ``apply_chat_template(tokenize=True)``)."""
        return self._chat.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer | PretrainedTokenizer:
    """``"bytes"`` for the byte-level tokenizer; a directory or file ``PretrainedTokenizer.save`` wrote; else a local
    path to a ``tokenizer.json``. (``"pretrained"``, the tokenizer of ``model.pretrained``, is read out of the
    checkpoint by ``transfusion.components.build_components``.)"""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "pretrained":
        raise TokenizerError("tokenizer: data.tokenizer = 'pretrained' needs model.pretrained (the checkpoint it "
                             "comes from)")
    path = Path(spec)
    if (path / SAVED).is_file() or path.name == SAVED:
        return PretrainedTokenizer.load(path)
    return HFTokenizer(spec)
