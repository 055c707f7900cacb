"""Worker of tests/test_pretrained.py's sharded-start test, run alone or under torchrun (CPU, gloo): build the model
on the meta device, shard it with FSDP2 (under torchrun), materialise it, load a pretrained checkpoint into the
shards, and write the first-step loss of a fixed batch plus how much of each text tensor this rank holds.

    python tests/pretrained_fsdp_worker.py HF_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from transfusion.attention.backends import build_attention_mask
from transfusion.config import load_config
from transfusion.distributed.env import init_distributed, shutdown
from transfusion.distributed.init import materialize
from transfusion.distributed.parallelize import clean_name, parallelize
from transfusion.model import build_model
from transfusion.pretrained.checkpoint import load_pretrained
from transfusion.pretrained.config import open_pretrained


def first_step_loss(model, vocab_rows: int) -> float:
    """Next-token loss of two packed rows of text (three documents), the same batch on every rank."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_rows, (2, 24), generator=gen)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1).clone()
    positions[1] = torch.arange(24)
    mask = build_attention_mask(doc_ids, torch.full_like(doc_ids, -1), "sdpa")
    empty = torch.zeros(0, dtype=torch.long)
    logits, _ = model(tokens, positions, mask, torch.zeros(0, 3, 8, 8), empty, empty, empty, (2, 2))
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    loss = F.cross_entropy(logits[:, :-1][same_doc].float(), tokens[:, 1:][same_doc])
    loss.backward()
    return float(loss)


def main(path: str, out: str) -> None:
    cfg = load_config(None, [f"--model.pretrained={path}", "--data.tokenizer=pretrained", "--model.attention=sdpa",
                             "--run.device=cpu", "--data.image_size=8"])
    env = init_distributed(cfg.parallel, cfg.run.device)
    ckpt = open_pretrained(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model, ckpt.vocab_rows + 3, 3)
    model = parallelize(model, cfg.parallel, env.mesh, env.device)
    materialize(model, env.device, cfg.run.seed)
    load_pretrained(model, ckpt)
    params = {clean_name(n): p for n, p in model.named_parameters()}
    local = {n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in params.items()}
    full = {n: p.numel() for n, p in params.items()}
    record = {"rank": env.rank, "loss": first_step_loss(model, ckpt.vocab_rows),
              "local": {n: local[n] for n in ckpt.names() if n in local}, "full": full}
    Path(out, f"rank_{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
