"""meduet_recon run as users run it (``python -m monai.bundle run``, tiny preset): pretraining and its resume,
measurement files of a held-out volume, test-time reconstruction (outputs on the acquisition's grid and affine, only
the subject encoder fitted), the baselines, and one-line errors for a missing checkpoint and bad measurement files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import bundle_run
from meduet import records
from meduet.data.measurements import (acquisition_from_dict, read_acquisition, read_measurement, simulate,
                                     write_measurement)

pytestmark = pytest.mark.usefixtures("one_thread")


def _last_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory, tiny_data) -> dict:
    """simulate.yaml's files of test item 2 (MRI x4, 16^3)."""
    out = tmp_path_factory.mktemp("measurements")
    bundle_run("meduet_recon", "simulate", "--output_dir", str(out), "--dataset_dir", str(tiny_data / "phantoms"),
               "--index", "2")
    return {k: out / f"sample_mri{s}" for k, s in (("measurement", ".npy"), ("acquisition", "_acquisition.json"),
                                                    ("truth", "_truth.nii.gz"))}


def test_pretraining_writes_a_single_subject_model_and_the_whole_network(recon_trained, tiny_data):
    state, record = records.read(recon_trained / "models/model.pt", expect="inr")
    assert record["training"] == {"epoch": 2, "max_epochs": 2, "complete": True}
    assert record["architecture"]["num_subjects"] == 1 and record["modality"] == "mri"
    n_train = len(json.loads((tiny_data / "phantoms/datalist.json").read_text())["training"])
    assert record["training_subjects"] == n_train and record["image_shape"] == [16, 16, 16]
    assert record["acquisition"]["acceleration"] == 4.0 and record["parameter_counts"]["subject_encoder"] == 128
    whole = torch.load(recon_trained / "models/training_network.pt", weights_only=True)
    codes = whole["subject_encoder.codes"]
    assert codes.shape[0] == n_train
    assert torch.allclose(state["subject_encoder.codes"][0], codes.mean(0))  # a new subject starts from the mean
    ckpt = torch.load(recon_trained / "models/checkpoint.pt", weights_only=True)
    assert ckpt["engine"]["epoch"] == 2 and {"model", "optimizer", "rng"} <= set(ckpt)


def test_resume_continues_from_the_checkpoint(recon_trained, tiny_data, tmp_path):
    root = tmp_path / "recon"
    (root / "models").mkdir(parents=True)
    for name in ("checkpoint.pt", "model.pt", "training_network.pt"):
        (root / "models" / name).write_bytes((recon_trained / "models" / name).read_bytes())
    proc = bundle_run("meduet_recon", "train", "--bundle_root", str(root), "--dataset_dir",
                      str(tiny_data / "phantoms"), "--max_epochs", "3", run_id="training")
    assert "resumed from" in proc.stdout + proc.stderr and "at epoch 2" in proc.stdout + proc.stderr
    ckpt = torch.load(root / "models/checkpoint.pt", weights_only=True)
    assert ckpt["engine"]["epoch"] == 3
    assert records.read(root / "models/model.pt")[1]["training"]["epoch"] == 3


def test_simulate_writes_a_measurement_its_acquisition_and_the_truth(sample, tiny_data):
    m = read_measurement(sample["measurement"], sample["acquisition"])
    truth = nib.load(sample["truth"])
    assert m.acquisition.modality == "mri" and m.acquisition.image_shape == (16, 16, 16)
    assert np.allclose(truth.affine, m.acquisition.affine_array)
    assert m.acquisition.seed == 1  # its own mask, not the training one (mask_seed 0)
    # the workflow ran in another process (other FFT threads): equal to float32 rounding of the largest sample
    expected = simulate(np.asarray(truth.dataobj, dtype=np.float32), m.acquisition)
    assert torch.allclose(m.data, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_reconstruct_fits_only_the_subject_encoder_and_writes_on_the_acquisition_grid(recon_trained, sample,
                                                                                     tmp_path):
    out = tmp_path / "out"
    bundle_run("meduet_recon", "reconstruct", "--bundle_root", str(recon_trained), "--measurement",
               str(sample["measurement"]), "--acquisition", str(sample["acquisition"]), "--truth",
               str(sample["truth"]), "--output_dir", str(out))
    img = nib.load(out / "sample_mri_disinr.nii.gz")
    acq = read_acquisition(sample["acquisition"])
    assert img.shape == (16, 16, 16) and np.allclose(img.affine, acq.affine_array)
    report = json.loads((out / "sample_mri_disinr.json").read_text())
    counts = records.read(recon_trained / "models/model.pt")[1]["parameter_counts"]
    assert report["trained_parameters"] == counts["subject_encoder"] < 0.02 * report["total_parameters"]
    assert report["settings"]["learning_rate"] == 0.01 and report["settings"]["subject_learning_rate"] == 0.1
    assert len(report["loss"]) == report["iterations"] == 20 and report["loss"][-1] < report["loss"][0]
    assert [m["iteration"] for m in report["metrics"]] == [5, 10, 15, 20]
    assert report["final_psnr"] == report["metrics"][-1]["psnr"] and np.isfinite(report["final_psnr"])
    png = (out / "sample_mri_disinr_convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the same through inference.json (MONAI's inferer property: the SubjectFit)
    inf = tmp_path / "inf"
    bundle_run("meduet_recon", "inference", "--bundle_root", str(recon_trained), "--measurement",
               str(sample["measurement"]), "--acquisition", str(sample["acquisition"]), "--output_dir", str(inf))
    again = nib.load(inf / "sample_mri_disinr.nii.gz")
    assert np.allclose(again.get_fdata(), img.get_fdata(), atol=1e-5)


@pytest.mark.parametrize("method", ["scratch", "finetune", "classical"])
def test_the_baselines_run_in_the_same_workflow(recon_trained, sample, tmp_path, method):
    ckpt = str(recon_trained / "models/model.pt") if method != "classical" else str(tmp_path / "nowhere.pt")
    bundle_run("meduet_recon", "reconstruct", "--ckpt_path", ckpt, "--measurement", str(sample["measurement"]),
               "--acquisition", str(sample["acquisition"]), "--truth", str(sample["truth"]), "--output_dir",
               str(tmp_path), "--method", method, "--iterations", "5")
    report = json.loads((tmp_path / f"sample_mri_{method}.json").read_text())
    total = records.read(recon_trained / "models/model.pt")[1]["parameter_counts"]["total"]
    assert report["trained_parameters"] == (0 if method == "classical" else total)
    assert len(report["loss"]) == (0 if method == "classical" else 5)
    assert nib.load(tmp_path / f"sample_mri_{method}.nii.gz").shape == (16, 16, 16)


def test_a_missing_checkpoint_is_one_line(sample, tmp_path):
    for workflow in ("reconstruct", "inference"):
        proc = bundle_run("meduet_recon", workflow, "--ckpt_path", str(tmp_path / "nowhere.pt"), "--measurement",
                          str(sample["measurement"]), "--acquisition", str(sample["acquisition"]), "--output_dir",
                          str(tmp_path / "out"), check=False)
        last = _last_line(proc)
        assert last.startswith("MeduetConfigError: ") and "nowhere.pt" in last and "train meduet_recon first" in last
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _bad_files(sample: dict, folder: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (measurement, acquisition, words the error must hold)."""
    acq = read_acquisition(sample["acquisition"])
    kspace = np.load(sample["measurement"])
    cases = {}
    np.save(folder / "wrong_shape.npy", kspace[:, :, :8])
    cases["shape"] = (folder / "wrong_shape.npy", sample["acquisition"], "shape")
    np.save(folder / "magnitude.npy", np.abs(kspace).astype(np.float32))
    cases["real_for_mri"] = (folder / "magnitude.npy", sample["acquisition"], "complex")
    nan = kspace.copy()
    nan[0, 0, 0] = np.nan
    np.save(folder / "nan.npy", nan)
    cases["nan"] = (folder / "nan.npy", sample["acquisition"], "NaN")
    (folder / "truncated.npy").write_bytes((sample["measurement"]).read_bytes()[:100])
    cases["unreadable"] = (folder / "truncated.npy", sample["acquisition"], "unreadable")
    pet = acquisition_from_dict(
        {"modality": "pet", "image_shape": list(acq.image_shape), "num_angles": 16, "total_counts": 1e4})
    truth = np.asarray(nib.load(sample["truth"]).dataobj, dtype=np.float32)
    write_measurement(folder / "pet.npy", simulate(truth, pet), pet, folder / "pet.json")
    counts = np.load(folder / "pet.npy")
    counts[0, 0, 0] = -3
    np.save(folder / "negative.npy", counts)
    cases["negative_counts"] = (folder / "negative.npy", folder / "pet.json", "negative counts")
    np.save(folder / "complex_counts.npy", counts.astype(np.complex64))
    cases["complex_for_pet"] = (folder / "complex_counts.npy", folder / "pet.json", "complex")
    return cases


def test_bad_measurement_files_are_one_line_and_write_nothing(recon_trained, sample, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, (meas, acq, words) in _bad_files(sample, bad).items():
        out = tmp_path / f"out_{name}"
        proc = bundle_run("meduet_recon", "reconstruct", "--bundle_root", str(recon_trained), "--measurement",
                          str(meas), "--acquisition", str(acq), "--output_dir", str(out), check=False)
        last = _last_line(proc)
        assert last.startswith("MeduetInputError: ") and Path(meas).name in last and words in last, (name, last)
        assert "; " in last and not out.exists(), name


def test_a_measurement_of_another_modality_than_the_checkpoint_is_one_line(recon_trained, sample, tmp_path):
    acq = read_acquisition(sample["acquisition"])
    ct = acquisition_from_dict(
        {"modality": "ct", "image_shape": list(acq.image_shape), "num_angles": 12})
    truth = np.asarray(nib.load(sample["truth"]).dataobj, dtype=np.float32)
    write_measurement(tmp_path / "ct.npy", simulate(truth, ct), ct, tmp_path / "ct.json")
    proc = bundle_run("meduet_recon", "reconstruct", "--bundle_root", str(recon_trained), "--measurement",
                      str(tmp_path / "ct.npy"), "--acquisition", str(tmp_path / "ct.json"), "--output_dir",
                      str(tmp_path / "out"), check=False)
    last = _last_line(proc)
    assert last.startswith("MeduetInputError: ") and "pretrained on mri" in last and "--modality ct" in last


def test_torchrun_two_processes_gloo(tiny_data, tmp_path, monkeypatch):
    """multi_gpu_train.yaml: 2 processes (gloo, CPU), each a share of the subjects; the ranks end with identical
    weights, those of training_network.pt."""
    import os

    from conftest import REPO, torchrun_launcher

    root = tmp_path / "ddp"
    dump = tmp_path / "dump_ranks.yaml"  # appended after the bundle's own `training` list: each rank saves its net
    dump.write_text("+training:\n  - \"$torch.save(meduet.engines.checkpoint.unwrap(@network).state_dict(), "
                    "os.path.join(@bundle_root, 'rank' + os.environ['RANK'] + '.pt'))\"\n")
    cfg_dir = REPO / "bundles" / "meduet_recon" / "configs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bundle_run("meduet_recon", "train", "--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms"),
               "--max_epochs", "1", run_id="training",
               extra_configs=("multi_gpu_train", os.path.relpath(dump.with_suffix(""), cfg_dir)),
               launcher=torchrun_launcher(2), timeout=300)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    whole = torch.load(root / "models/training_network.pt", weights_only=True)
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs between ranks"
        assert torch.equal(ranks[0][k], whole[k]), k
    assert records.read(root / "models/model.pt", expect="inr")[1]["training"]["complete"]
