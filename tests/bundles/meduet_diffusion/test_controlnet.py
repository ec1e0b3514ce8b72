"""meduet_diffusion's ControlNet training (configs/controlnet_train.yaml merged on train.yaml) at the tiny preset, run
as users do, on a copy of the tiny factor-conditioned SiT (``sit_factors``): its files and record, the frozen base
weights kept bit for bit, the control branch trained, resume, the one-line errors and the cached controls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import bundle_run
from meduet import records
from meduet.engines.checkpoint import load_checkpoint
from meduet.latent import load_latent, read_items

BUNDLE = "meduet_diffusion"


def _root(tmp_path_factory, sit_factors: Path, name: str) -> Path:
    """A fresh bundle root holding a copy of the base generator's models/model.pt (the fixture's folder untouched)."""
    root = tmp_path_factory.mktemp(name)
    (root / "models").mkdir()
    shutil.copy2(sit_factors / "models/model.pt", root / "models/model.pt")
    return root


def _train(root: Path, tiny_latents: Path, tiny_vae: Path, *extra: str, check: bool = True):
    """Train with the factor encoder the base was trained with (its record names it; a user's chain finds it next to
    the bundle, as train.yaml's pretrain_ckpt default)."""
    base = root / "models/model.pt"
    pretrain = records.read(base, expect="dit")[1].get("pretrain_ckpt") if base.exists() else None
    return bundle_run(BUNDLE, "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
                      "--vae_ckpt", str(tiny_vae / "models/model.pt"), *(("--pretrain_ckpt", pretrain) if pretrain
                                                                       else ()), *extra, run_id="training",
                      extra_configs=("controlnet_train",), check=check)


@pytest.fixture(scope="module")
def controlnet_mri(tmp_path_factory, sit_factors, tiny_latents, tiny_vae) -> Path:
    """A bundle root after a 2-epoch tiny ControlNet run on the mri task."""
    root = _root(tmp_path_factory, sit_factors, "controlnet")
    _train(root, tiny_latents, tiny_vae, "--control_task", "mri")
    return root


def test_training_writes_its_files_keeps_the_base_and_trains_the_control(controlnet_mri, sit_factors):
    out = controlnet_mri / "models/controlnet/mri"
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
    assert (controlnet_mri / "runs/controlnet/mri/val_loss.jsonl").is_file()
    net = records.load(out / "model.pt", expect="controlnet")
    control = net.meta["control"]
    assert control["task"] == "mri" and control["acceleration"] == 4.0 and control["center_fraction"] == 0.08
    assert control["channels"] == net.base.in_channels and "undersampled" in control["input"]
    base = torch.load(sit_factors / "models/model.pt", weights_only=True)
    state = torch.load(out / "model.pt", weights_only=True)
    for k, v in base.items():  # the frozen base, bit for bit (in the EMA model.pt and in the trained student)
        if k != "_extra_state":
            assert torch.equal(state[f"base.{k}"], v), k
    student = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(student[f"base.{k}"], v) for k, v in base.items() if k != "_extra_state")
    zero_linears = [k for k in state if k.startswith(("control_in.", "control_out."))]
    assert zero_linears and any(bool(state[k].abs().sum() > 0) for k in zero_linears)
    assert net.meta["objective"] == records.load(sit_factors / "models/model.pt").meta["objective"]


def test_a_second_run_with_more_epochs_resumes(controlnet_mri, tiny_latents, tiny_vae, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(controlnet_mri, root)
    before = load_checkpoint(root / "models/controlnet/mri/checkpoint.pt")["engine"]
    proc = _train(root, tiny_latents, tiny_vae, "--control_task", "mri", "--max_epochs", "3")
    after = load_checkpoint(root / "models/controlnet/mri/checkpoint.pt")["engine"]
    assert before["epoch"] == 2 and after["epoch"] == 3 and after["iteration"] > before["iteration"]
    rows = [json.loads(ln) for ln in (root / "runs/controlnet/mri/val_loss.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # the curve continues: only epoch 3 was trained now
    assert "Traceback" not in proc.stderr


def test_the_mri_control_is_a_degraded_latent_on_the_latent_grid(controlnet_mri, tiny_latents):
    files = sorted((controlnet_mri / "latents_control/mri").glob("*/*.nii.gz"))
    items = {Path(it["latent"]).name: it for it in read_items(tiny_latents, "training")}
    assert files and {f.name for f in files} >= set(items)
    manifest = json.loads(next((controlnet_mri / "latents_control/mri").glob("*/control.json")).read_text())
    assert manifest["task"] == "mri" and manifest["acceleration"] == 4.0 and manifest["scaled"] is True
    f = files[0]
    control, latent = load_latent(f), load_latent(items[f.name]["latent"])
    scaled = latent * manifest["latent_scale_factor"]
    assert control.shape == latent.shape
    assert not torch.allclose(control, scaled, atol=1e-3)
    assert torch.corrcoef(torch.stack([control.flatten(), scaled.flatten()]))[0, 1] > 0.5  # the same scan


def test_missing_base_and_unknown_task_are_one_line(tmp_path, tiny_latents, tiny_vae, sit_factors, tmp_path_factory):
    proc = _train(tmp_path / "empty", tiny_latents, tiny_vae, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "does not exist" in last and "train meduet_diffusion first" in last
    assert "Traceback" not in proc.stderr
    root = _root(tmp_path_factory, sit_factors, "controlnet_bad")
    proc = _train(root, tiny_latents, tiny_vae, "--control_task", "pet", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "control_task must be one of" in last and "'pet'" in last
    assert "Traceback" not in proc.stderr and not (root / "models/controlnet").exists()


@pytest.mark.parametrize("task,extra,settings", [("ct", ("--views", "30"), {"views": 30}), ("label", (), {})])
def test_ct_and_label_controlnets_train_and_record_their_task(task, extra, settings, tmp_path_factory, sit_factors,
                                                              tiny_latents, tiny_vae):
    root = _root(tmp_path_factory, sit_factors, f"controlnet_{task}")
    _train(root, tiny_latents, tiny_vae, "--control_task", task, *extra, "--max_epochs", "1")
    net = records.load(root / f"models/controlnet/{task}/model.pt", expect="controlnet")
    assert net.meta["control"]["task"] == task and settings.items() <= net.meta["control"].items()
    labels = json.loads(tiny_latents.read_text())["labels"]
    assert net.control_channels == (max(int(k) for k in labels) + 1 if task == "label" else net.base.in_channels)
