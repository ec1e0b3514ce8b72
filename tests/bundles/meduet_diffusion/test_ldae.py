"""LDAE in meduet_diffusion (configs/ldae.yaml + autoencode.yaml) at the tiny preset, run as users do: the semantic
generator's files and record, its encoder trained by the diffusion loss, diffusion autoencoding scored against the
VAE's own reconstruction, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch

from conftest import bundle_run
from meduet import records
from meduet.engines.checkpoint import load_checkpoint
from meduet.networks.dit import build_dit


@pytest.fixture(scope="module")
def ldae(tmp_path_factory, tiny_latents) -> Path:
    """meduet_diffusion's bundle root after a tiny LDAE training run (condition semantic, ddpm, models/ldae/)."""
    root = tmp_path_factory.mktemp("ldae")
    bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--max_epochs", "3", run_id="training", extra_configs=("ldae",))
    return root


def test_ldae_training_writes_its_own_files_and_trains_the_encoder(ldae, tiny_latents):
    assert not (ldae / "models/model.pt").exists()  # the factor generator's place is left alone
    net = records.load(ldae / "models/ldae/model.pt", expect="dit")
    assert net.meta["condition"] == "semantic" and net.meta["objective"]["objective"] == "ddpm"
    assert net.arch["cond_dropout"] == 0.0 and net.arch["semantic_encoder"]["code_dim"] == net.code_dim
    assert "pretrain_ckpt" not in net.meta  # no meduet_pretrain needed
    ckpt = load_checkpoint(ldae / "models/ldae/checkpoint.pt")
    # the encoder's weights moved: the EMA (models/ldae/model.pt) lags the trained student only where training
    # changed the weights (both start equal)
    student, ema = ckpt["model"], ckpt["ema"]["module"]
    moved = [k for k in ema if k.startswith("semantic_encoder.") and ema[k].is_floating_point()
             and not torch.equal(student[k], ema[k])]
    assert any(k.startswith("semantic_encoder.out.") for k in moved)
    assert any(k.startswith("semantic_encoder.trunk.blocks.") for k in moved)
    assert (ldae / "runs/ldae/val_loss.jsonl").exists()


def test_autoencode_reconstructs_through_the_code_and_its_inverted_noise(ldae, tiny_vae, tiny_latents, tmp_path):
    out = tmp_path / "ae"
    bundle_run("meduet_diffusion", "autoencode", "--bundle_root", str(ldae), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--output_dir", str(out),
               "--max_cases", "3", "--num_steps", "20")
    report = json.loads((out / "autoencode.json").read_text())
    assert len(report["cases"]) == 3 and report["sampler"] == "ddim"
    mean, ci = report["mean"], report["ci95"]
    for row in ("vae", "ldae", "ldae_code_only"):
        assert ci[f"psnr_{row}"][0] <= mean[f"psnr_{row}"] <= ci[f"psnr_{row}"][1]
    # DDIM inversion + sampling brings the latent back: the diffusion decoder lands near its ceiling, and much
    # nearer than the same code from random noise
    assert abs(mean["psnr_ldae"] - mean["psnr_vae"]) < 1.0
    assert mean["psnr_ldae"] > mean["psnr_ldae_code_only"] + 1.0
    assert mean["psnr_ldae_vs_vae"] > mean["psnr_ldae"]  # nearer the VAE's rendering than the noisy scan
    vols = sorted(out.glob("*_ldae.nii.gz"))
    assert len(vols) == 3 and nib.load(vols[0]).ndim == 3 and (out / "autoencode.png").exists()


def test_autoencode_errors_are_one_line(sit_factors, tiny_vae, tiny_latents, tmp_path):
    # a generator without a code per scan (conditioned on nothing): refused, naming what has one
    src = records.load(sit_factors / "models/model.pt", expect="dit")
    uncond = records.with_meta(build_dit("tiny", condition="none"), {**src.meta, "condition": "none"})
    torch.save(uncond.state_dict(), tmp_path / "uncond.pt")
    out = tmp_path / "ae"
    proc = bundle_run("meduet_diffusion", "autoencode", "--model_ckpt", str(tmp_path / "uncond.pt"),
                      "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents),
                      "--output_dir", str(out), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "conditioned on 'none'" in last and "ldae.yaml" in last
    assert "Traceback" not in proc.stderr and not (out / "autoencode.json").exists()
    proc = bundle_run("meduet_diffusion", "autoencode", "--bundle_root", str(tmp_path / "none"), "--vae_ckpt",
                      str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--output_dir",
                      str(out), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr.strip().splitlines()[-1]


def test_factors_generator_codes_are_meduet_content_and_style(sit_factors, tiny_pretrain, tiny_vae, tiny_latents,
                                                               tmp_path):
    """The variant with the frozen pretrained encoder: the factors-conditioned SiT autoencodes, interpolates and edits
    with MeDUET's pooled content + style as the code (Euler inversion of the rectified flow)."""
    common = ("--model_ckpt", str(sit_factors / "models/model.pt"), "--pretrain_ckpt",
              str(tiny_pretrain / "models/model.pt"), "--vae_ckpt", str(tiny_vae / "models/model.pt"),
              "--latent_datalist", str(tiny_latents), "--num_steps", "10")
    bundle_run("meduet_diffusion", "autoencode", *common, "--output_dir", str(tmp_path / "ae"), "--max_cases", "2")
    ae = json.loads((tmp_path / "ae/autoencode.json").read_text())
    net = records.load(sit_factors / "models/model.pt", expect="dit")
    assert ae["condition"] == "factors" and ae["sampler"] == "rflow"
    assert ae["code_dim"] == net.content_dim + net.style_dim > 0
    # the inverted noise carries the scan: its decode is far nearer the ceiling than the code's from random noise
    assert ae["mean"]["psnr_ldae_vs_vae"] > 20.0
    assert ae["mean"]["psnr_ldae"] > ae["mean"]["psnr_ldae_code_only"]
    bundle_run("meduet_diffusion", "interpolate", *common, "--output_dir", str(tmp_path / "ip"), "--max_subjects", "1")
    ip = json.loads((tmp_path / "ip/interpolate.json").read_text())
    assert ip["condition"] == "factors" and ip["subjects"] == 1 and 0.0 <= ip["mean"]["mse_ldae"] < 1.0
    bundle_run("meduet_diffusion", "manipulate", *common, "--output_dir", str(tmp_path / "mp"), "--max_cases", "1",
               "--steps", "[-4,0,4]")
    mp = json.loads((tmp_path / "mp/manipulate.json").read_text())
    case = mp["cases"][0]
    assert mp["condition"] == "factors" and case["change_outside"][1] == 0.0
    assert case["probe"][0] != case["probe"][-1]  # the code moved: so did the probe's reading of the re-encoded edit


def _interpolate(ldae: Path, tiny_vae: Path, tiny_latents: Path, out: Path, *extra: str, check: bool = True):
    return bundle_run("meduet_diffusion", "interpolate", "--bundle_root", str(ldae), "--vae_ckpt",
                      str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--output_dir",
                      str(out), "--num_steps", "10", *extra, check=check)


def test_interpolation_is_scored_against_the_true_middle_visit(ldae, tiny_vae, tiny_latents, tmp_path):
    out = tmp_path / "interp"
    _interpolate(ldae, tiny_vae, tiny_latents, out, "--max_subjects", "2")
    report = json.loads((out / "interpolate.json").read_text())
    lat = json.loads(tiny_latents.read_text())
    middle = {Path(it["latent"]).name for it in lat["longitudinal"] if it["visit"] == 1}
    assert report["subjects"] == 2 and {r["target"] for r in report["targets"]} <= middle
    assert all(r["weight"] == pytest.approx(0.5) for r in report["targets"])  # visits 10 years apart
    mean = report["mean"]
    for name in ("ldae", "latent_lerp", "image_lerp", "ldae_vae_ceiling"):
        assert 0.0 <= mean[f"mse_{name}"] < 1.0 and -1.0 <= mean[f"ssim_{name}"] <= 1.0
    # the linear image baseline sits between two real scans of the subject: far closer to the truth than an
    # unrelated noisy guess, and the ceiling (the VAE's own rendering of the truth) beats the latent baseline
    assert mean["mse_image_lerp"] < 0.05 and mean["mse_ldae_vae_ceiling"] <= mean["mse_latent_lerp"] + 1e-6
    assert len(list(out.glob("*_ldae.nii.gz"))) == 2 and (out / "interpolate.png").exists()


def test_interpolating_two_subjects_needs_the_flag(ldae, tiny_vae, tiny_latents, tmp_path):
    lat = json.loads(tiny_latents.read_text())
    first = {}
    for it in lat["longitudinal"]:
        first.setdefault(it["subject"], Path(it["latent"]).name.replace(".nii.gz", ""))
    a, b = list(first.values())[:2]
    out = tmp_path / "two"
    proc = _interpolate(ldae, tiny_vae, tiny_latents, out, "--cases", f"['{a}','{b}']", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "different subjects" in last and "--allow_different_subjects True" in last
    assert "Traceback" not in proc.stderr and not (out / "interpolate.json").exists()
    _interpolate(ldae, tiny_vae, tiny_latents, out, "--cases", f"['{a}','{b}']", "--allow_different_subjects",
                 "True", "--weights", "[0.5]")
    report = json.loads((out / "interpolate.json").read_text())
    assert report["weights"] == [0.5] and report["volumes"] == ["interp_0.5.nii.gz"]


def _manipulate(ldae: Path, tiny_vae: Path, tiny_latents: Path, out: Path, *extra: str, check: bool = True):
    return bundle_run("meduet_diffusion", "manipulate", "--bundle_root", str(ldae), "--vae_ckpt",
                      str(tiny_vae / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--output_dir",
                      str(out), "--num_steps", "10", "--max_cases", "2", *extra, check=check)


def test_manipulation_reports_probe_volume_and_change_per_step(ldae, tiny_vae, tiny_latents, tmp_path):
    out = tmp_path / "edit"
    _manipulate(ldae, tiny_vae, tiny_latents, out, "--attribute", "organ_b_ml", "--steps", "[-4,0,4]")
    report = json.loads((out / "manipulate.json").read_text())
    assert report["task"] == "regression" and report["fit_cases"] == 12 and report["measured_labels"] == [3]
    assert len(report["cases"]) == 2
    for case in report["cases"]:
        zero = case["steps"].index(0.0)
        assert case["change_outside"][zero] == 0.0 and case["change_inside"][zero] == 0.0
        assert all(v > 0 for v in case["volume_ml"])  # the organ is found in every decoded edit
        # the probe reads the re-encoded edits: the code moved, so the reading moved with the step
        assert case["probe"][0] != case["probe"][-1]
    assert -1.0 <= report["rho_probe"] <= 1.0 and len(list(out.glob("*_step*.nii.gz"))) == 6
    assert (out / "manipulate.png").exists()


def test_manipulation_bad_attributes_are_one_line(ldae, tiny_vae, tiny_latents, tmp_path):
    out = tmp_path / "bad"
    for attr, words in (("nonexistent", "is missing from"), ("lesion", None)):
        proc = _manipulate(ldae, tiny_vae, tiny_latents, out, "--attribute", attr, "--fit_splits", "['test']",
                           check=False)
        if words is None:  # lesion is 1 on every test item: constant
            words = "same value"
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and words in last and attr in last and "Traceback" not in proc.stderr
        assert not (out / "manipulate.json").exists()
