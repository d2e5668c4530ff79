"""Batched Adam over the trainable W+ layers of many images (of many subjects) at once.

Adam is written out here on one (B, T, D) tensor. Every operation is elementwise, so each image's moments and
updates are exactly those it would have alone: batching changes nothing but speed, provided the loss is a sum of
independent per-subject losses (see losses.py). Schedule as in the reference: lr, multiplied by ``decay`` at
``int(f * steps)`` for each ``f`` in ``milestones`` (0.75 and 0.9 of the steps). Everything here is float32.
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

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: lr * decay ** (number of milestone steps <= step)."""
        passed = sum(1 for m in self.milestones if step >= int(m * self.steps))
        return self.lr * self.decay**passed


@dataclass
class OptimiseResult:
    latents: torch.Tensor  # (B, T, D) after the last step, detached
    losses: list[float]  # total loss before each step (len == steps)


def adam_optimise(
    start: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    schedule: AdamSchedule,
    record_losses: bool = False,
) -> OptimiseResult:
    """Minimise ``loss_fn(x)`` (a scalar) over x (B, ...) starting at ``start``, with per-element Adam.

    ``loss_fn`` gets a leaf tensor requiring grad and must return a scalar whose gradient w.r.t. each sample
    depends only on that sample's subject. Returns the latents after ``schedule.steps`` updates.
    """
    x = start.detach().to(torch.float32).clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    losses: list[float] = []
    b1, b2 = schedule.beta1, schedule.beta2
    for step in range(schedule.steps):
        x.requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        if record_losses:
            losses.append(float(loss.detach()))
        with torch.no_grad():
            x = x.detach()
            grad = grad.to(torch.float32)
            t = step + 1
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            x -= schedule.lr_at(step) * m_hat / (v_hat.sqrt() + schedule.eps)
    return OptimiseResult(latents=x.detach(), losses=losses)
