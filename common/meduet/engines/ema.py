"""EMA teacher with a cosine momentum schedule (MeDUET's MFTD/SiQC teacher).

``EMATeacher(student)`` deep-copies ``student.ema_source()`` (for ``MeDUET`` that is the encoder + factor
heads, ``model.backbone``: ``scope="backbone"``, this project's default) or, with ``scope="student"``, the whole
student (decoder, recombination, domain heads too: the public MeDUET code's teacher, which its SiQC keys need;
DDP/DataParallel wrappers are unwrapped), freezes it (``requires_grad=False``,
eval mode) and after every optimiser step follows the student::

    teacher = m * teacher + (1 - m) * student,   m = cosine_momentum(step, total_steps)  (0.997 -> 0.9997)

Buffers (none are learned in MeDUET's backbone) are copied. ``state_dict``/``load_state_dict`` make it part
of a resumable checkpoint; everything in them loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["cosine_momentum", "EMATeacher", "EMA_SCOPES"]


def cosine_momentum(step: int, total_steps: int, start: float = 0.997, end: float = 0.9997) -> float:
    """Momentum at ``step``: ``start`` at 0, ``end`` at ``total_steps`` (and after), half-cosine in between."""
    if total_steps <= 0:
        return end
    t = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (1.0 + math.cos(math.pi * t)) / 2.0


#: what an EMA teacher copies and follows: the student's ``ema_source()`` or the whole student
EMA_SCOPES = ("backbone", "student")


def _source(student: nn.Module, scope: str = "backbone") -> nn.Module:
    while isinstance(student, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        student = student.module
    if scope == "student":
        return student
    return student.ema_source() if hasattr(student, "ema_source") else student


class EMATeacher:
    """Frozen exponential-moving-average copy of (part of) a student network.

    Args:
        student: the student (``MeDUET``, a DDP wrapper of it, or any module; ``ema_source()`` picks the part).
        momentum_start, momentum_end: cosine schedule end points.
        scope: ``"backbone"`` (``student.ema_source()``) or ``"student"`` (every parameter of the student).

    Attributes:
        module: the teacher network (e.g. a ``FactorEncoder``).
        momentum: the momentum used by the last ``update`` (``momentum_start`` before any).
    """

    def __init__(self, student: nn.Module, momentum_start: float = 0.997, momentum_end: float = 0.9997,
                 scope: str = "backbone") -> None:
        if not (0.0 <= momentum_start <= 1.0 and 0.0 <= momentum_end <= 1.0):
            raise ValueError("momenta must be in [0, 1]")
        if scope not in EMA_SCOPES:
            raise ValueError(f"EMA scope must be one of {EMA_SCOPES} (train.yaml ema_scope), got {scope!r}")
        self.scope = scope
        self.momentum_start, self.momentum_end = float(momentum_start), float(momentum_end)
        self.momentum = self.momentum_start
        self.module = copy.deepcopy(_source(student, scope))
        self.module.requires_grad_(False)
        self.module.eval()

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.momentum_start, self.momentum_end)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """EMA step towards ``student``'s current weights; returns the momentum used."""
        m = self.momentum_at(step, total_steps)
        src = _source(student, self.scope)
        t_params = list(self.module.parameters())
        s_params = [p.detach() for p in src.parameters()]
        if len(t_params) != len(s_params):
            raise ValueError("student and teacher have different parameter lists")
        if t_params:
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)
        for tb, sb in zip(self.module.buffers(), src.buffers()):
            tb.copy_(sb)
        self.momentum = m
        return m

    def encode(self, x: torch.Tensor) -> Any:
        """``module.encode(x)`` without gradients."""
        with torch.no_grad():
            return self.module.encode(x)

    __call__ = encode

    def to(self, *args: Any, **kwargs: Any) -> EMATeacher:
        self.module.to(*args, **kwargs)
        return self

    def parameters(self):
        return self.module.parameters()

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "momentum_start": self.momentum_start,
            "momentum_end": self.momentum_end,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.momentum_start = float(state.get("momentum_start", self.momentum_start))
        self.momentum_end = float(state.get("momentum_end", self.momentum_end))
        self.momentum = float(state.get("momentum", self.momentum))
