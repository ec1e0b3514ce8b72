"""Attenuation-free 2D-slice PET: Poisson counts along parallel lines of response, and MLEM.

The model: counts ``y ~ Poisson(A x)`` with ``A`` the parallel-beam projector of ``ct.ParallelBeamCT`` (no
attenuation, scatter, randoms or detector normalisation), slice by slice over ``S3``.
"""

from __future__ import annotations

import torch

from meduet.data.forward._checks import check_finite, check_non_negative, check_real, check_volume
from meduet.data.forward.ct import ParallelBeamCT
from meduet.errors import MeduetInputError

__all__ = ["PETForward", "simulate_counts", "mlem", "poisson_log_likelihood"]


class PETForward(ParallelBeamCT):
    """The PET system model: exactly ``ParallelBeamCT`` (same arguments, shapes and exact ``adjoint``), read as
    expected counts per line of response, ``forward(x) = A x`` for an activity image ``x >= 0``."""

    def sensitivity(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The sensitivity image ``A^T 1`` of one slice, ``(1, 1, S1, S2, 1)`` (dtype/device of ``like`` if given)."""
        ones = torch.ones(1, 1, *self.sinogram_shape, 1, dtype=like.dtype if like is not None else torch.float32,
                          device=like.device if like is not None else self.matrix.device)
        return self.adjoint(ones)


def _check_activity(image: torch.Tensor, pet: PETForward, name: str) -> None:
    op = type(pet).__name__
    check_volume(image, name, (*pet.image_size, None), op)
    check_real(image, name, op)
    check_finite(image, name)
    check_non_negative(image, name, "PET activity is non-negative; clamp it (image.clamp(min=0)) or shift it")


def _check_counts(counts: torch.Tensor, pet: PETForward, where: str) -> None:
    pet.check_sinogram(counts, where, name="counts")
    check_finite(counts, "counts")
    check_non_negative(counts, "counts", "PET counts are Poisson samples >= 0; pass the measured counts, not a "
                                         "corrected or background-subtracted sinogram")


def simulate_counts(image: torch.Tensor, pet: PETForward, total_counts: float, seed: int = 0) -> torch.Tensor:
    """Poisson counts of an activity image at a given count level.

    The expected sinogram ``A x`` of each batch item is scaled by ``c_b = total_counts / sum(A x_b)`` (summed over
    channels, angles, bins and slices), then sampled: ``y ~ Poisson(c_b A x_b)``. So ``y.sum()`` per item is
    ``total_counts`` up to Poisson noise (relative spread ``1 / sqrt(total_counts)``), and MLEM on ``y`` estimates
    ``c_b x_b``: divide by ``c_b`` (``total_counts / pet(image).sum()`` per item) to get the image's units.

    Args:
        image: activity ``(B, C, S1, S2, S3)``, real, finite, non-negative, not all zero.
        pet: the system model.
        total_counts: expected total counts per batch item, > 0 (lower = noisier).
        seed: seeds a ``torch.Generator`` on the image's device: the same arguments always give the same counts.

    Returns:
        counts ``(B, C, num_angles, num_detectors, S3)``: non-negative integers, dtype of ``image``.
    """
    _check_activity(image, pet, "activity image")
    if not (float(total_counts) > 0 and torch.isfinite(torch.tensor(float(total_counts)))):
        raise MeduetInputError(f"total_counts {total_counts!r} is not a positive number; pass e.g. 1e6")
    with torch.no_grad():
        expected = pet(image)
        sums = expected.flatten(1).sum(1)
        if bool((sums <= 0).any()):
            raise MeduetInputError("activity image is all zero in a batch item (no counts to simulate); pass an "
                                   "image with some activity")
        rate = expected * (float(total_counts) / sums).view(-1, 1, 1, 1, 1)
        generator = torch.Generator(device=rate.device).manual_seed(int(seed))
        return torch.poisson(rate.clamp(min=0), generator=generator)


def poisson_log_likelihood(counts: torch.Tensor, pet: PETForward, image: torch.Tensor) -> torch.Tensor:
    """``sum(y log(A x) - A x)`` per batch item ``(B,)`` (the constant ``-log(y!)`` left out); a line with
    ``y = 0`` adds ``-A x`` only, a line with ``y > 0`` and ``A x = 0`` gives ``-inf``."""
    expected = pet(image)
    term = torch.where(counts > 0, counts * torch.log(expected), torch.zeros_like(expected)) - expected
    return term.flatten(1).sum(1)


def mlem(counts: torch.Tensor, pet: PETForward, iterations: int, init: torch.Tensor | None = None) -> torch.Tensor:
    """Maximum-likelihood expectation maximisation for ``y ~ Poisson(A x)``.

    ``x <- x / s * A^T (y / A x)`` with the sensitivity image ``s = A^T 1`` (lines with ``A x = 0`` contribute 0,
    pixels with ``s = 0`` are set to 0). Each iteration keeps ``x >= 0`` and does not decrease the Poisson
    log-likelihood; with no regularisation, many iterations fit the noise (stop early or post-filter).

    Args:
        counts: ``(B, C, num_angles, num_detectors, S3)``, finite, non-negative.
        pet: the system model.
        iterations: number of updates, >= 0.
        init: positive start image ``(B, C, S1, S2, S3)``; default: uniform per slice with the counts' total
            (``sum(y) / sum(s)``), so ``A x0`` has as many expected counts as were measured.

    Returns:
        the estimate ``(B, C, S1, S2, S3)``, non-negative, dtype of ``counts`` (float; pass float64 for exact
        monotonicity checks).
    """
    _check_counts(counts, pet, "mlem")
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
        raise MeduetInputError(f"MLEM iterations {iterations!r} is not a count >= 0; pass e.g. 20")
    if not counts.is_floating_point():
        counts = counts.float()
    sens = pet.sensitivity(like=counts)
    inv_sens = torch.where(sens > 0, 1.0 / sens.clamp(min=torch.finfo(sens.dtype).tiny), torch.zeros_like(sens))
    if init is None:
        x = counts.sum(dim=(2, 3), keepdim=True) / sens.sum() * torch.ones_like(sens)
    else:
        _check_activity(init, pet, "MLEM init")
        if init.shape[:2] != counts.shape[:2] or init.shape[-1] != counts.shape[-1]:
            raise MeduetInputError(f"MLEM init has shape {tuple(init.shape)} but the counts {tuple(counts.shape)}; "
                                   "pass an init with the counts' batch, channel and slice counts")
        x = init.to(counts.dtype)
    for _ in range(int(iterations)):
        expected = pet(x)
        ratio = torch.where(expected > 0, counts / expected.clamp(min=torch.finfo(expected.dtype).tiny),
                            torch.zeros_like(expected))
        x = x * pet.adjoint(ratio) * inv_sens
    return x
