"""Exponential moving average of model weights (Polyak averaging), as used for SD's EMA weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every floating parameter.

    The effective decay warms up as ``min(decay, (1 + step) / (10 + step))`` so early, random
    weights are forgotten quickly. The shadow lives on the model's device in float32.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.step = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1 - decay)
        self.step += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.step = state["decay"], state["step"]
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {name: tensor.float().clone() for name, tensor in state["shadow"].items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (buffers untouched)."""
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name].to(param.dtype))
