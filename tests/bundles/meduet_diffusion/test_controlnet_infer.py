"""meduet_diffusion's ControlNet inference (configs/controlnet_infer.yaml) at the tiny preset, run as users do, on the
tiny mri ControlNet of test_controlnet.py (its fixture): simulate_from the test split (with and without data
consistency), a measurement file with its acquisition JSON and a truth NIfTI (outputs on the input's grid and affine),
an acquisition that differs from the training's (warning recorded / one-line error), a missing checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import bundle_run
from meduet import records
import test_controlnet

# test_controlnet.py's module fixture (a tiny trained mri ControlNet), registered in this module too
controlnet_mri = test_controlnet.controlnet_mri

BUNDLE = "meduet_diffusion"


def _infer(root: Path, tiny_latents: Path, tiny_vae: Path, out: Path, *extra: str, check: bool = True):
    pretrain = records.read(root / "models/model.pt", expect="dit")[1].get("pretrain_ckpt")
    return bundle_run(BUNDLE, "controlnet_infer", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
                      "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", pretrain,
                      "--output_dir", str(out), "--num_steps", "4", *extra, check=check)


def _finite(metrics: dict | None) -> bool:
    return metrics is not None and all(math.isfinite(metrics[k]) for k in ("psnr", "ssim"))


@pytest.fixture(scope="module")
def simulated(controlnet_mri, tiny_latents, tiny_vae, tmp_path_factory) -> Path:
    """controlnet_infer on the first two test scans, measured as in training."""
    out = tmp_path_factory.mktemp("controlnet_infer") / "sim"
    _infer(controlnet_mri, tiny_latents, tiny_vae, out, "--simulate_from", "test")
    return out


def test_simulate_from_writes_volumes_json_and_picture(simulated, tiny_latents):
    summary = json.loads((simulated / "controlnet.json").read_text())
    assert summary["input"] == "simulate_from" and summary["control"]["task"] == "mri"
    assert summary["factors_from"] == "control" and summary["num_steps"] == 4
    assert summary["data_consistency"] == {"enabled": False, "steps": 5, "every": None, "in_paper": False}
    assert len(summary["cases"]) == 2 and (simulated / summary["picture"]).stat().st_size > 0
    test_items = json.loads(tiny_latents.read_text())["test"]
    for case, item in zip(summary["cases"], test_items):
        assert case["name"] == Path(item["latent"]).name.split(".")[0] and case["domain"] == item["domain"]
        for key in ("measurement", "acquisition", "output", "classical"):
            assert (simulated / case["files"][key]).is_file(), key
        out = nib.load(simulated / case["files"]["output"])
        assert list(out.shape) == case["shape"] and np.allclose(out.affine, case["affine"])
        assert np.allclose(nib.load(simulated / case["files"]["classical"]).affine, case["affine"])
        assert _finite(case["metrics"]["input"]) and _finite(case["metrics"]["output"])
        assert case["acquisition"]["acceleration"] == 4.0 and case["acquisition_check"]["matches"] is True
        assert 0 < case["residual"]["input"] < 1 and case["residual"]["output"] > 0
    assert math.isfinite(summary["mean"]["output"]["psnr"])


def test_data_consistency_lowers_the_residual(controlnet_mri, tiny_latents, tiny_vae, simulated, tmp_path):
    out = tmp_path / "dc"
    _infer(controlnet_mri, tiny_latents, tiny_vae, out, "--simulate_from", "test", "--max_cases", "1",
           "--data_consistency", "True", "--data_consistency_every", "2")
    case = json.loads((out / "controlnet.json").read_text())["cases"][0]
    plain = json.loads((simulated / "controlnet.json").read_text())["cases"][0]
    assert case["residual"]["output"] < case["residual"]["output_before_consistency"]
    assert case["residual"]["output"] < plain["residual"]["output"]
    assert case["latent_consistency_calls"] == 1  # steps 2 (of 4); not after the last
    assert _finite(case["metrics"]["output_before_consistency"])


def test_a_measurement_file_keeps_its_grid_and_affine(controlnet_mri, tiny_latents, tiny_vae, simulated, tmp_path):
    case = json.loads((simulated / "controlnet.json").read_text())["cases"][0]
    acq = json.loads((simulated / case["files"]["acquisition"]).read_text())
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-20.0, 7.5, 30.0]
    acq["affine"] = affine.tolist()
    (tmp_path / "acq.json").write_text(json.dumps(acq))
    kspace = np.load(simulated / case["files"]["measurement"])
    nib.save(nib.Nifti1Image(kspace, np.eye(4)), tmp_path / "kspace.nii.gz")  # complex64 NIfTI
    truth = nib.load(simulated / case["files"]["classical"])  # any volume in the output's units will do as truth
    nib.save(nib.Nifti1Image(np.asarray(truth.dataobj), affine), tmp_path / "truth.nii.gz")
    out = tmp_path / "out"
    _infer(controlnet_mri, tiny_latents, tiny_vae, out, "--measurement", str(tmp_path / "kspace.nii.gz"),
           "--acquisition", str(tmp_path / "acq.json"), "--truth_image", str(tmp_path / "truth.nii.gz"))
    summary = json.loads((out / "controlnet.json").read_text())
    row = summary["cases"][0]
    assert summary["input"] == "measurement" and row["name"] == "kspace"
    result = nib.load(out / "kspace_controlnet.nii.gz")
    assert result.shape == tuple(acq["image_shape"]) and np.allclose(result.affine, affine)
    assert np.allclose(nib.load(out / "kspace_classical.nii.gz").affine, affine)
    # the same measurement as simulate_from's: the same classical reconstruction
    assert np.allclose(nib.load(out / "kspace_classical.nii.gz").get_fdata(), truth.get_fdata(), atol=1e-3)
    assert row["metrics"]["input"]["psnr"] > 60 and _finite(row["metrics"]["output"])  # the truth is the input here


def test_other_acquisition_warns_or_is_one_line(controlnet_mri, tiny_latents, tiny_vae, simulated, tmp_path):
    case = json.loads((simulated / "controlnet.json").read_text())["cases"][0]
    acq = json.loads((simulated / case["files"]["acquisition"]).read_text())
    acq["acceleration"] = 8
    (tmp_path / "acq8.json").write_text(json.dumps(acq))
    args = ["--measurement", str(simulated / case["files"]["measurement"]),
            "--acquisition", str(tmp_path / "acq8.json")]
    _infer(controlnet_mri, tiny_latents, tiny_vae, tmp_path / "warned", *args)
    row = json.loads((tmp_path / "warned/controlnet.json").read_text())["cases"][0]
    assert row["acquisition_check"] == {"matches": False, "differences": ["acceleration 8 (trained: 4)"]}
    assert row["metrics"]["input"] is None and row["residual"]["input"] > 0
    proc = _infer(controlnet_mri, tiny_latents, tiny_vae, tmp_path / "refused", *args, "--on_mismatch", "error",
                  check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "acq8.json" in last and "acceleration 8" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "refused").exists()


def test_missing_controlnet_is_one_line(controlnet_mri, tiny_latents, tiny_vae, tmp_path):
    proc = _infer(controlnet_mri, tiny_latents, tiny_vae, tmp_path / "out", "--simulate_from", "test",
                  "--control_task", "ct", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "controlnet/ct/model.pt" in last and "controlnet_train.yaml first" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
