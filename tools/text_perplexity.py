#!/usr/bin/env python
"""How well an export still models plain English: bits per byte (and per-token perplexity) on a text file.

    python tools/text_perplexity.py --export runs/smollm2/export --export runs/smollm2_shapes3/export
    python tools/text_perplexity.py --export runs/shapes3_latents/export --text /usr/share/common-licenses/GPL-3

The text is cut into rows of ``--window`` tokens of the export's own tokenizer; every token after a row's first is
scored from the tokens before it in that row (``Engine.text_logits``: one causal pass, no images). Bits per byte
divide the summed negative log-likelihood by the UTF-8 bytes those tokens decode to, so models with different
tokenizers (bytes, SmolLM2's BPE) are compared on one scale; perplexity is per token of each model's own tokenizer.
The default text is the Apache-2.0 licence of Debian's base-files (English prose no model here trained on: the
shapes world's captions are the only text in its training data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from transfusion.cli import fail_cleanly

DEFAULT_TEXT = "/usr/share/common-licenses/Apache-2.0"


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="append", required=True, help="export directory (repeatable)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"UTF-8 text file (default: {DEFAULT_TEXT})")
    p.add_argument("--window", type=int, default=256, help="tokens per scored row (default: 256)")
    p.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0 = all)")
    p.add_argument("--batch", type=int, default=4, help="rows per forward pass")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = p.parse_args(argv)
    if args.window < 2 or args.batch < 1 or args.max_tokens < 0:
        p.error("--window must be >= 2, --batch >= 1, --max-tokens >= 0")
    return args


def score_text(engine, text: str, window: int, batch: int, max_tokens: int = 0) -> dict:
    """Summed NLL (nats) of every token after each row's first, the tokens and UTF-8 bytes scored."""
    import torch

    tok = engine.tok
    ids = tok.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    rows = [ids[i:i + window] for i in range(0, len(ids), window)]
    rows = [r for r in rows if len(r) >= 2]
    nll, tokens, nbytes = 0.0, 0, 0
    full, rest = [r for r in rows if len(r) == window], [r for r in rows if len(r) != window]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[r] for r in rest]  # no padding needed
    for group in groups:
        ids_BT = torch.tensor(group)
        logits = engine.text_logits(ids_BT)[:, :-1].float()  # [B, T-1, V]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids_BT[:, 1:].flatten(),
                                                       reduction="sum"))
        tokens += ids_BT[:, 1:].numel()
        nbytes += sum(len(tok.decode([t]).encode("utf-8")) for row in group for t in row[1:])
    return {"nll_nats": nll, "tokens": tokens, "bytes": nbytes, "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
            "perplexity": math.exp(nll / max(tokens, 1))}


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from transfusion.generation.engine import Engine

    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8")
    results = {}
    for export in args.export:
        engine = Engine.from_export(export, device=args.device, precision=args.precision)
        r = score_text(engine, text, args.window, args.batch, args.max_tokens)
        results[export] = r
        print(f"{export}: {r['bits_per_byte']:.3f} bits/byte, perplexity {r['perplexity']:.2f} per token "
              f"({r['tokens']} tokens, {r['bytes']} bytes of {path.name})")
    if args.json:
        Path(args.json).write_text(json.dumps({"text": str(path), "window": args.window, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
