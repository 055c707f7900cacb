"""Exponential moving average of the model's trainable floating-point parameters, kept in fp32.

Shadows are ``p.detach().clone().float()``: under FSDP2 a DTensor parameter yields a DTensor shadow with the same
sharding, so each rank averages only its own shard and nothing is ever gathered. Names are the parameters' clean
FQNs (wrapper prefixes such as ``_checkpoint_wrapped_module.`` or ``_orig_mod.`` removed), i.e. the same keys as
``get_model_state_dict``, so ``shadow_state_dict()`` can be exported or loaded into an unwrapped model directly.

Frozen parameters (``train.freeze``, ``requires_grad`` False) have no shadow: they never change, so the model's own
value is their average, and a frozen pretrained LM costs no fp32 copy. Whoever exports the average overlays the
shadows on the model's state (``outputs.RunOutputs.consolidated_state``), so frozen weights come from the model.

Decay at update ``step`` (0-based):  d = min(decay, (1 + step) / (10 + step))  -- a warmup that lets the average
follow the fast-moving early weights; then  shadow <- d * shadow + (1 - d) * param.

Build the EMA after parallelisation and weight init (not on the meta device), and before loading a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from transfusion.distributed.parallelize import clean_name

def _floating_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {clean_name(n): p for n, p in model.named_parameters() if p.is_floating_point() and p.requires_grad}


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("EMA needs materialised weights: build it after the model's parameters are initialised")
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {n: p.detach().clone().float() for n, p in _floating_params(model).items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[nn.Parameter]]:
        params = _floating_params(model)
        if params.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"EMA does not match the model: missing in model {missing[:5]}, not in EMA {extra[:5]}")
        names = list(self.shadow)
        return [self.shadow[n] for n in names], [params[n] for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        shadows, params = self._pairs(model)
        # p.float() is a no-op for fp32 params; lower-precision params are upcast before blending.
        torch._foreach_lerp_(shadows, [p.detach().float() for p in params], 1.0 - self.decay_at(step))

    def shadow_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights by parameter name (fp32; DTensors under FSDP2); frozen parameters are not in it."""
        return dict(self.shadow)

    # Stateful protocol (torch.distributed.checkpoint): the returned tensors are the shadows themselves, so DCP
    # loads into them in place; load_state_dict copies only when handed different tensors.
    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        if state_dict.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state_dict.keys())
            extra = sorted(state_dict.keys() - self.shadow.keys())
            raise KeyError(f"EMA state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, src in state_dict.items():
            if src is not self.shadow[name]:
                self.shadow[name].copy_(src)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. to sample during training); the live weights are
        restored bit-exactly on exit, also when the body raises."""
        shadows, params = self._pairs(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, shadows):
                p.copy_(s)  # copy_ casts fp32 -> the parameter's dtype
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
