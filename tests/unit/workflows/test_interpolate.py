"""meduet.workflows.diffusion.interpolate: slerp and the choice of (first, middle, last) scans per subject."""

from __future__ import annotations

import math

import torch

from meduet.workflows.diffusion.interpolate import lerp, slerp, triplets


def test_slerp_keeps_the_norm_of_orthogonal_noises_and_meets_its_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, 8, generator=g), torch.randn(3, 4, 8, 8, 8, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    # Gaussian noises of 2048 values are nearly orthogonal: slerp keeps their norm, lerp shrinks it by ~1/sqrt(2)
    ratio = (mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean().item()
    assert abs(ratio - 1.0) < 0.05
    assert abs((lerp(a, b, 0.5).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean().item()
               - 1 / math.sqrt(2)) < 0.05
    torch.testing.assert_close(slerp(a, a.clone(), 0.3), a)  # parallel: no division by zero


def test_triplets_by_subject_and_age():
    items = [{"latent": f"{s}_v{v}.nii.gz", "subject": s, "age": 30.0 + 10 * v + (5 if s == "b" else 0), "visit": v}
             for s in ("a", "b") for v in (2, 0, 1, 3)]
    items.append({"latent": "c_v0.nii.gz", "subject": "c", "age": 40.0, "visit": 0})  # one scan: no triplet
    out = triplets(items)
    assert [(a["latent"], m["latent"], b["latent"]) for a, m, b, _ in out] == [
        ("a_v0.nii.gz", "a_v1.nii.gz", "a_v3.nii.gz"), ("a_v0.nii.gz", "a_v2.nii.gz", "a_v3.nii.gz"),
        ("b_v0.nii.gz", "b_v1.nii.gz", "b_v3.nii.gz"), ("b_v0.nii.gz", "b_v2.nii.gz", "b_v3.nii.gz")]
    assert [round(w, 4) for *_, w in out] == [0.3333, 0.6667, 0.3333, 0.6667]
