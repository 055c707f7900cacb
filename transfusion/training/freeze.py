"""Frozen parameter groups (``train.freeze``): parameters that receive no update and hold no optimizer state.

    freeze_parameters(model, cfg.train.freeze)      # after the model is built, before parallelize and the optimizer

``"text"`` freezes the text model (``TransfusionModel``'s ``is_text_parameter``: token embedding, LM head, final norm
and every block's text modules), LMFusion's recipe for adding image generation to a pretrained LM without touching
its language ability: text-only inputs then give bitwise the logits they gave before training (tests/test_mot.py).
The special-token rows (BOI / EOI / IMAGE) are rows of the frozen tables and stay at their init. With ``model.mot``
the image twins, adapters, image norm and head train; without it the frozen text modules are the whole trunk, so
only the image adapters, image norm and head train (allowed, with a warning).

Freezing is ``requires_grad = False`` set before ``fully_shard`` (FSDP2 carries the flag to its sharded parameters)
and before the optimizer is built (``optim.param_groups`` skips frozen parameters, so AdamW holds no state for them
and the DCP checkpoint's optimizer state has no entry for them; the model state still saves them). The EMA keeps no
shadow of them either (``ema.py``; the export takes frozen weights from the model).
"""

from __future__ import annotations

import logging

from torch import nn

from transfusion.distributed.parallelize import clean_name
from transfusion.model.transfusion import is_text_parameter

log = logging.getLogger("transfusion")

FREEZE_GROUPS = {"text": is_text_parameter}  # train.freeze value -> which clean parameter names it covers


def freeze_parameters(model: nn.Module, groups: list[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter of ``groups`` (``FREEZE_GROUPS`` keys); returns the frozen
    (clean) names."""
    unknown = sorted(set(groups) - FREEZE_GROUPS.keys())
    if unknown:
        raise ValueError(f"unknown train.freeze group(s) {', '.join(unknown)} (known: {', '.join(FREEZE_GROUPS)})")
    frozen = []
    for name, p in model.named_parameters():
        name = clean_name(name)
        if any(FREEZE_GROUPS[g](name) for g in groups):
            p.requires_grad_(False)
            frozen.append(name)
    if "text" in groups and not getattr(getattr(model, "cfg", None), "mot", False):
        log.warning("train.freeze = ['text'] without model.mot: the whole transformer trunk is frozen; only the "
                    "image adapters, image norm and image head train")
    return frozen
