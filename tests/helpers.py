"""Shared test helpers: a tiny model and hand-built packed batches (no data pipeline involved)."""

from __future__ import annotations

import torch

from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.config import ModelConfig
from transfusion.model import build_model
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GRID = (2, 2)  # 8x8 images, 4x4 patches -> 4 slots per image
P = GRID[0] * GRID[1]


def tiny_model(seed: int = 0, attention: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, patch_size=4, attention=attention)
    model = build_model(cfg, TOK.vocab_size, 3)
    # The image head is zero-initialised; give it weights so image outputs depend on the input.
    torch.nn.init.normal_(model.image_out.proj.weight, std=0.02)
    return model.eval()


def make_batch(docs: list[list], seq_len: int, images: torch.Tensor) -> Batch:
    """docs: one row of documents; each document is a list of str (text) or int (index into ``images``)."""
    tokens, doc_ids, image_ids, positions = [], [], [], []
    rows, starts = [], []
    for d, doc in enumerate(docs):
        pos = 0
        items = [TOK.bos_id]
        for seg in doc:
            if isinstance(seg, str):
                items += TOK.encode(seg)
            else:
                items += [TOK.boi_id]
                starts.append(len(tokens) + len(items))
                rows.append(0)
                items += [("img", seg)] * P
                items += [TOK.eoi_id]
        items += [TOK.eos_id]
        for it in items:
            if isinstance(it, tuple):
                tokens.append(TOK.image_id)
                image_ids.append(it[1])
            else:
                tokens.append(it)
                image_ids.append(-1)
            doc_ids.append(d)
            positions.append(pos)
            pos += 1
    pad = seq_len - len(tokens)
    tokens += [TOK.pad_id] * pad
    doc_ids += [-1] * pad
    image_ids += [-1] * pad
    positions += [0] * pad
    t = torch.tensor(tokens)
    targets = torch.full_like(t, IGNORE_INDEX)
    d = torch.tensor(doc_ids)
    im = torch.tensor(image_ids)
    nxt_same_doc = (d[:-1] == d[1:]) & (d[:-1] >= 0)
    text_next = (im[1:] < 0)
    keep = nxt_same_doc & text_next & (im[:-1] < 0)
    targets[:-1] = torch.where(keep, t[1:], targets[:-1])
    n = images.shape[0]
    return Batch(tokens=t[None], doc_ids=d[None], image_ids=im[None], positions=torch.tensor(positions)[None],
                 text_targets=targets[None], images=images, image_rows=torch.tensor(rows, dtype=torch.long),
                 image_starts=torch.tensor(starts, dtype=torch.long), image_is_target=torch.ones(n, dtype=torch.bool),
                 patch_grid=GRID, keys=[str(i) for i in range(len(docs))])


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
