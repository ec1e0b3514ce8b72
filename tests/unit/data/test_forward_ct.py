"""Tests for meduet.data.forward.ct: the parallel-beam projector, its exact transpose and FBP."""

from __future__ import annotations

import math

import pytest
import torch

from meduet.data.forward import ParallelBeamCT, fbp
from conftest import one_line_error
from meduet.errors import MeduetInputError


def _phantom(n: int = 64) -> torch.Tensor:
    """(1, 1, n, n, 2): an ellipse with a brighter disk in it (slice 0) and a smooth Gaussian blob (slice 1)."""
    c = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    x, y = torch.meshgrid(c, c, indexing="ij")
    ellipse = ((x / 24) ** 2 + (y / 18) ** 2 <= 1).float() + 0.5 * ((x - 5) ** 2 + (y + 4) ** 2 <= 36).float()
    blob = torch.exp(-((x / 16) ** 2 + (y / 12) ** 2))
    return torch.stack([ellipse, blob], dim=-1)[None, None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _one_line_error(fn, *words: str) -> str:
    return one_line_error(fn, *words, error=MeduetInputError)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adjoint_is_exact_transpose(dtype, tol):
    ct = ParallelBeamCT((24, 20), 7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 24, 20, 6, dtype=dtype, generator=gen)
    y = torch.randn(2, 1, 7, ct.num_detectors, 6, dtype=dtype, generator=gen)
    lhs, rhs = (ct(x) * y).sum(), (x * ct.adjoint(y)).sum()
    assert abs(lhs - rhs) <= tol * abs(lhs)
    assert ct(x).shape == (2, 1, 7, ct.num_detectors, 6) and ct(x).dtype == dtype


def test_default_geometry_and_memory():
    ct = ParallelBeamCT(64, 180)
    assert ct.num_detectors == 92  # ceil(64 * sqrt(2)) = 91, made even like 64
    assert torch.allclose(ct.angles, torch.arange(180, dtype=torch.float64) * math.pi / 180)
    assert ct.nbytes() < 30e6  # measured 21 MB (two CSR matrices, int32 indices)
    assert ParallelBeamCT(25, 4).num_detectors == 37
    # custom angles
    ct2 = ParallelBeamCT(16, None, num_detectors=30, angles=[0.0, 0.5, 1.0])
    assert ct2.sinogram_shape == (3, 30)
    assert not ParallelBeamCT(16, 3).state_dict()  # the matrices are rebuilt, never saved


def test_centred_point_projects_to_the_detector_centre():
    ct = ParallelBeamCT(25, 30)
    point = torch.zeros(1, 1, 25, 25, 1)
    point[0, 0, 12, 12] = 1.0
    sino = ct(point)[0, 0, :, :, 0]
    centre = ct.num_detectors // 2
    assert (sino[:, centre] > 0).all()
    off_centre = torch.cat([sino[:, :centre], sino[:, centre + 1:]], dim=1)
    assert off_centre.abs().max() == 0  # a straight line at the centre bin of every angle
    # Joseph's weight: the step length 1 / max(|cos|, |sin|)
    expected = 1 / torch.maximum(ct.angles.cos().abs(), ct.angles.sin().abs()).float()
    assert torch.allclose(sino[:, centre], expected, atol=1e-5)


def test_non_negative_image_gives_non_negative_sinogram():
    ct = ParallelBeamCT((24, 20), 13)
    sino = ct(torch.rand(3, 1, 24, 20, 4))
    assert (sino >= 0).all() and (sino > 0).any()


def test_fbp_error_grows_as_views_drop():
    img = _phantom()
    errors = {}
    for views in (180, 30, 10):
        ct = ParallelBeamCT(64, views)
        rec = fbp(ct(img), ct)
        assert rec.shape == img.shape and rec.dtype == img.dtype
        errors[views] = (_rel(rec[..., 0], img[..., 0]), _rel(rec[..., 1], img[..., 1]))
    # measured (ellipse, Gaussian): 180 views 0.079 / 0.009, 30 views 0.123 / 0.022, 10 views 0.319 / 0.035.
    # The ellipse's error at 180 views is edge blur (its sharp edges are not band-limited: Joseph interpolation and
    # the band-limited ramp smooth them over ~1 pixel); the smooth blob shows the intensities themselves are right.
    assert errors[180][0] < 0.10 and errors[180][1] < 0.02
    assert errors[30][0] > 1.3 * errors[180][0] and errors[10][0] > 2 * errors[30][0]
    assert errors[30][1] > errors[180][1] and errors[10][1] > errors[30][1]
    # the mean intensity is kept (the ramp built from its spatial kernel has the right DC)
    ct = ParallelBeamCT(64, 180)
    rec = fbp(ct(img), ct)
    assert abs(rec[..., 0].mean().item() / img[..., 0].mean().item() - 1) < 0.01
    # Shepp-Logan: slightly smoother, as close (measured 0.090)
    assert _rel(fbp(ct(img), ct, filter="shepp-logan")[..., 0], img[..., 0]) < 0.11


def test_gradient_is_the_back_projection():
    ct = ParallelBeamCT((24, 20), 9)
    x = torch.rand(1, 1, 24, 20, 2, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 9, ct.num_detectors, 2, dtype=torch.float64)
    (0.5 * (ct(x) - y).pow(2).sum()).backward()
    assert torch.allclose(x.grad, ct.adjoint(ct(x.detach()) - y), atol=1e-10)


def test_errors_one_line():
    ct = ParallelBeamCT((24, 20), 12)
    sino = ct(torch.rand(1, 1, 24, 20, 3))
    _one_line_error(lambda: ct(torch.rand(1, 1, 20, 24, 3)), "image", "expected (B, C, 24, 20, S)")
    _one_line_error(lambda: ct(torch.rand(24, 20, 3)), "image", "shape")
    _one_line_error(lambda: ct(torch.rand(1, 1, 24, 20, 3, dtype=torch.complex64)), "complex")
    _one_line_error(lambda: ct(torch.ones(1, 1, 24, 20, 3, dtype=torch.int64)), "integer")
    wrong_views = ParallelBeamCT((24, 20), 30)(torch.rand(1, 1, 24, 20, 3))
    _one_line_error(lambda: ct.adjoint(wrong_views), "sinogram", "(1, 1, 30,", "num_angles=12")
    _one_line_error(lambda: fbp(wrong_views, ct), "sinogram")
    _one_line_error(lambda: ct.adjoint(sino.to(torch.complex64)), "complex")
    bad = sino.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    _one_line_error(lambda: fbp(bad, ct), "NaN/Inf")
    _one_line_error(lambda: fbp(sino, ct, filter="hann"), "filter")
    _one_line_error(lambda: ParallelBeamCT(16, 0), "num_angles")
    _one_line_error(lambda: ParallelBeamCT(16, 4, angles=[0.0, 1.0]), "num_angles")
    _one_line_error(lambda: ParallelBeamCT((16, 16, 16), 4), "image_size")


def test_the_projector_moves_with_the_module():
    """``.to()`` moves the system matrices (torch's own ``_apply``, not shadowed) and the projection is unchanged."""
    ct = ParallelBeamCT(16, 12)
    x = torch.rand(1, 1, 16, 16, 2)
    before = ct(x)
    moved = ct.to(torch.float64).to("cpu")
    assert moved.matrix.dtype == torch.float64
    assert torch.allclose(moved(x.double()).float(), before, atol=1e-5)
