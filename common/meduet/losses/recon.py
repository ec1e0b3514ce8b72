"""Measurement-domain losses of reconstruction: how far a rendered volume's simulated measurements are from the
measured ones. No clean image enters them: they compare ``operator(image)`` with the raw data only.

* ``mri``: mean squared magnitude of the complex k-space residual (the unsampled entries are zero in both);
* ``ct``: mean squared sinogram residual;
* ``pet``: the Poisson deviance per line of response, ``mean(c Ax - y - y log(c Ax / y))`` (``y log y`` taken as 0
  at ``y = 0``), with the count scale ``c = sum(y) / sum(Ax)`` profiled out (its maximum-likelihood value for the
  current image, treated as a constant in the gradient, which the envelope theorem makes the exact gradient of the
  profiled likelihood): the image stays in the network's own intensity units, whatever the count level.
"""

from __future__ import annotations

import torch

from meduet.errors import MeduetConfigError

__all__ = ["MODALITIES", "measurement_loss", "pet_count_scale"]

MODALITIES = ("mri", "ct", "pet")


def pet_count_scale(expected: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum(y) / sum(Ax)`` per batch item, shaped to broadcast over ``expected (B, ...)`` (detached)."""
    dims = tuple(range(1, expected.ndim))
    scale = counts.sum(dim=dims, keepdim=True) / expected.detach().sum(dim=dims, keepdim=True).clamp(min=1e-12)
    return scale.detach()


def measurement_loss(predicted: torch.Tensor, measured: torch.Tensor, modality: str) -> torch.Tensor:
    """The loss between ``predicted = operator(image)`` and the ``measured`` data (same shape ``(B, C, ...)``):
    a scalar (see the module docstring per modality)."""
    if predicted.shape != measured.shape:
        raise MeduetConfigError(f"predicted measurements {tuple(predicted.shape)} and measured {tuple(measured.shape)} "
                                "differ in shape; build the operator from the measurement's acquisition")
    if modality == "mri":
        return (predicted - measured).abs().pow(2).mean()
    if modality == "ct":
        return (predicted - measured).pow(2).mean()
    if modality == "pet":
        rate = predicted.clamp(min=0) * pet_count_scale(predicted, measured) + 1e-8
        log_ratio = torch.where(measured > 0, torch.log(measured.clamp(min=1e-12)) - torch.log(rate),
                                torch.zeros_like(rate))
        return (rate - measured + measured * log_ratio).mean()
    raise MeduetConfigError(f"modality {modality!r} is not one of {MODALITIES}; fix the config key 'modality'")
