"""Data consistency with the measurements during or after latent sampling (an option of meduet_diffusion's
ControlNet inference that 3D MedDiffusion does not have: off by default and under the paper preset).

* ``DataConsistency``: image-space projected gradient steps on ``f(x) = ||A x - y||^2 / 2`` over images in
  ``[0, 1]`` (the preprocessed intensity range), ``x <- clip(x - A^H (A x - y) / L, 0, 1)`` with ``L`` the largest
  eigenvalue of ``A^H A``: MRI ``A = M F`` with ``F`` unitary, so ``L = 1`` and one step on a real image is "replace
  the measured k-space samples, keep the real part" (then clip); CT ``A`` the parallel-beam projector, ``L`` by power
  iteration (times 1.05 for safety). With step ``1 / L`` every step lowers ``f`` unless ``x`` already minimises it on
  the box (projected gradient descent), so the measurement residual never grows. PET counts are not supported (their
  scale is not the image's).
* ``LatentConsistency``: a ``meduet.engines.sampling.sample_latents`` ``step_callback`` that every ``every`` steps
  decodes the scheduler's predicted clean latent, applies ``DataConsistency`` on the measured region, re-encodes and
  moves the current latent by ``data_weight * (E(dc(D(x0))) - E(D(x0)))``: only the change made by the consistency
  step, not the VAE's own round-trip error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meduet.data.measurements import Measurement
from meduet.engines.controlnet import encode_image_control as encode_image
from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.networks.patchwise import PatchEncoding

__all__ = ["DataConsistency", "LatentConsistency", "decode_image"]


class DataConsistency:
    """Projected gradient steps towards a measurement (see the module docstring).

    Args:
        measurement: ``meduet.data.measurements.Measurement`` (mri or ct) of an image in ``[0, 1]`` units.
        steps: gradient steps per call (>= 1).
    """

    def __init__(self, measurement: Measurement, steps: int = 1) -> None:
        modality = measurement.acquisition.modality
        if modality not in ("mri", "ct"):
            raise MeduetConfigError(f"data consistency supports mri and ct measurements, not {modality}; set "
                                    "data_consistency none")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise MeduetConfigError(f"data_consistency_steps must be an integer >= 1, got {steps!r}; set "
                                    "--data_consistency_steps 5")
        self.measurement, self.steps, self.modality = measurement, int(steps), modality
        self.op, self.y = measurement.operator(), measurement.data
        self._lipschitz: float | None = 1.0 if modality == "mri" else None

    @property
    def lipschitz(self) -> float:
        """``L >= ||A||^2`` (MRI 1; CT 1.05 times the power-iteration estimate, computed once on first use)."""
        if self._lipschitz is None:
            self._lipschitz = 1.05 * self._power_iteration()
        return self._lipschitz

    def _power_iteration(self, iterations: int = 30) -> float:
        """Largest eigenvalue of ``A^T A`` (CT), by power iteration from a fixed start."""
        shape = (1, 1, *self.measurement.acquisition.image_shape)
        v = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        value = 0.0
        for _ in range(iterations):
            w = self.op.adjoint(self.op(v))
            value = float(w.norm())
            v = w / max(value, 1e-12)
        return value

    def _gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H (A x - y)`` for a real ``x (1, 1, S1, S2, S3)``, real."""
        g = self.op.adjoint(self.op(x) - self.y)
        return g.real if g.is_complex() else g

    @torch.no_grad()
    def residual(self, x: torch.Tensor) -> float:
        """Relative measurement residual ``||A x - y|| / ||y||`` of an image ``(1, 1, S1, S2, S3)``."""
        x = x.detach().float().cpu()
        return float((self.op(x) - self.y).abs().norm() / self.y.abs().norm().clamp(min=1e-12))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``steps`` projected gradient steps from ``x (1, 1, S1, S2, S3)`` (real, the acquisition's grid); same
        shape, device and dtype, in ``[0, 1]``."""
        out = x.detach().float().cpu().clamp(0.0, 1.0)
        for _ in range(self.steps):
            out = (out - self._gradient(out) / self.lipschitz).clamp(0.0, 1.0)
        return out.to(device=x.device, dtype=x.dtype)


def decode_image(vae: torch.nn.Module, scheme: PatchEncoding, space: LatentSpace, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(B, C, *S)`` -> images ``(B, 1, *(f S))`` in ``[0, 1]`` through ``scheme``'s decoding
    (one decoder call or latent windows); the one decode of generated latents (``workflows.diffusion.common.decode``
    is its numpy form)."""
    return scheme.decode(vae, space.unscale(z)).clamp(0.0, 1.0)


class LatentConsistency:
    """``step_callback`` of ``sample_latents`` applying ``DataConsistency`` on the predicted clean latent every
    ``every`` steps (not after the last step: the workflow applies it to the decoded result itself).

    Args:
        consistency: the image-space step.
        vae, scheme, space: meduet_vae, its ``PatchEncoding`` and the ``LatentSpace`` of the latents.
        region: where the measured image sits in the decoded (padded) image: three slices.
        every: apply every ``every`` sampling steps (>= 1).
        num_steps: the sampler's step count (the last step is skipped).
    """

    def __init__(self, consistency: DataConsistency, vae: torch.nn.Module, scheme: PatchEncoding, space: LatentSpace,
                 region: Sequence[slice], every: int, num_steps: int) -> None:
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise MeduetConfigError(f"data_consistency_every must be an integer >= 1 (or null), got {every!r}; "
                                    "set --data_consistency_every 10")
        self.dc, self.vae, self.scheme, self.space = consistency, vae, scheme, space
        self.region = (slice(None), slice(None), *region)
        self.every, self.num_steps = int(every), int(num_steps)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, i: int, x: torch.Tensor, x0_hat: torch.Tensor, data_weight: float) -> torch.Tensor:
        if (i + 1) % self.every != 0 or i + 1 >= self.num_steps:
            return x
        image = decode_image(self.vae, self.scheme, self.space, x0_hat)
        fixed = image.clone()
        fixed[self.region] = self.dc(image[self.region])
        delta = (encode_image(self.vae, self.scheme, self.space, fixed)
                 - encode_image(self.vae, self.scheme, self.space, image))
        self.calls += 1
        return x + float(data_weight) * delta.to(x.dtype)
