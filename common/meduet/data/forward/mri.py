"""Single-coil MRI: k-space sampling masks and the masked, centred, orthonormal 3D Fourier transform.

Convention: a volume ``(S1, S2, S3)`` is acquired with the readout (frequency encoding) along axis 1 (``S1``), always
fully sampled; ``S2`` and ``S3`` are phase-encode axes. k-space is *centred*: the zero frequency of an axis of
length ``n`` sits at index ``n // 2`` (``fftshift`` convention), so masks are built around that index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from meduet.data.forward._checks import check_complex, check_finite, check_volume
from meduet.errors import MeduetInputError

__all__ = ["cartesian_mask", "radial_mask", "MRIForward"]

_DIMS = (-3, -2, -1)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise MeduetInputError(f"k-space mask shape {shape!r} is not three positive sizes; pass (S1, S2, S3)")
    return out  # type: ignore[return-value]


def _centre_block(n: int, fraction: float) -> np.ndarray:
    """Indices of the fully sampled centre of an axis of length ``n``: ``max(1, round(fraction * n))`` indices
    around ``n // 2``."""
    k = min(n, max(1, int(round(fraction * n))))
    start = n // 2 - k // 2
    return np.arange(start, start + k)


def _fill_random(sampled: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Add uniformly drawn unsampled entries to the flat boolean ``sampled`` until ``target`` are sampled."""
    missing = target - int(sampled.sum())
    if missing > 0:
        free = np.flatnonzero(~sampled)
        sampled[rng.choice(free, size=missing, replace=False)] = True
    return sampled


def cartesian_mask(shape: Sequence[int], acceleration: float, center_fraction: float, seed: int = 0,
                   pattern: str = "1d") -> torch.Tensor:
    """A random Cartesian undersampling mask of a 3D k-space.

    Args:
        shape: ``(S1, S2, S3)``; the readout axis ``S1`` is fully sampled.
        acceleration: ``R >= 1``; ``round(N / R)`` of the ``N`` phase-encode lines (``"1d"``: ``N = S2``) or points
            (``"2d"``: ``N = S2 * S3``) are sampled, so the sampled fraction is ``1 / R`` up to rounding (more if
            the centre block alone is larger).
        center_fraction: in ``(0, 1)``; the centre ``round(center_fraction * S)`` indices of each undersampled axis
            (at least one) are always sampled (the autocalibration region; a block in the ``(S2, S3)`` plane for
            ``"2d"``).
        seed: the other lines/points are drawn uniformly without replacement by ``numpy.random.default_rng(seed)``:
            the same arguments always give the same mask.
        pattern: ``"1d"``: phase-encode lines along ``S2``, the same for every ``S3`` position (a 2D-multislice or
            stack-of-lines acquisition); ``"2d"``: points of the ``(S2, S3)`` phase-encode plane (3D Cartesian).

    Returns:
        bool tensor ``(S1, S2, S3)``, True where k-space is sampled (centred k-space).
    """
    s1, s2, s3 = _check_shape(shape)
    if not np.isfinite(acceleration) or acceleration < 1:
        raise MeduetInputError(f"acceleration {acceleration!r} is below 1 (or not finite); pass R >= 1 "
                               "(1 = fully sampled, 4 = a quarter of k-space)")
    if not 0 < center_fraction < 1:
        raise MeduetInputError(f"center_fraction {center_fraction!r} is outside (0, 1); pass the fraction of each "
                               "undersampled axis kept fully sampled at the centre, e.g. 0.08")
    rng = np.random.default_rng(seed)
    if pattern == "1d":
        lines = np.zeros(s2, dtype=bool)
        lines[_centre_block(s2, center_fraction)] = True
        lines = _fill_random(lines, int(round(s2 / acceleration)), rng)
        plane = np.broadcast_to(lines[:, None], (s2, s3))
    elif pattern == "2d":
        block = np.zeros((s2, s3), dtype=bool)
        block[np.ix_(_centre_block(s2, center_fraction), _centre_block(s3, center_fraction))] = True
        plane = _fill_random(block.ravel(), int(round(s2 * s3 / acceleration)), rng).reshape(s2, s3)
    else:
        raise MeduetInputError(f"unknown mask pattern {pattern!r}; pass '1d' (lines along S2) or '2d' (points of the "
                               "(S2, S3) plane)")
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(plane[None], (s1, s2, s3))))


def radial_mask(shape: Sequence[int], spokes: int, golden_angle: bool = False, angle_offset: float = 0.0
                ) -> torch.Tensor:
    """A stack-of-stars mask: ``spokes`` radial lines through the k-space centre of every axial ``(S1, S2)`` plane,
    the same for every ``S3`` position (``S3`` is the Cartesian, fully sampled partition axis).

    Spoke ``k`` has angle ``angle_offset + k * pi / spokes`` (or ``k * 111.246...`` degrees with ``golden_angle``)
    and runs through the centre ``(S1 // 2, S2 // 2)`` across the whole plane. Rasterisation is nearest-grid: points
    every half grid step along the line are rounded to the nearest k-space sample (no gridding/density
    compensation; the sampled fraction is ``mask.float().mean()``, denser near the centre as in radial MRI).

    Returns:
        bool tensor ``(S1, S2, S3)``.
    """
    s1, s2, s3 = _check_shape(shape)
    if int(spokes) < 1:
        raise MeduetInputError(f"spokes {spokes!r} is below 1; pass the number of radial lines per plane, e.g. 32")
    step = np.pi * (np.sqrt(5.0) - 1.0) / 2.0 if golden_angle else np.pi / int(spokes)
    theta = angle_offset + step * np.arange(int(spokes))
    radius = 0.5 * np.hypot(s1, s2) + 1.0
    t = np.arange(-radius, radius + 0.25, 0.5)
    c1 = np.rint(s1 // 2 + np.cos(theta)[:, None] * t[None]).astype(np.int64).ravel()
    c2 = np.rint(s2 // 2 + np.sin(theta)[:, None] * t[None]).astype(np.int64).ravel()
    keep = (c1 >= 0) & (c1 < s1) & (c2 >= 0) & (c2 < s2)
    plane = np.zeros((s1, s2), dtype=bool)
    plane[c1[keep], c2[keep]] = True
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(plane[:, :, None], (s1, s2, s3))))


def _fft(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=_DIMS), dim=_DIMS, norm="ortho"), dim=_DIMS)


def _ifft(y: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(y, dim=_DIMS), dim=_DIMS, norm="ortho"), dim=_DIMS)


class MRIForward(nn.Module):
    """Single-coil Cartesian/non-Cartesian-on-grid MRI: ``A = M F``, with ``F`` the centred orthonormal 3D DFT
    (unitary, image centre at index ``S // 2`` maps to k-space centre at ``S // 2``) and ``M`` the sampling mask.

    ``adjoint`` is the exact adjoint ``A^H = F^H M`` (``<A x, y> = <x, A^H y>``); ``F`` being unitary, a fully
    sampled mask gives ``adjoint(forward(x)) == x``. All three maps are differentiable. They apply to every
    channel ``C`` alike (the single-coil model has ``C = 1``). ``forward``/``adjoint`` check shapes and dtypes
    only; ``zero_filled`` also rejects NaN/Inf measurements.

    Args:
        mask: bool (or 0/1) tensor ``(S1, S2, S3)``, e.g. from ``cartesian_mask`` or ``radial_mask``; stored as a
            buffer (it follows ``.to(device)`` and is saved in the ``state_dict``).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.ndim != 3:
            raise MeduetInputError(f"MRI mask has shape {tuple(mask.shape)}; pass a 3D mask (S1, S2, S3)")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise MeduetInputError("MRI mask has values other than 0 and 1; pass a boolean sampling mask")
            mask = mask != 0
        self.register_buffer("mask", mask)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The image and k-space grid ``(S1, S2, S3)``."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, S1, S2, S3)``, real or complex -> masked centred k-space, complex, same shape (zeros where
        not sampled). Real float32 input gives complex64, float64 gives complex128."""
        check_volume(x, "image", self.shape, "MRIForward")
        if not x.is_complex():
            if not x.is_floating_point():
                raise MeduetInputError(f"image for MRIForward has integer dtype {x.dtype}; convert it with .float()")
            x = torch.complex(x, torch.zeros_like(x))
        return _fft(x) * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """k-space ``(B, C, S1, S2, S3)``, complex -> image ``A^H y``, complex, same shape (entries outside the
        mask are ignored)."""
        check_volume(y, "k-space", self.shape, "MRIForward.adjoint")
        check_complex(y, "k-space", "MRIForward.adjoint")
        return _ifft(y * self.mask)

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """The zero-filled reconstruction: ``|A^H y|``, real ``(B, C, S1, S2, S3)`` (the magnitude image a scanner
        shows for undersampled k-space without further reconstruction)."""
        check_volume(y, "k-space", self.shape, "MRIForward.zero_filled")
        check_complex(y, "k-space", "MRIForward.zero_filled")
        check_finite(y, "k-space")
        return self.adjoint(y).abs()
