"""bundles/meduet_diffusion at the tiny preset, run as users do (`python -m monai.bundle run ...`) on the tiny
phantoms' latent cache, with the tiny meduet_pretrain encoder for the factors condition."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, assert_same, bundle_run, run_killed_at_save, torchrun_launcher
from meduet.engines.checkpoint import load_checkpoint
from meduet.errors import MeduetConfigError
from meduet import records
from meduet.engines.factor_prior import sample_factors
from meduet.networks.dit import LatentDiT
from meduet.networks.factors import style_vector_width
from meduet.workflows.diffusion.common import conditioner_for


def _train(root: Path, latents: Path, pretrain: Path, *extra: str, check: bool = True):
    return bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(latents),
                      "--pretrain_ckpt", str(pretrain / "models/model.pt"), *extra, run_id="training", check=check)


def test_training_checkpoints_record_validation_and_prior(sit_factors, tiny_latents, tiny_pretrain):
    ckpt = load_checkpoint(sit_factors / "models/checkpoint.pt")
    assert {"model", "ema", "optimizer", "lr_scheduler", "rng"} <= set(ckpt) and ckpt["engine"]["epoch"] == 2
    exported = torch.load(sit_factors / "models/model.pt", weights_only=True)
    # model.pt is the EMA generator, not the raw student
    ema = ckpt["ema"]["module"]
    # (its record differs from the EMA's by the training stamp: complete, 2 of 2 epochs)
    assert all(torch.equal(exported[k], ema[k]) for k in ema if k != "_extra_state")
    assert records.decode(exported["_extra_state"])["training"] == {"epoch": 2, "max_epochs": 2, "complete": True}
    assert any(not torch.equal(ckpt["model"][k], ema[k]) for k in ema if ema[k].is_floating_point())
    net = records.load(sit_factors / "models/model.pt", expect="dit")
    lat = json.loads(tiny_latents.read_text())
    assert net.meta["objective"]["objective"] == "rflow" and net.meta["condition"] == "factors"
    assert net.meta["latent_scale_factor"] == pytest.approx(lat["latent_scale_factor"])
    assert net.meta["domains"] == lat["domains"] and net.meta["crop_size"] == [8, 8, 8]
    # conditioned by tiny_pretrain's factors: the record names that model.pt, the conditioner rebuilt from the record
    # (as sample/evaluate/transfer do) carries exactly its weights, and the generator takes (content, style) of the
    # widths its factor heads produce
    pretrain = tiny_pretrain / "models/model.pt"
    enc = torch.load(pretrain, weights_only=True)
    assert net.meta["pretrain_ckpt"] == str(pretrain)
    encoder = conditioner_for(net.meta, net.meta["pretrain_ckpt"]).encoder
    assert net.meta["pretrain_kind"] == encoder.kind
    cond = encoder.state_dict()
    assert set(cond) == set(enc) and all(torch.equal(cond[k], enc[k]) for k in enc)
    assert net.arch["content_dim"] == enc["backbone.factors.content.weight"].shape[0]
    assert net.arch["style_dim"] == style_vector_width(enc["backbone.factors.style.weight"].shape[0],
                                                      encoder.style_pool)
    assert exported["y_embedder.mlp.0.weight"].shape[1] == net.arch["content_dim"] + net.arch["style_dim"]
    rows = [json.loads(x) for x in (sit_factors / "runs/val_loss.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in rows)
    prior = records.load(sit_factors / "models/factor_prior.pt", expect="factor_prior")
    content, style = sample_factors(prior, 3, domain=0)
    assert content.shape == (3, net.arch["content_dim"]) and style.shape == (3, net.arch["style_dim"])


def test_resume_continues_from_the_last_epoch(sit_factors, tiny_latents, tiny_pretrain, tmp_path):
    import shutil

    root = tmp_path / "resumed"
    shutil.copytree(sit_factors, root)
    _train(root, tiny_latents, tiny_pretrain, "--max_epochs", "3")
    ckpt = load_checkpoint(root / "models/checkpoint.pt")
    first = load_checkpoint(sit_factors / "models/checkpoint.pt")
    assert ckpt["engine"]["epoch"] == 3 and ckpt["engine"]["iteration"] == first["engine"]["iteration"] * 3 // 2
    rows = [json.loads(x) for x in (root / "runs/val_loss.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # resumed runs append to the curve


def test_kill_and_resume_gives_the_same_weights(sit_factors, tiny_latents, tiny_pretrain, tmp_path):
    """Run sit_factors' training (its command less the MLflow tracking and the factor prior), SIGKILL it when it is
    about to save epoch 2 of 2, its validation loss of epoch 2 already logged; resume it with the same command, and
    get what sit_factors' uninterrupted run got, bit for bit: generator, EMA generator (checkpoint and model.pt),
    optimiser, schedule, step counters, RNG states, and the validation-loss log (the killed run's row of epoch 2
    replaced by the resumed run's)."""
    root = tmp_path / "killed"
    args = ["--prior#enabled", "False"]  # fitted after training, from the frozen conditioner alone
    run_killed_at_save("meduet_diffusion", root, tmp_path, "--latent_datalist", str(tiny_latents), "--pretrain_ckpt",
                       str(tiny_pretrain / "models/model.pt"), *args)
    val_log = root / "runs/val_loss.jsonl"
    assert [json.loads(x)["epoch"] for x in val_log.read_text().splitlines()] == [1, 2]
    resumed = _train(root, tiny_latents, tiny_pretrain, *args)
    assert f"resumed from {root / 'models/checkpoint.pt'} at epoch 1," in resumed.stdout + resumed.stderr
    ref = sit_factors / "models"
    ckpt, again = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(root / "models/checkpoint.pt")
    assert {"model", "ema", "optimizer", "lr_scheduler", "engine", "rng"} <= set(ckpt)
    assert ckpt["engine"]["epoch"] == 2
    # Python's own RNG state is left out: training draws nothing from it, but the reference run (tracked with MLflow
    # when installed, conftest.mlflow_args) may have: MLflow's file store draws from it when it creates an
    # experiment whose random id has leading zeros, about one run in ten (mlflow.utils.name_utils)
    del ckpt["rng"]["python"], again["rng"]["python"]
    assert_same(ckpt, again, "checkpoint.pt")
    assert_same(torch.load(ref / "model.pt", weights_only=True), torch.load(root / "models/model.pt",
                                                                            weights_only=True), "model.pt")
    rows = [json.loads(x) for x in val_log.read_text().splitlines()]
    assert rows == [json.loads(x) for x in (sit_factors / "runs/val_loss.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,condition", [("ddpm", "metadata")])  # rflow/none: tests/test_dit.py
def test_other_objectives_and_conditions_train_and_sample(objective, condition, tiny_latents, tiny_pretrain,
                                                          tiny_vae, tmp_path):
    # metadata = the site plus the items' voxel spacing (3 numbers)
    _train(tmp_path, tiny_latents, tiny_pretrain, "--objective_name", objective, "--condition", condition,
           "--metadata_keys", "['spacing']")
    net = records.load(tmp_path / "models/model.pt", expect="dit")
    assert net.meta["objective"]["objective"] == objective and net.arch["condition"] == condition
    assert net.arch["num_metadata_scalars"] == 3 and len(net.meta["metadata_mean"]) == 3
    assert not (tmp_path / "models/factor_prior.pt").exists()  # the prior is for the factors condition only
    out = tmp_path / "samples"
    bundle_run("meduet_diffusion", "sample", "--bundle_root", str(tmp_path), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--output_dir", str(out), "--num_per_site", "1", "--num_steps", "4"
               if objective == "rflow" else "5", "--latent_datalist", str(tiny_latents))
    summary = json.loads((out / "samples.json").read_text())
    groups = {s["group"] for s in summary["samples"]}
    assert groups == ({"all"} if condition == "none" else set(net.meta["domains"]))
    if condition == "metadata":
        t = tmp_path / "transfer"
        bundle_run("meduet_diffusion", "transfer", "--bundle_root", str(tmp_path), "--vae_ckpt",
                   str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--output_dir", str(t),
                   "--pairs", "1", "--num_steps", "5")
        res = json.loads((t / "transfer.json").read_text())
        assert res["method"].startswith("sdedit") and len(res["pairs"]) == 1


def test_sample_writes_volumes_per_site_with_spacing_and_montage(sit_factors, tiny_vae, tiny_latents, tiny_pretrain,
                                                                 tmp_path):
    vae = ["--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
           "--latent_datalist", str(tiny_latents)]
    out = tmp_path / "prior"
    bundle_run("meduet_diffusion", "sample", "--bundle_root", str(sit_factors), *vae, "--output_dir", str(out),
               "--num_per_site", "2", "--num_steps", "5")
    summary = json.loads((out / "samples.json").read_text())
    lat = json.loads(tiny_latents.read_text())
    assert len(summary["samples"]) == 2 * len(lat["domains"]) and (out / "samples.png").stat().st_size > 0
    img = nib.load(out / summary["samples"][0]["path"])
    spacing = lat["preprocessing"]["spacing"]
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), spacing)
    data = np.asarray(img.dataobj)
    lo, hi = lat["preprocessing"]["ct_window"]
    assert data.min() >= lo - 1e-3 and data.max() <= hi + 1e-3  # HU in the training window
    # factors of the sites' reference scans instead of the prior
    ref = tmp_path / "ref"
    bundle_run("meduet_diffusion", "sample", "--bundle_root", str(sit_factors), *vae, "--output_dir", str(ref),
               "--num_per_site", "1", "--num_steps", "5", "--source", "reference", "--sites", "['site0']")
    summary = json.loads((ref / "samples.json").read_text())
    assert summary["source"] == "reference" and [s["group"] for s in summary["samples"]] == ["site0"]
    assert not np.array_equal(np.asarray(nib.load(ref / "site0_0.nii.gz").dataobj), data)
    # inference.json samples the same volumes with the network its network_def builds (model.pt loaded into it
    # strictly) and its LatentSampler inferer
    inf = tmp_path / "inference"
    bundle_run("meduet_diffusion", "inference", "--bundle_root", str(sit_factors), *vae, "--output_dir", str(inf),
               "--num_per_site", "2", "--num_steps", "5")
    again = json.loads((inf / "samples.json").read_text())
    assert [r["path"] for r in again["samples"]] == [r["path"] for r in json.loads((out / "samples.json").read_text())[
        "samples"]]
    for row in again["samples"]:
        np.testing.assert_array_equal(np.asarray(nib.load(inf / row["path"]).dataobj),
                                      np.asarray(nib.load(out / row["path"]).dataobj))


def test_sample_a_larger_latent_than_the_training_crop_in_decoding_windows(sit_factors, tiny_vae, tiny_latents,
                                                                           tiny_pretrain, tmp_path):
    # the tiny generator was trained on 8^3 crops; a 16^3 latent (64^3 image) decoded in 2 x 2 x 2 windows of <= 10
    out = tmp_path / "large"
    bundle_run("meduet_diffusion", "sample", "--bundle_root", str(sit_factors), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
               "--latent_datalist", str(tiny_latents), "--output_dir", str(out), "--num_per_site", "1",
               "--num_steps", "3", "--sites", "['site0']", "--latent_size", "16", "--decode_window", "10")
    summary = json.loads((out / "samples.json").read_text())
    assert summary["latent_shape"][1:] == [16, 16, 16] and summary["decode_window"] == 10
    data = np.asarray(nib.load(out / "site0_0.nii.gz").dataobj)
    assert data.shape == (64, 64, 64) and np.isfinite(data).all() and data.std() > 0


def test_transfer_measures_gap_and_anatomy(sit_factors, tiny_vae, tiny_latents, tiny_pretrain, tmp_path):
    out = tmp_path / "transfer"
    bundle_run("meduet_diffusion", "transfer", "--bundle_root", str(sit_factors), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
               "--latent_datalist", str(tiny_latents), "--output_dir", str(out), "--pairs", "2", "--num_steps", "5",
               "--style_from", "site")
    res = json.loads((out / "transfer.json").read_text())
    assert res["method"] == "rflow inversion" and len(res["pairs"]) == 2
    low, high = res["gap_closed_ci95"]
    assert min(r["gap_closed"] for r in res["pairs"]) <= low <= res["gap_closed"] <= high <= max(
        r["gap_closed"] for r in res["pairs"])
    for row in res["pairs"]:
        assert row["site_from"] != row["site_to"] and np.isfinite(row["d_transfer"]) and row["d_rec"] > 0
        assert np.isfinite(row["gap_closed_vs_scan"]) and np.isfinite(row["vae_ceiling"]) and row["d_source"] > 0
        assert (out / f"{row['A'].replace('.nii.gz', '')}_to_{row['site_to']}.nii.gz").exists()
    assert (out / "transfer.png").stat().st_size > 0


def test_errors_are_one_line(tiny_latents, tiny_pretrain, tiny_vae, sit_factors, tmp_path):
    proc = _train(tmp_path / "nopre", tiny_latents, tmp_path, check=False)  # no meduet_pretrain model.pt there
    assert proc.returncode != 0 and "meduet_pretrain" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "nopre" / "models" / "model.pt").exists()
    proc = bundle_run("meduet_diffusion", "sample", "--bundle_root", str(sit_factors), "--vae_ckpt",
                      str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
                      "--output_dir", str(tmp_path / "s"), "--sites", "['nowhere']", check=False)
    assert proc.returncode != 0 and "unknown site 'nowhere'" in proc.stderr
    proc = bundle_run("meduet_diffusion", "sample", "--bundle_root", str(tmp_path / "empty"), "--vae_ckpt",
                      str(tiny_vae / "models/model.pt"), "--output_dir", str(tmp_path / "s2"), check=False)
    assert proc.returncode != 0 and "meduet_diffusion" in proc.stderr and "does not exist" in proc.stderr


def test_monai_bundle_load(sit_factors, tmp_path):
    import shutil

    from monai.bundle import load

    bundle_dir = tmp_path / "dl"
    (bundle_dir / "meduet_diffusion" / "models").mkdir(parents=True)
    (bundle_dir / "meduet_diffusion" / "configs").symlink_to(REPO / "bundles/meduet_diffusion/configs")
    shutil.copy(sit_factors / "models/model.pt", bundle_dir / "meduet_diffusion/models/model.pt")
    ref = records.load(sit_factors / "models/model.pt", expect="dit")
    # the network comes from config (the preset's sizes), the weights and record from model.pt
    override = {"preset": "tiny", "input_size": [8, 8, 8], "content_dim": ref.arch["content_dim"],
                "style_dim": ref.arch["style_dim"]}
    net = load("meduet_diffusion", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
               net_override=override)
    assert isinstance(net, LatentDiT) and net.arch == ref.arch
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500])
    cond = {"content": torch.randn(2, ref.arch["content_dim"]), "style": torch.randn(2, ref.arch["style_dim"])}
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, t, cond), ref(x, t, cond))
    with pytest.raises(MeduetConfigError, match="architecture|dim"):
        load("meduet_diffusion", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
             net_override={**override, "preset": "demo"})


def test_torchrun_two_processes_gloo(tiny_latents, tiny_pretrain, tmp_path, monkeypatch):
    """multi_gpu_train.yaml: 2 processes (gloo, CPU); the ranks end with identical weights and EMA."""

    root = tmp_path / "ddp"
    dump = tmp_path / "dump_ranks.yaml"  # appended after the bundle's own `training` list: each rank saves its nets
    dump.write_text("+training:\n  - \"$torch.save({'net': meduet.engines.checkpoint.unwrap(@network).state_dict(), "
                    "'ema': @ema.module.state_dict()}, os.path.join(@bundle_root, 'rank' + os.environ['RANK'] + "
                    "'.pt'))\"\n")
    cfg_dir = REPO / "bundles" / "meduet_diffusion" / "configs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"), "--batch_size", "2", run_id="training",
               extra_configs=("multi_gpu_train", os.path.relpath(dump.with_suffix(""), cfg_dir)),
               launcher=torchrun_launcher(2), timeout=600)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = torch.load(root / "models/model.pt", weights_only=True)
    for part in ("net", "ema"):
        for k in ranks[0][part]:
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), f"{part} {k} differs between ranks"
    assert all(torch.equal(ranks[0]["ema"][k], model[k]) for k in model if k != "_extra_state")
    assert (root / "models/factor_prior.pt").exists()


def test_evaluate_reports_fid_proxy_mmd_diversity_and_val_loss(sit_factors, tiny_vae, tiny_latents, tiny_pretrain,
                                                                tmp_path):
    out = tmp_path / "eval"
    bundle_run("meduet_diffusion", "evaluate", "--bundle_root", str(sit_factors), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
               "--latent_datalist", str(tiny_latents), "--output_dir", str(out), "--num_per_site", "1",
               "--num_steps", "5")
    m = json.loads((out / "metrics.json").read_text())
    lat = json.loads(tiny_latents.read_text())
    assert m["n_real"] == len(lat["test"]) and m["n_fake"] == len(lat["domains"])
    assert "proxy" in m["fid_features"] and m["fid"] >= 0 and np.isfinite(m["mmd"])
    assert 0 < m["ms_ssim_diversity_real"] <= 1 and 0 < m["ms_ssim_diversity_fake"] <= 1
    # the outline agreement: one score per generated volume, each the IoU with the closest real one
    assert len(m["outline_iou_fake_each"]) == m["n_fake"] and all(0 <= v <= 1 for v in m["outline_iou_fake_each"])
    assert m["outline_iou_fake"] == pytest.approx(float(np.mean(m["outline_iou_fake_each"])))
    rows = [json.loads(x) for x in (sit_factors / "runs/val_loss.jsonl").read_text().splitlines()]
    assert m["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)  # same fixed crops, noise, timesteps
    assert (out / "real_vs_generated.png").stat().st_size > 0
