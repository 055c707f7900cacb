"""Shared test helpers: a tiny model and hand-built packed batches (no data pipeline involved)."""

from __future__ import annotations

import torch

from transfusion.batch import Batch
from transfusion.config import ModelConfig
from transfusion.model import build_model
from transfusion.sequence import Sequence, next_token_targets, rows_to_batch
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GRID = (2, 2)  # 8x8 images, 4x4 patches -> 4 slots per image
P = GRID[0] * GRID[1]


def tiny_model(seed: int = 0, attention: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, patch_size=4, attention=attention)
    model = build_model(cfg, TOK.vocab_size, 3)
    # The image head is zero-initialised; give it weights so image outputs depend on the input.
    torch.nn.init.normal_(model.image_head.image_out.proj.weight, std=0.02)
    return model.eval()


def make_batch(docs: list[list], seq_len: int, images: torch.Tensor) -> Batch:
    """docs: one row of documents; each document is a list of str (text) or int (index into ``images``). Built with
    the sequence format's own target rule and row builder (``transfusion/sequence.py``); every image is a target."""
    seqs = []
    for d, doc in enumerate(docs):
        tokens, spans, imgs = [TOK.bos_id], [], []
        for seg in doc:
            if isinstance(seg, str):
                tokens += TOK.encode(seg)
            else:
                tokens.append(TOK.boi_id)
                spans.append((len(tokens), len(tokens) + P))
                imgs.append(images[seg])
                tokens += [TOK.image_id] * P + [TOK.eoi_id]
        tokens.append(TOK.eos_id)
        targets = next_token_targets(tokens, [t == TOK.image_id for t in tokens], TOK.boi_id)
        seqs.append(Sequence(str(d), tokens, targets, spans, imgs, [True] * len(imgs)))
    return rows_to_batch([seqs], seq_len, TOK.pad_id, GRID, image_shape=tuple(images.shape[1:]))


def fit_fixed_batch(model, batch: Batch, schedule, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Train ``model`` on one fixed batch (two alternating noise draws); return the image loss before and after,
    each averaged over the same two draws."""
    from transfusion.attention.backends import build_attention_mask
    from transfusion.config import LossConfig
    from transfusion.training.losses import compute_loss_terms

    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def parts(seed: int):
        return compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(seed))

    def image_loss() -> float:
        with torch.no_grad():
            ps = [parts(s) for s in range(2)]
        return sum((p.image_sum / p.image_count).item() for p in ps) / 2

    before = image_loss()
    for step in range(steps):
        opt.zero_grad()
        parts(step % 2).total(LossConfig()).backward()
        opt.step()
    return before, image_loss()
