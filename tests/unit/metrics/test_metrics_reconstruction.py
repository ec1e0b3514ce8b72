"""Reconstruction metrics: the anatomy check that tells lost anatomy from noise not copied."""

from __future__ import annotations

import math

import pytest
import torch

from meduet.metrics.reconstruction import anatomy_fidelity


def _phantom():
    label = torch.zeros(24, 24, 24, dtype=torch.long)
    label[4:20, 4:20, 4:20] = 1  # body
    label[6:16, 6:16, 6:16] = 2  # organ
    clean = torch.zeros(24, 24, 24)
    clean[label == 1] = 0.4
    clean[label == 2] = 0.7
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return label, clean, noisy


def test_a_noise_free_reconstruction_scores_the_ceiling_and_keeps_the_contrast():
    label, clean, noisy = _phantom()
    m = anatomy_fidelity(clean, noisy, clean, label, {"organ": 2, "absent": 3})
    assert m["psnr_noise_free"] == math.inf
    assert m["psnr"] == pytest.approx(m["psnr_ceiling"])
    mse = float(((clean - noisy) ** 2).mean())
    assert m["psnr_ceiling"] == pytest.approx(10 * math.log10(1 / mse))
    assert m["contrast_kept_organ"] == pytest.approx(1.0)
    assert math.isnan(m["contrast_kept_absent"])


def test_contrast_kept_follows_how_far_the_organ_fades_into_the_body():
    label, clean, noisy = _phantom()
    for fade in (0.0, 0.5, 1.0):
        recon = clean.clone()
        recon[label == 2] = 0.7 - fade * 0.3  # fade 1: the organ at the value of the body around it
        m = anatomy_fidelity(recon, noisy, clean, label, {"organ": 2})
        assert m["contrast_kept_organ"] == pytest.approx(1.0 - fade, abs=1e-5)
    assert m["psnr_noise_free"] < m["psnr_ceiling"]  # a vanished organ costs more than the noise
    with pytest.raises(ValueError):
        anatomy_fidelity(clean[:2], noisy, clean, label, {"organ": 2})


def test_contrast_is_measured_against_the_structure_around_it():
    """A lesion inside an organ is compared with the organ around it, not with the distant body."""
    label, clean, noisy = _phantom()
    label[9:12, 9:12, 9:12] = 4  # lesion inside the organ (organ 6:16)
    clean[label == 4] = 0.9  # +0.2 over the organ, +0.5 over the body
    recon = clean.clone()
    recon[label == 4] = 0.8  # half of the contrast to the organ left
    m = anatomy_fidelity(recon, noisy, clean, label, {"lesion": 4, "organ": 2})
    assert m["contrast_kept_lesion"] == pytest.approx(0.5, abs=1e-5)
    assert m["contrast_kept_organ"] == pytest.approx(1.0, abs=0.01)  # its shell: the body (and the lesion within)
    faint = clean.clone()
    faint[label == 4] = 0.702  # a "lesion" with no contrast: its ratio would be noise
    assert math.isnan(anatomy_fidelity(faint, noisy, faint, label, {"lesion": 4})["contrast_kept_lesion"])
