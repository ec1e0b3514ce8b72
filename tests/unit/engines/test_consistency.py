"""meduet.engines.consistency (data consistency, an option not in 3D MedDiffusion), the ``step_callback`` of
meduet.engines.sampling.sample_latents it rides on, and the ControlNet inference inputs that must equal the training
controls (meduet.workflows.diffusion.controlnet_inputs). Tiny sizes, real computations, one thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import one_line_error
from meduet.data.controls import ControlTask
from meduet.data.measurements import Acquisition, Measurement, acquisition_from_dict, simulate
from meduet.engines.consistency import DataConsistency
from meduet.engines.sampling import sample_latents
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dit import build_dit
from meduet.workflows.diffusion.controlnet import _pad, _padded
from meduet.workflows.diffusion.controlnet_inputs import acquisition_for, check_acquisition, task_of

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 12, 6)


def _truth() -> torch.Tensor:
    """(1, 1, *SHAPE) in [0, 1]: an ellipsoid with a brighter ball."""
    c = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in SHAPE]
    x, y, z = torch.meshgrid(*c, indexing="ij")
    img = 0.6 * ((x / 6) ** 2 + (y / 5) ** 2 + (z / 3) ** 2 <= 1).float()
    return (img + 0.3 * ((x - 2) ** 2 + y ** 2 + z ** 2 <= 4).float())[None, None]


def _guess(seed: int = 1) -> torch.Tensor:
    """A wrong image in [0, 1] (what a generator might decode)."""
    g = torch.Generator().manual_seed(seed)
    return (0.7 * _truth() + 0.3 * torch.rand((1, 1, *SHAPE), generator=g)).clamp(0, 1)


@pytest.mark.parametrize("spec", [
    {"modality": "mri", "mask": "cartesian", "acceleration": 4, "center_fraction": 0.1},
    {"modality": "mri", "mask": "radial", "spokes": 6},
    {"modality": "ct", "num_angles": 10},
], ids=["mri_cartesian", "mri_radial", "ct"])
def test_each_step_strictly_reduces_the_measurement_residual(spec):
    acq = acquisition_from_dict({**spec, "image_shape": list(SHAPE)})
    m = Measurement(simulate(_truth(), acq), acq)
    dc = DataConsistency(m, steps=1)
    x = _guess()
    residuals = [dc.residual(x)]
    for _ in range(4):
        x = dc(x)
        residuals.append(dc.residual(x))
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert all(b < a for a, b in zip(residuals, residuals[1:])), residuals
    assert residuals[-1] < 0.7 * residuals[0]
    # the truth is consistent: the steps leave it (almost) where it is
    assert dc.residual(_truth()) < 1e-5 and torch.allclose(dc(_truth()), _truth(), atol=1e-4)
    # more steps per call: the same as calling one-step DC repeatedly
    assert torch.allclose(DataConsistency(m, steps=4)(_guess()), x, atol=1e-5)


def test_mri_step_replaces_the_measured_samples():
    acq = acquisition_from_dict({"modality": "mri", "mask": "cartesian", "acceleration": 3, "image_shape": list(SHAPE)})
    m = Measurement(simulate(_truth(), acq), acq)
    x = _guess()
    op = m.operator()
    k = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=(-3, -2, -1)), dim=(-3, -2, -1), norm="ortho"),
                           dim=(-3, -2, -1))
    mixed = torch.where(op.mask, m.data, k)
    expected = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=(-3, -2, -1)), dim=(-3, -2, -1),
                                                  norm="ortho"), dim=(-3, -2, -1)).real.clamp(0, 1)
    assert torch.allclose(DataConsistency(m)(x), expected, atol=1e-5)


def test_pet_and_bad_steps_are_one_line():
    pet = acquisition_from_dict({"modality": "pet", "num_angles": 4, "image_shape": list(SHAPE),
                                 "total_counts": 1e4})
    m = Measurement(simulate(_truth(), pet), pet)
    one_line_error(lambda: DataConsistency(m), "pet", "data_consistency", error=MeduetConfigError)
    ct = acquisition_from_dict({"modality": "ct", "num_angles": 4, "image_shape": list(SHAPE)})
    one_line_error(lambda: DataConsistency(Measurement(simulate(_truth(), ct), ct), steps=0), "data_consistency_steps",
                   error=MeduetConfigError)


@pytest.mark.parametrize("objective,sampler", [("rflow", "rflow"), ("ddpm", "ddim"), ("ddpm", "ddpm")])
def test_step_callback_sees_every_step_and_can_steer(objective, sampler):
    torch.manual_seed(0)
    net = build_dit("tiny", in_channels=2, input_size=4, num_train_timesteps=20).eval()
    obj = DiffusionObjective(objective, num_train_timesteps=20)
    shape = (1, 2, 4, 4, 4)
    kw = dict(sampler=sampler, num_steps=20 if sampler == "ddpm" else 5)
    plain = sample_latents(net, shape, None, obj, generator=torch.Generator().manual_seed(3), **kw)
    seen = []

    def identity(i, x, x0, w):
        seen.append((i, w, x0.shape))
        return x

    same = sample_latents(net, shape, None, obj, generator=torch.Generator().manual_seed(3), step_callback=identity,
                          **kw)
    assert torch.equal(plain, same)
    assert [s[0] for s in seen] == list(range(kw["num_steps"])) and all(s[2] == shape for s in seen)
    weights = [s[1] for s in seen]
    assert all(b >= a - 1e-6 for a, b in zip(weights, weights[1:])) and 0 <= weights[0] < 1  # noise -> data
    assert abs(weights[-1] - 1.0) < 0.05
    target = torch.full(shape, 0.5)

    def pull(i, x, x0, w):  # a guidance step that replaces the predicted clean latent by a target
        return x + w * (target - x0)

    steered = sample_latents(net, shape, None, obj, generator=torch.Generator().manual_seed(3), step_callback=pull,
                             **kw)
    assert (steered - target).abs().mean() < 0.2 * (plain - target).abs().mean()


@pytest.mark.parametrize("task", [ControlTask("mri", acceleration=4, center_fraction=0.08, seed=5),
                                  ControlTask("mri", acceleration=8),
                                  ControlTask("ct", views=9)], ids=["mri4", "mri8", "ct9"])
def test_inference_controls_equal_the_training_controls(task):
    """simulate_from measures a clean scan with acquisition_for: its classical reconstruction, clipped, is exactly
    what ControlTask.degrade gave the training cache."""
    image = _truth()
    acq = acquisition_for(task, SHAPE, np.eye(4), seed=11)
    control = Measurement(simulate(image, acq), acq).classical().clamp(0, 1)
    assert torch.allclose(control, task.degrade(image, seed=11), atol=1e-6)
    assert task_of(dict(task.settings())) == task


def test_acquisition_check_warns_or_errors():
    task = ControlTask("mri", acceleration=4)
    good = Acquisition("mri", SHAPE, spacing=(1.5, 1.5, 1.5), mask="cartesian", acceleration=4)
    prep = {"spacing": [1.5, 1.5, 1.5]}
    assert check_acquisition(good, task, prep, "warn", "acq.json") == {"matches": True, "differences": []}
    other = Acquisition("mri", SHAPE, spacing=(1.5, 1.5, 1.5), mask="cartesian", acceleration=8)
    with pytest.warns(UserWarning, match="acceleration 8"):
        check = check_acquisition(other, task, prep, "warn", "acq.json")
    assert check["matches"] is False and "acceleration 8 (trained: 4)" in check["differences"]
    one_line_error(lambda: check_acquisition(other, task, prep, "error", "acq.json"), "acq.json", "acceleration 8",
                   error=MeduetInputError)
    with pytest.warns(UserWarning, match="spacing"):
        check_acquisition(Acquisition("mri", SHAPE, mask="cartesian", acceleration=4), task, prep, "warn", "a.json")
    ct = Acquisition("ct", SHAPE, num_angles=30)
    one_line_error(lambda: check_acquisition(ct, task, prep, "warn", "acq.json"), "ct acquisition", "'mri'",
                   error=MeduetInputError)


def test_padding_puts_the_volume_back_where_it_was():
    size, region = _padded((28, 20, 30), 8)
    assert size == [32, 24, 32]
    x = torch.rand(1, 1, 28, 20, 30)
    padded = _pad(x, size, region)
    assert torch.equal(padded[(..., *region)], x) and float(padded.sum()) == pytest.approx(float(x.sum()), rel=1e-5)
