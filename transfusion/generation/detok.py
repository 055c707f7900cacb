"""Incremental detokenising with stop strings: what of a growing token list may be shown yet.

    view = detokenize(tok, token_ids, stop=("\\n\\n",))
    send(view.text[already_sent:view.ready])      # view.stopped: a stop string was found, the text ends here

A stream cannot send every character as soon as it is decoded: a tail that may still grow into a stop string is
held back (a stop string and what follows it are never returned), and so is an unfinished UTF-8 character (the
tokenizer decodes its leading bytes as U+FFFD until the rest arrives).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextView:
    text: str  # the decoded text, cut before the first stop string
    ready: int  # characters of ``text`` that are final (may be sent)
    stopped: bool  # a stop string was found: ``text`` is complete


def detokenize(tok, token_ids: list[int], stop: tuple[str, ...] | list[str]) -> TextView:
    """Decode ``token_ids`` with ``tok`` and cut at the earliest stop string (empty stop strings are ignored)."""
    full = tok.decode(token_ids)
    cut = min((full.index(s) for s in stop if s and s in full), default=None)
    text = full if cut is None else full[:cut]
    held = 0 if cut is not None else max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])),
                                         default=0)
    held = max(held, len(text) - len(text.rstrip("\ufffd")))  # an unfinished UTF-8 character
    return TextView(text, len(text) - held, cut is not None)
