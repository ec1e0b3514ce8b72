"""Tests for meduet.engines.controlnet: the controls on the latent grid (made once, cached), the network built on a
base generator, the condition with the control, and the objective's timestep check of a ControlNet."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meduet.data.controls import ControlTask
from meduet.engines.controlnet import ControlCache, ControlConditioner, build_controlnet
from meduet.engines.diffusion import Conditioner
from meduet.errors import MeduetConfigError
from meduet.latent import load_latent, save_latent
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dit import build_dit
from meduet.networks.patchwise import PatchEncoding

LABELS = {"0": "background", "1": "body", "2": "organ"}


def _datalist(tmp_path: Path, n: int = 2, size: int = 16) -> Path:
    """A latent datalist of ``n`` cases: 16^3 CT-like images (HU) with 3-class label maps and 4x4^3 latents."""
    g = np.random.default_rng(0)
    items = []
    for i in range(n):
        lab = np.zeros((size,) * 3, dtype=np.int16)
        lab[2:14, 3:13, 2:14] = 1
        lab[5:9, 5:10, 6:10] = 2
        img = np.where(lab == 0, -1000.0, np.where(lab == 1, 40.0, 150.0)) + g.normal(0, 5, lab.shape)
        for name, arr in (("image", img.astype(np.float32)), ("label", lab)):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}{i}.nii.gz")
        save_latent(tmp_path / f"latents/case{i}.nii.gz", g.normal(size=(4, 4, 4, 4)), np.eye(4), 4)
        items.append({"latent": f"latents/case{i}.nii.gz", "image": str(tmp_path / f"image{i}.nii.gz"),
                      "label": str(tmp_path / f"label{i}.nii.gz"), "domain": "a"})
    data = {"domains": ["a"], "latent_channels": 4, "downsample_factor": 4, "latent_scale_factor": 0.5,
            "labels": LABELS, "preprocessing": {"modality": "CT", "spacing": None, "crop_foreground": False},
            "training": items, "validation": items[:1]}
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    return tmp_path / "datalist.json"


class _PoolVAE(torch.nn.Module):
    """A stand-in VAE: 4x average pooling repeated over 4 latent channels."""

    downsample_factor = 4

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, 4).repeat(1, 4, 1, 1, 1)


def test_label_controls_are_made_once_on_the_latent_grid(tmp_path):
    dl = _datalist(tmp_path)
    cache = ControlCache(str(dl), ControlTask("label"), str(tmp_path / "cache"))
    items = cache.items("training")
    assert len(items) == 2 and all(Path(it["control"]).is_file() for it in items)
    assert Path(items[0]["control"]).parent.parent == tmp_path / "cache/label"
    c = load_latent(items[0]["control"])
    assert c.shape == (3, 4, 4, 4) and torch.allclose(c.sum(0), torch.ones(4, 4, 4))
    assert float(c[2].max()) > 0  # the organ shows up as a fraction
    manifest = json.loads((Path(items[0]["control"]).parent / "control.json").read_text())
    assert manifest["task"] == "label" and manifest["channels"] == 3 and manifest["scaled"] is False
    mtime = Path(items[0]["control"]).stat().st_mtime_ns
    assert ControlCache(str(dl), ControlTask("label"), str(tmp_path / "cache")).items("training") == items
    assert Path(items[0]["control"]).stat().st_mtime_ns == mtime  # reused, not remade


def test_image_controls_are_encoded_scaled_and_keyed_by_their_settings(tmp_path):
    dl = _datalist(tmp_path)
    made = {}
    for task in (ControlTask("mri"), ControlTask("mri", acceleration=8), ControlTask("ct", views=30)):
        cache = ControlCache(str(dl), task, str(tmp_path / "cache"))
        cache._vae = (_PoolVAE(), PatchEncoding())  # no checkpoint needed: the encoder is a stand-in
        it = cache.items("training")[0]
        made[task.tag()] = load_latent(it["control"])
        assert made[task.tag()].shape == (4, 4, 4, 4)
    assert len({str(p.parent) for p in (tmp_path / "cache").glob("*/*/*.nii.gz")}) == 3  # one folder per setting
    # the clean image through the same stand-in, scaled by the datalist's factor 0.5: the controls differ from it
    clean = ControlCache(str(dl), ControlTask("mri"), str(tmp_path / "cache"))
    x = torch.as_tensor(clean.load(clean.datalist.items("training")[0])["image"])[None]
    ref = _PoolVAE().encode_mean(x)[0] * 0.5
    for c in made.values():
        assert not torch.allclose(c, ref, atol=1e-3) and float((c - ref).abs().mean()) < 0.25
    assert float((made["acc8_cf0.08_seed0"] - ref).abs().mean()) > float((made["acc4_cf0.08_seed0"] - ref).abs().mean())


def test_image_controls_need_the_vae(tmp_path):
    dl = _datalist(tmp_path)
    with pytest.raises(MeduetConfigError, match="does not exist; train meduet_vae first"):
        ControlCache(str(dl), ControlTask("mri"), str(tmp_path / "c"), vae_ckpt=str(tmp_path / "no.pt")).items(
            "training")


def _base(timesteps: int = 1000):
    base = build_dit("tiny", condition="none", num_train_timesteps=timesteps)
    base.meta = {"latent_scale_factor": 0.5, "latent_channels": 4, "objective": {"objective": "rflow"},
                 "condition": "none"}
    return base


def test_build_controlnet_records_the_task_and_freezes_the_base(tmp_path):
    base = _base()
    latents = json.loads(_datalist(tmp_path).read_text())
    net = build_controlnet(base, ControlTask("ct", views=30), latents, "base.pt")
    assert net.meta["control"]["task"] == "ct" and net.meta["control"]["views"] == 30
    assert net.meta["control"]["channels"] == 4 and net.meta["control"]["base_ckpt"].endswith("base.pt")
    assert build_controlnet(base, ControlTask("label"), latents, "base.pt").control_channels == 3
    assert not any(p.requires_grad for p in net.base.parameters())
    assert all(p.requires_grad for p in net.control_parameters())
    other = {**latents, "latent_channels": 8}
    with pytest.raises(MeduetConfigError, match="different VAEs"):
        build_controlnet(base, ControlTask("mri"), other, "base.pt")


def test_the_conditioner_adds_the_control_and_the_objective_checks_the_base_timesteps(tmp_path):
    latents = json.loads(_datalist(tmp_path).read_text())
    net = build_controlnet(_base(), ControlTask("mri"), latents, "base.pt")
    cond = ControlConditioner(Conditioner("none"))
    x = torch.randn(2, 4, 8, 8, 8)
    c = cond(x, {"control": torch.ones(2, 4, 8, 8, 8, dtype=torch.float64)})
    assert set(c) == {"control"} and c["control"].dtype == torch.float32
    assert DiffusionObjective("rflow").loss(net, x, c).loss.isfinite()
    with pytest.raises(MeduetConfigError, match="needs each item's 'control'"):
        cond(x, {})
    with pytest.raises(MeduetConfigError, match=r"timesteps in \[0, 1000\].*num_train_timesteps=500"):
        DiffusionObjective("rflow", num_train_timesteps=500).check_model(net)
