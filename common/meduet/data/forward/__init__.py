"""Differentiable forward models (measurement operators) of 3D volumes, in torch: undersampled single-coil MRI,
sparse-view parallel-beam CT and attenuation-free PET, each with its exact adjoint and a classical reconstruction
(zero-filled, FBP, MLEM). They are what a ControlNet for sparse-view CT / undersampled MRI is conditioned on and
what an implicit neural representation is fitted through.

- ``mri``: ``cartesian_mask``, ``radial_mask``, ``MRIForward`` (masked centred orthonormal 3D FFT).
- ``ct``: ``ParallelBeamCT`` (Joseph's method as a sparse matrix, slice by slice over ``S3``), ``fbp``.
- ``pet``: ``PETForward``, ``simulate_counts``, ``mlem``, ``poisson_log_likelihood``.

Images are ``(B, C, S1, S2, S3)`` (``C = 1`` in the usual case; every channel is transformed alike), k-space the
same shape (complex), sinograms ``(B, C, num_angles, num_detectors, S3)``. Bad inputs (wrong shape, complex where real
is needed or the reverse, NaN/Inf measurements, negative counts, acceleration < 1, ...) raise a one-line
``MeduetInputError``.

Why our own rather than DeepInverse (``deepinv`` 0.5.0, whose ``physics.MRI`` and ``physics.Tomography`` cover much of
this): its package imports ``torchvision`` at import time and declares it a dependency. Installed without pins it
replaces the project's CPU torch 2.13.0 by torch 2.14.1+cu130 plus ~5 GB of CUDA libraries (torchvision 0.29.1);
beside torch 2.13.0+cpu, pip picks torchvision 0.28.0 and ``import deepinv`` fails with ``RuntimeError: operator
torchvision::nms does not exist``. The bundles would have to carry that dependency chain; these operators need
only torch, numpy and a few hundred lines.
"""

from __future__ import annotations

from meduet.data.forward.ct import FILTERS, ParallelBeamCT, fbp, ramp_filter
from meduet.data.forward.mri import MRIForward, cartesian_mask, radial_mask
from meduet.data.forward.pet import PETForward, mlem, poisson_log_likelihood, simulate_counts

__all__ = ["cartesian_mask", "radial_mask", "MRIForward", "ParallelBeamCT", "fbp", "ramp_filter", "FILTERS",
           "PETForward", "simulate_counts", "mlem", "poisson_log_likelihood"]
