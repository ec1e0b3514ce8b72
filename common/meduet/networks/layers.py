"""Small layers shared by the networks."""

from __future__ import annotations

import torch

__all__ = ["GradientReversal", "grad_reverse"]


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-coeff`` (domain-adversarial training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return -ctx.coeff * grad_output, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``GradientReversal.apply(x, coeff)``; ``coeff=-1`` is a plain identity (no reversal)."""
    return GradientReversal.apply(x, coeff)
