"""Tests for meduet.data.forward.mri: k-space masks, the masked centred FFT and its exact adjoint."""

from __future__ import annotations

import math

import pytest
import torch

from meduet.data.forward import MRIForward, cartesian_mask, radial_mask
from conftest import one_line_error
from meduet.errors import MeduetInputError

SHAPE = (24, 20, 6)  # not powers of two


def _ellipsoid(n: int = 32) -> torch.Tensor:
    """(1, 1, n, n, n): an ellipsoid with a brighter ball inside (a piecewise-constant phantom)."""
    c = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    img = ((x / 12) ** 2 + (y / 10) ** 2 + (z / 11) ** 2 <= 1).float()
    img = img + 0.5 * ((x - 3) ** 2 + (y + 2) ** 2 + z ** 2 <= 16).float()
    return img[None, None]


def _one_line_error(fn, *words: str) -> str:
    return one_line_error(fn, *words, error=MeduetInputError)


@pytest.mark.parametrize("pattern", ["1d", "2d"])
@pytest.mark.parametrize("acceleration", [1, 2, 4, 8])
def test_cartesian_mask_fraction_centre_and_readout(pattern, acceleration):
    shape = (16, 64, 48)
    mask = cartesian_mask(shape, acceleration, 0.08, seed=3, pattern=pattern)
    assert mask.shape == shape and mask.dtype == torch.bool
    n_units = shape[1] if pattern == "1d" else shape[1] * shape[2]
    # the achieved fraction is 1/R within one line/point (rounding)
    assert abs(mask.float().mean().item() - 1 / acceleration) <= 1 / n_units + 1e-9
    # readout (axis S1) fully sampled: every S1 position sees the same phase-encode pattern
    assert torch.equal(mask, mask[:1].expand_as(mask))
    if pattern == "1d":  # lines along S2, the same for every S3 position
        assert torch.equal(mask, mask[:, :, :1].expand_as(mask))
    # fully sampled centre block: round(0.08 * 64) = 5 lines around 32 (and round(0.08 * 48) = 4 around 24)
    assert mask[:, 30:35].all() if pattern == "1d" else mask[:, 30:35, 22:26].all()


def test_cartesian_mask_seed_deterministic_and_different():
    a = cartesian_mask(SHAPE, 4, 0.1, seed=0)
    assert torch.equal(a, cartesian_mask(SHAPE, 4, 0.1, seed=0))
    assert not torch.equal(cartesian_mask((8, 64, 4), 4, 0.1, seed=0), cartesian_mask((8, 64, 4), 4, 0.1, seed=1))
    b = cartesian_mask(SHAPE, 4, 0.1, seed=5, pattern="2d")
    assert torch.equal(b, cartesian_mask(SHAPE, 4, 0.1, seed=5, pattern="2d"))


def test_radial_mask_spokes_through_centre():
    shape = (32, 32, 4)
    mask = radial_mask(shape, 8)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert torch.equal(mask, mask[:, :, :1].expand_as(mask))  # stack of stars: the same for every S3 position
    assert mask[16, 16, 0]  # the centre
    assert mask[:, 16, 0].all()  # spoke at angle 0: the whole S1 line through the centre
    assert mask[16, :, 0].all()  # spoke at angle pi/2 (k = 4 of 8)
    fractions = [radial_mask(shape, k).float().mean().item() for k in (4, 8, 32)]
    assert fractions[0] < fractions[1] < fractions[2] < 1
    assert torch.equal(radial_mask(shape, 5, golden_angle=True), radial_mask(shape, 5, golden_angle=True))


@pytest.mark.parametrize("pattern", ["1d", "2d"])
def test_adjoint_complex_inner_product(pattern):
    gen = torch.Generator().manual_seed(0)
    op = MRIForward(cartesian_mask(SHAPE, 3, 0.1, pattern=pattern))
    x = torch.randn(2, 1, *SHAPE, dtype=torch.complex128, generator=gen)
    y = torch.randn(2, 1, *SHAPE, dtype=torch.complex128, generator=gen)
    lhs = torch.vdot(op(x).flatten(), y.flatten())  # <A x, y> (vdot conjugates its first argument)
    rhs = torch.vdot(x.flatten(), op.adjoint(y).flatten())  # <x, A^H y>
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    # float32 / complex64 too, to the requested 1e-5
    x32, y32 = x.to(torch.complex64), y.to(torch.complex64)
    lhs32 = torch.vdot(op(x32).flatten(), y32.flatten())
    rhs32 = torch.vdot(x32.flatten(), op.adjoint(y32).flatten())
    assert abs(lhs32 - rhs32) <= 1e-5 * abs(lhs32)


def test_forward_real_input_is_complex_and_zero_outside_mask():
    mask = cartesian_mask(SHAPE, 4, 0.1)
    op = MRIForward(mask)
    k = op(torch.rand(1, 1, *SHAPE))
    assert k.dtype == torch.complex64 and k.shape == (1, 1, *SHAPE)
    assert (k[..., ~mask] == 0).all() and (k[..., mask] != 0).any()
    assert op(torch.rand(1, 1, *SHAPE, dtype=torch.float64)).dtype == torch.complex128


def test_fully_sampled_zero_filled_is_magnitude_and_centre_is_dc():
    x = torch.randn(2, 1, *SHAPE, dtype=torch.complex64)
    op = MRIForward(torch.ones(SHAPE, dtype=torch.bool))
    assert torch.allclose(op.zero_filled(op(x)), x.abs(), atol=1e-5)
    # centred, orthonormal: the DC sample sits at S // 2 and equals sum(x) / sqrt(N)
    k = op(x)
    assert torch.allclose(k[:, :, 12, 10, 3], x.sum(dim=(2, 3, 4)) / math.sqrt(24 * 20 * 6), atol=1e-4)


def test_zero_filled_aliasing_grows_with_acceleration():
    img = _ellipsoid()
    errors = {}
    for r in (2, 4):
        op = MRIForward(cartesian_mask(img.shape[2:], r, 0.08, seed=0))
        zf = op.zero_filled(op(img))
        assert zf.dtype == torch.float32 and zf.shape == img.shape and (zf >= 0).all()
        errors[r] = ((zf - img).norm() / img.norm()).item()
    # measured: 0.28 at x2, 0.32 at x4
    assert 0.05 < errors[2] < errors[4]


def test_gradient_flows_through_forward():
    op = MRIForward(cartesian_mask(SHAPE, 2, 0.1))
    x = torch.rand(1, 1, *SHAPE, dtype=torch.float64, requires_grad=True)
    y = op(torch.rand(1, 1, *SHAPE, dtype=torch.float64))
    loss = 0.5 * (op(x) - y).abs().pow(2).sum()
    loss.backward()
    # d/dx of 0.5 ||A x - y||^2 for real x is Re(A^H (A x - y))
    assert torch.allclose(x.grad, op.adjoint(op(x.detach()) - y).real, atol=1e-10)


def test_errors_one_line():
    op = MRIForward(cartesian_mask(SHAPE, 2, 0.1))
    k = op(torch.rand(1, 1, *SHAPE))
    _one_line_error(lambda: cartesian_mask(SHAPE, 0.5, 0.1), "acceleration", "R >= 1")
    _one_line_error(lambda: cartesian_mask(SHAPE, 4, 0.0), "center_fraction")
    _one_line_error(lambda: cartesian_mask(SHAPE, 4, 1.0), "center_fraction")
    _one_line_error(lambda: cartesian_mask(SHAPE, 4, 0.1, pattern="3d"), "pattern")
    _one_line_error(lambda: cartesian_mask((24, 20), 4, 0.1), "shape")
    _one_line_error(lambda: radial_mask(SHAPE, 0), "spokes")
    _one_line_error(lambda: MRIForward(torch.ones(4, 4)), "3D mask")
    _one_line_error(lambda: op(torch.rand(1, *SHAPE)), "shape", "expected (B, C, 24, 20, 6)")
    _one_line_error(lambda: op(torch.rand(1, 1, 24, 20, 7)), "(1, 1, 24, 20, 7)")
    _one_line_error(lambda: op.adjoint(k.abs()), "real", "complex")
    _one_line_error(lambda: op.zero_filled(k.real), "real")
    bad = k.clone()
    bad[0, 0, 0, 0, 0] = complex(float("nan"), 0)
    _one_line_error(lambda: op.zero_filled(bad), "NaN/Inf")
