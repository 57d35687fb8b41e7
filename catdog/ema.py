"""An exponential moving average of a model's weights (``train.ema_decay``).

After every optimizer step the average moves towards the trained model by ``1 - decay_t``, with
``decay_t = min(decay, (1 + t) / (10 + t))`` and ``t`` the number of updates so far: early on,
when the random start is worth nothing, the average follows the model closely (the warm-up of
torchvision's ``--model-ema`` and timm's ``ModelEmaV3``).  Parameters and floating-point buffers
(BatchNorm running statistics) are averaged; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first)."""
    return min(decay, (1 + updates) / (10 + updates))


class ModelEma:
    """A frozen deep copy of the (unwrapped) model, averaged by :meth:`update`.  Built from a DDP
    model after the wrap, so every rank starts from rank 0's broadcast weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """(averaged EMA tensors, the model's matching tensors, (EMA, model) integer buffers)."""
        net = getattr(model, "module", model)
        ema_floats, model_floats, copied = [], [], []
        for ours, theirs in zip(
            [*self.module.parameters(), *self.module.buffers()], [*net.parameters(), *net.buffers()], strict=True
        ):
            if ours.is_floating_point():
                ema_floats.append(ours)
                model_floats.append(theirs.detach())
            else:
                copied.append((ours, theirs))
        return ema_floats, model_floats, copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_floats, model_floats, copied = self._pairs(model)
        # lerp: ema + (1 - d) * (model - ema) = d * ema + (1 - d) * model, in one pass over memory
        torch._foreach_lerp_(ema_floats, model_floats, 1.0 - ema_decay_at(self.decay, self.updates))
        for ours, theirs in copied:
            ours.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
