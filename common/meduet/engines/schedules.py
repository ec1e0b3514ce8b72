"""Learning-rate schedules the trainers share (stepped once per iteration)."""

from __future__ import annotations

import math

import torch

from meduet.errors import MeduetConfigError

__all__ = ["LR_SCHEDULES", "warmup_cosine_schedule", "build_lr_schedule"]

#: the names ``build_lr_schedule`` takes
LR_SCHEDULES = ("constant", "warmup_cosine")


def _steps(value: object, what: str) -> int:
    """An iteration count from a config expression (e.g. ``@max_epochs * len(@train#dataloader)``): a non-negative
    integer, else one line pointing at the epoch keys (``--max_epochs abc`` makes it a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise MeduetConfigError(f"the learning-rate schedule's {what} must be a non-negative integer, got {shown}; "
                                "max_epochs / warmup_epochs / lr_warmup_iterations must be integers")
    return value


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_ratio`` x the base rate at ``total_steps``.

    Stepped once per iteration.
    """
    warmup_steps, total_steps = _steps(warmup_steps, "warm-up"), _steps(total_steps, "total iterations")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int,
                      min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A config's ``lr_schedule`` by name: ``constant`` (no scheduler, ``None``) or ``warmup_cosine``."""
    if kind == "constant":
        return None
    if kind == "warmup_cosine":
        return warmup_cosine_schedule(optimizer, warmup_steps, total_steps, min_ratio)
    raise MeduetConfigError(f"lr_schedule {kind!r} is not one of {', '.join(LR_SCHEDULES)}")
