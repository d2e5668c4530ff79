"""Batched Adam over the trainable W+ layers of many images (of many subjects) at once.

``torch.optim.Adam`` on one (B, T, D) leaf tensor. Adam's update is elementwise, so each image's moments and steps
are exactly those it would have alone: batching changes nothing but speed, provided the loss is a sum of
independent per-subject losses (see losses.py). Schedule as in the reference: lr, multiplied by ``decay`` after
``int(f * steps)`` steps for each ``f`` in ``milestones`` (0.75 and 0.9 of the steps), i.e. ``MultiStepLR``.
The latents keep the dtype of ``start`` (float32 in production, float64 in the engine's exact mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdamSchedule:
    steps: int = 50
    lr: float = 0.01
    decay: float = 0.8
    milestones: tuple[float, ...] = (0.75, 0.9)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or not 0 < self.decay <= 1:
            raise ValueError("need steps >= 0, lr > 0, 0 < decay <= 1")
        if any(not 0 <= m <= 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the steps in [0, 1]")

    def milestone_steps(self) -> list[int]:
        """0-based step indices from which the lr is decayed once more (a milestone at step 0 never fires)."""
        return [int(m * self.steps) for m in self.milestones if int(m * self.steps) > 0]

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: lr * decay ** (number of milestone steps <= step)."""
        return self.lr * self.decay ** sum(1 for m in self.milestone_steps() if step >= m)


@dataclass
class OptimiseResult:
    latents: torch.Tensor  # (B, T, D) after the last step, detached
    losses: list[float]  # total loss before each step (len == steps when recorded)


def adam_optimise(
    start: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    schedule: AdamSchedule,
    record_losses: bool = False,
) -> OptimiseResult:
    """Minimise ``loss_fn(x)`` (a scalar) over x (B, ...) starting at ``start``.

    ``loss_fn`` gets a leaf tensor requiring grad and must return a scalar whose gradient w.r.t. each sample
    depends only on that sample's subject. Returns the latents after ``schedule.steps`` updates.
    """
    x = start.detach().clone().requires_grad_(True)
    # foreach/fused kernels are elementwise too, but the plain loop is the same code path on every device
    opt = torch.optim.Adam([x], lr=schedule.lr, betas=(schedule.beta1, schedule.beta2), eps=schedule.eps, foreach=False)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=schedule.milestone_steps(), gamma=schedule.decay)
    losses: list[float] = []
    for _ in range(schedule.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        (x.grad,) = torch.autograd.grad(loss, x)  # only the latents: never accumulate into model parameters
        if record_losses:
            losses.append(float(loss.detach()))
        opt.step()
        sched.step()
    return OptimiseResult(latents=x.detach(), losses=losses)
