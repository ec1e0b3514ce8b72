"""Tests for meduet.data.measurements: acquisition JSONs, measurement files (npy / npz / NIfTI round trips), their
one-line errors, and simulate / classical against meduet.data.forward."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import one_line_error
from meduet.data.forward import MRIForward, ParallelBeamCT, PETForward, cartesian_mask, fbp, mlem, radial_mask
from meduet.data.forward import simulate_counts
from meduet.data.measurements import (Acquisition, Measurement, acquisition_from_dict, read_acquisition,
                                      read_measurement, simulate, write_measurement)
from meduet.errors import MeduetInputError

SHAPE = (12, 10, 4)
MRI = {"modality": "mri", "image_shape": list(SHAPE), "mask": "cartesian", "acceleration": 2, "center_fraction": 0.2,
       "seed": 3}
CT = {"modality": "ct", "image_shape": list(SHAPE), "num_angles": 9}
PET = {"modality": "pet", "image_shape": list(SHAPE), "num_angles": 9, "total_counts": 5e4}


def _err(fn, *words: str) -> str:
    return one_line_error(fn, *words, error=MeduetInputError)


def _image(seed: int = 0) -> torch.Tensor:
    """(1, 1, *SHAPE): a positive blob plus noise."""
    g = torch.Generator().manual_seed(seed)
    c = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in SHAPE]
    x, y, z = torch.meshgrid(*c, indexing="ij")
    blob = ((x / 5) ** 2 + (y / 4) ** 2 + (z / 3) ** 2 <= 1).float()
    return (blob + 0.1 * torch.rand(SHAPE, generator=g))[None, None]


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("spec", [MRI, CT, PET], ids=["mri", "ct", "pet"])
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".nii.gz", ".nii"])
def test_round_trip(tmp_path, spec, suffix):
    acq = acquisition_from_dict(dict(spec))
    y = simulate(_image(), acq, seed=1)
    assert y.shape == (1, 1, *acq.measurement_shape())
    assert y.dtype == (torch.complex64 if acq.is_complex else torch.float32)
    written = write_measurement(tmp_path / f"m{suffix}", y, acq, tmp_path / "acq.json")
    back = read_measurement(tmp_path / f"m{suffix}", tmp_path / "acq.json")
    assert back.acquisition == acq and written.acquisition == acq
    assert back.data.dtype == y.dtype and torch.equal(back.data, y)
    assert back.path == str(tmp_path / f"m{suffix}")
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_acquisition_json_round_trip_and_defaults(tmp_path):
    affine = [[0, -1.5, 0, 10], [2.0, 0, 0, -4], [0, 0, 1.25, 3], [0, 0, 0, 1]]
    acq = read_acquisition(_write_json(tmp_path / "a.json", {**CT, "affine": affine}))
    assert acq.spacing == (2.0, 1.5, 1.25) and np.allclose(acq.affine_array, affine)
    assert read_acquisition(_write_json(tmp_path / "b.json", acq.to_json())) == acq
    plain = acquisition_from_dict({**CT, "spacing": [1.5, 1.5, 2.0]})
    assert np.allclose(plain.affine_array, np.diag([1.5, 1.5, 2.0, 1.0]))
    # default detector count = the projector's; to_json pins it
    assert plain.measurement_shape() == (9, *ParallelBeamCT(SHAPE[:2], 9).sinogram_shape[1:], SHAPE[2])
    assert plain.to_json()["num_detectors"] == plain.measurement_shape()[1]
    for shape in [(16, 16), (15, 16), (7, 31)]:
        a = acquisition_from_dict({"modality": "ct", "image_shape": [*shape, 2], "num_angles": 3})
        assert a.measurement_shape()[1] == ParallelBeamCT(shape, 3).num_detectors


def test_mask_file_relative_to_json(tmp_path):
    mask = cartesian_mask(SHAPE, 3, 0.2, seed=5).numpy()
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "mask.npy", mask)
    acq = read_acquisition(_write_json(tmp_path / "sub" / "a.json", {"modality": "mri", "image_shape": list(SHAPE),
                                                                      "mask_file": "mask.npy"}))
    assert torch.equal(acq.operator().mask, torch.from_numpy(mask))
    y = simulate(_image(), acq)
    # written elsewhere: the JSON points back to the same mask by a relative path
    write_measurement(tmp_path / "k.npy", y, acq, tmp_path / "a2.json")
    assert json.loads((tmp_path / "a2.json").read_text())["mask_file"] == "sub/mask.npy"
    assert torch.equal(read_measurement(tmp_path / "k.npy", tmp_path / "a2.json").operator().mask, acq.operator().mask)
    np.save(tmp_path / "sub" / "mask.npy", mask[:, :, :2])
    _err(lambda: acq.operator(), "mask.npy", "image_shape")


def test_simulate_and_classical_agree_with_forward():
    x = _image()
    mri = acquisition_from_dict(dict(MRI))
    op = MRIForward(cartesian_mask(SHAPE, 2, 0.2, seed=3))
    assert torch.equal(mri.operator().mask, op.mask)
    y = simulate(x, mri)
    assert torch.allclose(y, op(x), atol=1e-6)
    assert torch.allclose(Measurement(y, mri).classical(), op.zero_filled(op(x)), atol=1e-6)
    radial = acquisition_from_dict({"modality": "mri", "image_shape": list(SHAPE), "mask": "radial", "spokes": 5})
    assert torch.equal(radial.operator().mask, radial_mask(SHAPE, 5))

    ct = acquisition_from_dict(dict(CT))
    proj = ParallelBeamCT(SHAPE[:2], 9)
    y = simulate(x[0, 0].numpy(), ct)  # (S1, S2, S3) numpy input too
    assert torch.allclose(y, proj(x), atol=1e-5)
    assert torch.allclose(Measurement(y, ct).classical(), fbp(proj(x), proj), atol=1e-5)

    pet = acquisition_from_dict(dict(PET))
    sysm = PETForward(SHAPE[:2], 9)
    counts = simulate(x, pet, seed=4)
    assert torch.equal(counts, simulate_counts(x, sysm, 5e4, seed=4))
    assert abs(float(counts.sum()) / 5e4 - 1) < 0.05 and torch.equal(counts, counts.round())
    assert torch.allclose(Measurement(counts, pet).classical(7), mlem(counts, sysm, 7), rtol=1e-5, atol=1e-6)
    assert not torch.equal(counts, simulate(x, pet, seed=5))


def test_classical_recovers_image_with_full_sampling():
    x = _image()
    full = acquisition_from_dict({**MRI, "acceleration": 1})
    assert torch.allclose(Measurement(simulate(x, full), full).classical(), x, atol=1e-5)


@pytest.mark.parametrize("data, words", [
    ("not json", ["unreadable", "JSONDecodeError"]),
    ([1, 2], ["not an object"]),
    ({"image_shape": [4, 4, 4]}, ["no 'modality'"]),
    ({"modality": "xray", "image_shape": [4, 4, 4]}, ["unknown modality", "'xray'"]),
    ({"modality": "ct", "num_angles": 4}, ["no 'image_shape'"]),
    ({"modality": "ct", "image_shape": [4, 4]}, ["image_shape"]),
    ({"modality": "ct", "image_shape": [4, 0, 4], "num_angles": 4}, ["image_shape"]),
    ({"modality": "ct", "image_shape": [4, 4, 4]}, ["num_angles"]),
    ({"modality": "ct", "image_shape": [4, 4, 4], "num_angles": 2.5}, ["num_angles", "integer"]),
    ({"modality": "ct", "image_shape": [4, 4, 4], "num_angles": 4, "acceleration": 4}, ["unknown keys",
                                                                                       "acceleration"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "acceleraton": 4, "mask": "cartesian"}, ["acceleraton"]),
    ({"modality": "mri", "image_shape": [4, 4, 4]}, ["'mask'"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "cartesian"}, ["acceleration"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "cartesian", "acceleration": 0.5}, ["acceleration"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "cartesian", "acceleration": 2, "center_fraction": 1},
     ["center_fraction"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "cartesian", "acceleration": 2, "pattern": "3d"},
     ["pattern"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "radial"}, ["spokes"]),
    ({"modality": "mri", "image_shape": [4, 4, 4], "mask": "radial", "spokes": 4, "mask_file": "m.npy"},
     ["mask_file"]),
    ({"modality": "pet", "image_shape": [4, 4, 4], "num_angles": 4, "total_counts": -1}, ["total_counts"]),
    ({**CT, "spacing": [1, 1]}, ["spacing"]),
    ({**CT, "spacing": [1, 1, 1], "affine": np.diag([2, 2, 2, 1]).tolist()}, ["spacing", "disagrees"]),
    ({**CT, "affine": [[1, 0], [0, 1]]}, ["affine"]),
    ({**CT, "affine": np.zeros((4, 4)).tolist()}, ["affine"]),
])
def test_acquisition_errors(tmp_path, data, words):
    path = tmp_path / "acq.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    msg = _err(lambda: read_acquisition(path), *words)
    assert str(path) in msg


def test_acquisition_missing_file(tmp_path):
    _err(lambda: read_acquisition(tmp_path / "none.json"), "none.json", "unreadable")


def test_direct_construction_checks():
    _err(lambda: Acquisition("mri", SHAPE, mask="cartesian", acceleration=2, num_angles=3), "num_angles",
         "do not apply")
    _err(lambda: Acquisition("ct", SHAPE, num_angles=3, mask="radial"), "mask", "do not apply")


@pytest.fixture()
def files(tmp_path):
    """Acquisition JSONs for the three modalities in tmp_path."""
    return {k: _write_json(tmp_path / f"{k}.json", v) for k, v in (("mri", MRI), ("ct", CT), ("pet", PET))}


def test_measurement_errors(tmp_path, files):
    mri, ct, pet = (acquisition_from_dict(dict(s)) for s in (MRI, CT, PET))
    k = simulate(_image(), mri)[0, 0].numpy()
    sino = simulate(_image(), ct)[0, 0].numpy()

    def check(name, array, acq_file, *words):
        path = tmp_path / name
        if name.endswith(".npy"):
            np.save(path, array)
        elif name.endswith(".npz"):
            np.savez(path, **array)
        else:
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        msg = _err(lambda: read_measurement(path, acq_file), *words)
        assert str(path) in msg

    check("short.npy", k[:, :, :2], files["mri"], "shape", "(12, 10, 2)", "(12, 10, 4)", "mri.json")
    check("views.npy", np.zeros((5, *sino.shape[1:]), np.float32), files["ct"], "shape", "ct.json")
    check("magnitude.npy", np.abs(k), files["mri"], "real", "complex")
    check("magnitude.nii.gz", np.abs(k), files["mri"], "real", "complex")
    check("reim.npy", np.stack([k.real, k.imag], -1), files["mri"], "trailing axis of 2", "complex")
    check("complex_sino.npy", sino.astype(np.complex64), files["ct"], "complex", "real")
    bad = k.copy()
    bad[0, 0, 0] = np.nan
    check("nan.npy", bad, files["mri"], "1 NaN/Inf")
    bad_s = sino.copy()
    bad_s[1, 2, 3] = np.inf
    check("inf.nii.gz", bad_s, files["ct"], "NaN/Inf")
    counts = simulate(_image(), pet)[0, 0].numpy()
    counts[0, 0, 0] = -3
    check("neg.npy", counts, files["pet"], "negative counts")
    check("nokey.npz", {"kspace": k}, files["mri"], "no array 'data'")
    check("text.npy", np.array(["a", "b"]), files["ct"], "not numbers")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    _err(lambda: read_measurement(tmp_path / "broken.nii.gz", files["ct"]), "broken.nii.gz", "unreadable")
    _err(lambda: read_measurement(tmp_path / "missing.npy", files["ct"]), "missing.npy", "unreadable")
    _err(lambda: read_measurement(tmp_path / "m.mat", files["ct"]), "m.mat", "extension")
    # leading axes of size 1 are accepted
    np.save(tmp_path / "lead.npy", sino[None, None])
    assert read_measurement(tmp_path / "lead.npy", files["ct"]).data.shape == (1, 1, *sino.shape)


def test_write_checks_first(tmp_path):
    ct = acquisition_from_dict(dict(CT))
    bad = simulate(_image(), ct)
    bad[0, 0, 0, 0, 0] = float("nan")
    _err(lambda: write_measurement(tmp_path / "m.npy", bad, ct, tmp_path / "a.json"), "NaN/Inf")
    _err(lambda: write_measurement(tmp_path / "m.npy", bad[..., :2], ct, tmp_path / "a.json"), "shape")
    assert list(tmp_path.iterdir()) == []


def test_simulate_errors():
    ct = acquisition_from_dict(dict(CT))
    _err(lambda: simulate(torch.rand(4, 4, 4), ct), "image_shape", "resample")
    _err(lambda: simulate(torch.complex(_image(), _image()), ct), "complex")
    _err(lambda: simulate(_image() * float("nan"), ct), "NaN/Inf")
    _err(lambda: simulate(_image(), acquisition_from_dict({**PET, "total_counts": None})), "total_counts")
    _err(lambda: Acquisition("ct", SHAPE, num_angles=3).sampling_mask(), "no k-space mask")
