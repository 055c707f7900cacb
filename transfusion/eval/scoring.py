"""Teacher-forced scoring of held-out sequences: the training loss terms, summed, with no gradient.

    parts = teacher_forced(engine, seqs, batch_size, generator)   # [(text_sum, text_count, image_sum, image_count)]
    scoring_metrics(engine, samples, ...)                           # text perplexity and diffusion validation loss

Sequences are packed like training rows (``data_pipelines.packing.Packer``) and scored by ``compute_loss_terms`` under
the engine's attention plan (dense masks). Every report uses it: the single-object world through ``scoring_metrics``,
the compositional report (``compositional.py``) for caption NLL and the loss per noise level.
"""

from __future__ import annotations

import math

import torch


def teacher_forced(engine, seqs: list, batch_size: int, gen: torch.Generator, schedule=None,
                   latents: bool = False) -> list[tuple[float, float, float, float]]:
    """(text_sum, text_count, image_sum, image_count) per packed batch of ``seqs``."""
    from data_pipelines.packing import Packer
    from transfusion.latents.prepare import prepare_batch
    from transfusion.training.losses import compute_loss_terms

    cfg, tok = engine.cfg, engine.tok
    rows = max(1, batch_size * max(len(s) for s in seqs) // cfg.data.seq_len)
    batches, packer = [], Packer(cfg.data.seq_len, rows, tok.pad_id, engine.patch_grid, latents=latents)
    for seq in seqs:
        if not packer.add(seq):
            batches.append(packer.emit())
            packer.add(seq)
    if len(packer):
        batches.append(packer.emit())
    out = []
    with torch.no_grad():
        for batch in batches:
            batch = prepare_batch(batch, engine.codec, engine.device, engine.patch_grid, cfg.model.patch_size)
            mask = engine.attention.mask(batch.doc_ids, batch.image_ids)
            with engine.autocast():
                t = compute_loss_terms(engine.model, batch, mask, schedule or engine.schedule, cfg.loss, gen)
            out.append((float(t.text_sum), float(t.text_count), float(t.image_sum), float(t.image_count)))
    return out


def scoring_metrics(engine, samples: list, *, batch_size: int, seed: int, latents: bool = False) -> dict:
    """Teacher-forced scores on packed text -> image sequences (no caption dropout); ``latents``: the samples'
    images are precomputed latents."""
    from data_pipelines.samples import T2I, build_sequence

    tok = engine.tok
    seqs = [build_sequence(tok, key, image, tok.encode(caption), patch_grid=engine.patch_grid, layout=T2I)
            for key, image, caption, _ in samples]
    parts = teacher_forced(engine, seqs, batch_size, torch.Generator().manual_seed(seed), latents=latents)
    text_sum, text_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    img_sum, img_n = sum(p[2] for p in parts), sum(p[3] for p in parts)
    return {"text": {"perplexity": math.exp(text_sum / max(text_n, 1)), "nll_per_token": text_sum / max(text_n, 1)},
            "diffusion": {"val_loss": img_sum / max(img_n, 1)}}
