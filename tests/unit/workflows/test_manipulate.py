"""The manipulation direction (meduet.workflows.diffusion.manipulate): a probe fitted on codes, its edit step of one
standard deviation of the codes along the probe's direction, and the nearest-class-mean volume measurement."""

from __future__ import annotations

import numpy as np
import pytest

from meduet.errors import MeduetConfigError
from meduet.workflows.diffusion.manipulate import fit_direction, nearest_mean_volume


def _codes(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes of 8 dims with very different spreads; the attribute is read from dims 0 and 3 only."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(n, 8)) * np.array([5.0, 1.0, 0.1, 2.0, 1.0, 1.0, 3.0, 0.5]) + 10.0
    value = 2.0 * (codes[:, 0] - 10.0) / 5.0 - 1.0 * (codes[:, 3] - 10.0) / 2.0 + 0.01 * rng.normal(size=n)
    return codes, value


def test_step_is_one_code_sd_along_the_probe_and_moves_the_reading_by_its_gain():
    codes, value = _codes()
    d = fit_direction(codes, value.tolist())
    assert d.task == "regression"
    step = d.step
    # in the standardised code space the step is a unit vector along the probe's weights
    assert np.linalg.norm(step / d.sd) == pytest.approx(1.0, rel=1e-9)
    assert np.allclose(step / d.sd, d.coef / np.linalg.norm(d.coef))
    # it goes where the attribute is read (dims 0 and 3, in their own scales), not along the other dims
    assert abs(step[0]) > 10 * abs(step[2]) and abs(step[3]) > 10 * abs(step[5])
    assert np.sign(step[0]) == 1 and np.sign(step[3]) == -1
    # s steps move the reading by s |coef| exactly (the probe is linear), the same for every code
    for s in (-2.0, 1.0, 3.0):
        moved = d.read(codes + s * step) - d.read(codes)
        assert np.allclose(moved, s * np.linalg.norm(d.coef))
    # the probe reads the attribute: its unit is the spread of its reading, near the attribute's own
    assert d.unit == pytest.approx(value.std(), rel=0.05)


def test_binary_attribute_gives_a_logistic_direction_and_more_classes_are_refused():
    codes, value = _codes()
    d = fit_direction(codes, (value > 0).astype(int).tolist())
    assert d.task == "classification"
    assert np.mean((d.read(codes) > 0) == (value > 0)) > 0.9
    with pytest.raises(MeduetConfigError, match="binary attribute"):
        fit_direction(codes, np.digitize(value, [-1, 0, 1]).tolist(), task="classification")


def test_nearest_mean_volume_counts_the_voxels_nearest_the_organs_mean():
    vol = np.zeros((10, 10, 10), dtype=np.float32)
    vol[2:5, 2:5, 2:5] = 0.8  # 27 voxels at the organ's mean
    vol[6:8, 6:8, 6:8] = 0.55  # 8 voxels nearer the organ (0.8) than the body (0.3)
    body = np.ones_like(vol, dtype=bool)
    vol[~(vol > 0)] = 0.3
    means = {1: 0.3, 3: 0.8}
    assert nearest_mean_volume(vol, means, body, [3], voxel_ml=0.5) == pytest.approx(35 * 0.5)
    assert nearest_mean_volume(vol, means, body, [1], voxel_ml=1.0) == pytest.approx(1000 - 35)
