"""Reading a pretrained checkpoint's tokenizer (local only, never the network) into a ``PretrainedTokenizer``
(``transfusion/tokenizer.py``: the special-id rule and ``save`` / ``load`` live there, in the contract).

Sources:
  - a Hugging Face directory: ``tokenizer.json``, ``tokenizer_config.json`` (the names of BOS / EOS / PAD / UNK and
    the chat template), ``chat_template.jinja`` (where newer exports keep the template), ``special_tokens_map.json``;
  - a ``.gguf`` file: the tokenizer in its ``tokenizer.ggml.*`` metadata, converted into a ``tokenizers`` object by
    transformers' GGUF converter. transformers is needed at import time only: ``PretrainedTokenizer.save`` writes a
    plain ``tokenizer.json``, so an export loads and serves without it.
"""

from __future__ import annotations

from pathlib import Path

from transfusion.tokenizer import CHECKPOINT_SPECIALS, PretrainedTokenizer, TokenizerError, read_json

__all__ = ["PretrainedTokenizer", "TokenizerError", "open_tokenizer"]


def _token_name(value) -> str | None:
    """``tokenizer_config.json`` spells a token as a string or as an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_text(value) -> str | None:
    """A chat template is a string, or a list of named templates (``default`` is the one to use)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}.get("default")
    return value if isinstance(value, str) and value else None


def _from_hf_dir(path: Path):
    """(tokenizers.Tokenizer, token strings by name, chat template) from a Hugging Face directory."""
    from tokenizers import Tokenizer

    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"tokenizer: {path} has no tokenizer.json")
    try:
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"tokenizer: {path / 'tokenizer.json'} is unreadable ({' '.join(str(e).split())[:200]})") \
            from None
    config = read_json(path / "tokenizer_config.json")
    special_map = read_json(path / "special_tokens_map.json")
    tokens = {name: _token_name(config.get(f"{name}_token")) or _token_name(special_map.get(f"{name}_token"))
              for name in CHECKPOINT_SPECIALS}
    template = _template_text(config.get("chat_template"))
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return backend, tokens, template


def _from_gguf(path: Path):
    """(tokenizers.Tokenizer, token strings by name, chat template) from the tokenizer inside a GGUF file."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"tokenizer: reading the tokenizer inside {path} needs transformers and gguf "
                             "(pip install transformers gguf)") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # the converter raises many kinds; the reason fits on one line
        raise TokenizerError(f"tokenizer: cannot read the tokenizer in {path}: {' '.join(str(e).split())[:300]}") \
            from None
    tokens = {name: _token_name(getattr(hf, f"{name}_token", None)) for name in CHECKPOINT_SPECIALS}
    return hf.backend_tokenizer, tokens, _template_text(hf.chat_template)


def open_tokenizer(path: str | Path, vocab_rows: int = 0) -> PretrainedTokenizer:
    """The tokenizer of the checkpoint at ``path`` (a Hugging Face directory or a ``.gguf`` file); ``vocab_rows``:
    rows of the checkpoint's embedding (our new special ids go after them)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        backend, tokens, template = _from_gguf(path)
    elif path.is_dir():
        backend, tokens, template = _from_hf_dir(path)
    else:
        raise TokenizerError(f"tokenizer: {path} is neither a Hugging Face directory nor a .gguf file")
    return PretrainedTokenizer(backend, tokens, template, vocab_rows=vocab_rows, spec=str(path))
