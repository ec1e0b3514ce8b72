"""meduet_diffusion with 3D MedDiffusion's dual-flow denoiser (train.yaml ``--backbone dualflow``) at the tiny preset,
run as users do: training, sample.yaml and inference.json on its model.pt."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from conftest import bundle_run
from meduet import records
from meduet.networks.dualflow import DUALFLOW_PRESETS, LatentDualFlow


def test_dualflow_trains_samples_and_loads_through_inference(tiny_latents, tiny_pretrain, tiny_vae, tmp_path):
    root = tmp_path / "dualflow"
    pretrain = str(tiny_pretrain / "models/model.pt")
    bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--pretrain_ckpt", pretrain, "--backbone", "dualflow", "--prior#steps", "10", run_id="training")
    net = records.load(root / "models/model.pt", expect=("dit", "dualflow"))
    assert isinstance(net, LatentDualFlow) and net.kind == "dualflow"
    assert net.arch["channels"] == list(DUALFLOW_PRESETS["tiny"]["channels"])
    assert net.meta["condition"] == "factors" and net.meta["objective"]["objective"] == "rflow"
    assert net.meta["crop_size"] == [8, 8, 8] and net.meta["training"]["complete"]
    rows = [json.loads(x) for x in (root / "runs/val_loss.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in rows)

    common = ["--bundle_root", str(root), "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", pretrain,
              "--latent_datalist", str(tiny_latents), "--num_per_site", "1", "--num_steps", "4"]
    out = tmp_path / "samples"
    bundle_run("meduet_diffusion", "sample", *common, "--output_dir", str(out))
    summary = json.loads((out / "samples.json").read_text())
    assert {s["group"] for s in summary["samples"]} == set(net.meta["domains"])
    first = np.asarray(nib.load(out / summary["samples"][0]["path"]).dataobj)
    assert first.shape == (32, 32, 32) and np.isfinite(first).all()
    # inference.json builds the network from config (backbone dualflow, the preset's sizes) and loads model.pt into
    # it strictly: the same volumes
    inf = tmp_path / "inference"
    bundle_run("meduet_diffusion", "inference", *common, "--output_dir", str(inf), "--backbone", "dualflow")
    again = json.loads((inf / "samples.json").read_text())
    assert [r["path"] for r in again["samples"]] == [r["path"] for r in summary["samples"]]
    for row in again["samples"]:
        np.testing.assert_array_equal(np.asarray(nib.load(inf / row["path"]).dataobj),
                                      np.asarray(nib.load(out / row["path"]).dataobj))
    # inference.json left at backbone dit: one line naming what the file holds, nothing written
    bad = tmp_path / "bad"
    proc = bundle_run("meduet_diffusion", "inference", *common, "--output_dir", str(bad), check=False)
    assert proc.returncode != 0 and "holds a 'dualflow' network" in proc.stderr and not bad.exists()
