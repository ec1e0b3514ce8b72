"""bundles/meduet_vae end to end at the tiny preset, every workflow run as `python -m monai.bundle run ...`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, bundle_run, torchrun_launcher
from meduet.engines.checkpoint import load_checkpoint
from meduet import records

EPOCHS = 3


def _train_args(root: Path, data: Path, *extra: str) -> list[str]:
    return ["--bundle_root", str(root), "--dataset_dir", str(data / "phantoms"), "--max_epochs", str(EPOCHS), *extra]


@pytest.fixture(scope="module")
def trained(tiny_vae) -> Path:
    """One uninterrupted tiny training run of EPOCHS epochs, then decoder fine-tuning (conftest's ``tiny_vae``)."""
    return tiny_vae


def test_training_writes_what_the_next_stage_needs(trained, tiny_data):
    models = trained / "models"
    assert {"model.pt", "model_stage1.pt", "checkpoint.pt", "checkpoint_decoder.pt"} <= {p.name for p in models.iterdir()}
    assert not list(models.glob("*.tmp"))  # atomic writes leave no temporary files
    vae = records.load(models / "model_stage1.pt", expect="vae")
    meta = vae.meta
    assert meta["stage"] == "meduet_vae"
    assert meta["preprocessing"]["modality"] == "CT" and meta["preprocessing"]["pad_multiple"] == 4
    assert meta["domains"] == json.loads((tiny_data / "phantoms/datalist.json").read_text())["domains"]
    # the scale factor is 1/std of latent means seen in the last epoch: positive, finite, not the default
    assert np.isfinite(meta["latent_scale_factor"]) and meta["latent_scale_factor"] > 0
    assert meta["latent_scale_factor"] != 1.0
    assert abs(meta["latent_scale_factor"] * meta["latent_std"] - 1) < 1e-6
    assert len(meta["config_hash"]) == 16
    ckpt = load_checkpoint(models / "checkpoint.pt")
    assert ckpt["engine"]["epoch"] == EPOCHS
    assert {"model", "discriminator", "optimizer", "d_optimizer", "rng"} <= set(ckpt)
    # decoder fine-tuning changed the decoder only
    after = records.load(models / "model.pt", expect="vae")
    assert after.meta.get("decoder_finetuned") is True
    # the patch-wise encoding the decoder was fine-tuned with travels in its record (tiny: 16^3, no overlap)
    # and volume-wise decoding (3D MedDiffusion's; decode_window None)
    stored = after.meta["patch_encoding"]
    assert {k: stored[k] for k in ("patch_size", "overlap", "mode", "tiling", "decode_window")} == {
        "patch_size": [16, 16, 16], "overlap": 0.0, "mode": "constant", "tiling": "fixed", "decode_window": None}
    b, a = vae.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("encoder."))
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))


def test_kill_and_resume_gives_the_same_weights(trained, tiny_data, tmp_path):
    """SIGKILL a run right after its first checkpoint, resume it, and get bit-identical weights."""
    root = tmp_path / "killed"
    cfg = "bundles/meduet_vae/configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           f"['{cfg}/train.yaml','{cfg}/presets/tiny.yaml']", *_train_args(root, tiny_data)]
    env = dict(os.environ, MEDUET_PROGRESS="0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = root / "models" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt_path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = load_checkpoint(ckpt_path)  # loads: the write was atomic
    epoch_at_kill = killed["engine"]["epoch"]
    assert "lr_scheduler" in killed  # the tiny preset's warm-up + cosine schedule resumes where it stopped
    assert epoch_at_kill < EPOCHS, "the run finished before it could be killed; make the tiny epochs longer"
    resumed = bundle_run("meduet_vae", "train", *_train_args(root, tiny_data), run_id="training")
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = torch.load(trained / "models" / "model_stage1.pt", weights_only=True)
    b = torch.load(root / "models" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed at epoch {epoch_at_kill})"


def test_evaluate_reports_metrics_seams_and_pictures(trained, tiny_data):
    out = trained / "eval_test"
    bundle_run("meduet_vae", "evaluate", "--bundle_root", str(trained), "--dataset_dir", str(tiny_data / "phantoms"),
               "--output_dir", str(out), "--max_cases", "3")
    m = json.loads((out / "metrics.json").read_text())
    o = m["overall"]
    assert o["n"] == 3
    for k in ("psnr", "ssim", "ms_ssim", "seam_ratio", "before_seam_ratio", "patchwise_psnr", "psnr_noise_free",
              "psnr_ceiling", "contrast_kept_organ_a", "contrast_kept_organ_b"):
        assert np.isfinite(o[k]), k
    assert 5 < o["psnr"] < 60 and -1 <= o["ssim"] <= 1
    assert 15 < o["psnr_ceiling"] < 60  # the generated phantoms' noise, scored on the evaluated grid
    assert set(m["per_domain"]) <= set(json.loads((tiny_data / "phantoms/datalist.json").read_text())["domains"])
    pngs = list((out / "images").glob("*.png"))
    assert pngs and pngs[0].stat().st_size > 5000
    rec = next((out / "recon").glob("*_recon.nii.gz"))
    assert nib.load(rec).shape == nib.load(str(rec).replace("_recon", "_input")).shape
    assert (out / "cases.csv").read_text().count("\n") == 4


def test_evaluate_on_mr_brain(trained, tiny_data):
    out = trained / "eval_brain"
    bundle_run("meduet_vae", "evaluate", "--bundle_root", str(trained), "--output_dir", str(out),
               "--datalist", str(tiny_data / "brain/datalist.json"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["overall"]["n"] == 1 and np.isfinite(m["overall"]["psnr"])
    assert "psnr_ceiling" not in m["overall"]  # no noise-free render for an MR datalist


def test_encode_caches_latents_with_affine(trained, tiny_data):
    out = trained / "latents_test"
    bundle_run("meduet_vae", "encode", "--bundle_root", str(trained), "--dataset_dir", str(tiny_data / "phantoms"),
               "--latent_dir", str(out))
    dl = json.loads((out / "datalist.json").read_text())
    src = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    assert dl["domains"] == src["domains"] and dl["latent_channels"] == 4 and dl["downsample_factor"] == 4
    assert len(dl["training"]) == len(src["training"]) and len(dl["test"]) == len(src["test"])
    assert np.isfinite(dl["latent_std"]) and dl["latent_std"] > 0
    # the longitudinal cohort is encoded too, its items keep the subject, age, visit and attributes
    keys = ("subject", "age", "visit", "organ_a_ml", "organ_b_ml", "lesion_ml", "lesion")
    assert len(dl["longitudinal"]) == len(src["longitudinal"]) == 4 * 3
    for lat_item, src_item in zip(dl["longitudinal"], src["longitudinal"]):
        assert {k: lat_item[k] for k in keys} == {k: src_item[k] for k in keys}
    assert all("organ_b_ml" in it for it in dl["training"])
    item = dl["training"][0]
    lat = nib.load(out / item["latent"])
    assert lat.shape == tuple(s // 4 for s in item["image_shape"]) + (4,)
    assert np.allclose(np.linalg.norm(lat.affine[:3, :3], axis=0), 4 * np.array(item["spacing"]))
    assert item["domain"] in src["domains"]
    # the cached latent is the VAE's posterior mean of the preprocessed image, encoded patch-wise exactly as the
    # decoder was fine-tuned (the scheme in its record: 16^3 windows over the <=32^3 tiny volumes), not whole
    vae = records.load(trained / "models" / "model.pt", expect="vae")
    from meduet.data import get_load_transforms
    from meduet.networks.vae import PatchEncoding

    assert dl["patch_encoding"] == vae.meta["patch_encoding"]
    x = get_load_transforms(**vae.meta["preprocessing"])({"image": item["image"], "label": item["label"]})["image"]
    x = x.as_tensor().unsqueeze(0)
    with torch.no_grad():
        z = PatchEncoding.of(vae).encode(vae, x)[0]
        whole = vae.encode_mean(x)[0]
    cached = torch.from_numpy(np.moveaxis(np.asarray(lat.dataobj), -1, 0))
    assert max(item["image_shape"]) > 16  # several windows
    assert torch.allclose(cached, z, atol=1e-4) and not torch.allclose(cached, whole, atol=1e-3)


def test_encode_with_no_items_to_encode_is_one_line_and_writes_nothing(trained, tiny_data):
    out = trained / "latents_empty"
    proc = bundle_run("meduet_vae", "encode", "--bundle_root", str(trained), "--dataset_dir",
                      str(tiny_data / "phantoms"), "--latent_dir", str(out), "--splits", "['nosuch']", check=False)
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "has no items in the splits to encode ['nosuch']" in last and "datalist.json" in last
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (out / "datalist.json").exists()


def test_inference_writes_nifti_on_the_input_grid(trained, tiny_data):
    out = trained / "infer"
    img = tiny_data / "phantoms/images" / sorted(os.listdir(tiny_data / "phantoms/images"))[0]
    bundle_run("meduet_vae", "inference", "--bundle_root", str(trained), "--output_dir", str(out),
               "--input_data", json.dumps([{"image": str(img)}]))
    res = next(out.glob("*_recon.nii.gz"))
    a, b = nib.load(img), nib.load(res)
    assert a.shape == b.shape[:3]
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    v = np.asarray(b.dataobj)
    assert -175.0 - 1e-3 <= v.min() and v.max() <= 250.0 + 1e-3  # back in Hounsfield units of the CT window


def test_inference_refuses_an_mr_read_as_ct_with_one_line(trained, tiny_data):
    """The brain MR through the CT default: one line naming the override, no traceback, no ignite error lines."""
    out = trained / "infer_mr"
    mr = tiny_data / "brain/images" / sorted(os.listdir(tiny_data / "brain/images"))[0]
    proc = bundle_run("meduet_vae", "inference", "--bundle_root", str(trained), "--output_dir", str(out),
                      "--input_data", json.dumps([{"image": str(mr)}]), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text and "terminating due to exception" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("MeduetInputError: ") and str(mr) in last and "--preprocessing_args#modality MR" in last
    assert not list(out.glob("*.nii.gz"))
    # told it is an MR, the same file runs
    bundle_run("meduet_vae", "inference", "--bundle_root", str(trained), "--output_dir", str(out),
               "--input_data", json.dumps([{"image": str(mr)}]), "--preprocessing_args#modality", "MR")
    assert len(list(out.glob("*_recon.nii.gz"))) == 1
    # a 4-D (two-channel) image: one line naming the channels, not a convolution's channel error
    img = nib.load(tiny_data / "phantoms/images" / sorted(os.listdir(tiny_data / "phantoms/images"))[0])
    two = trained / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 2, -1).astype(np.float32), img.affine), two)
    proc = bundle_run("meduet_vae", "inference", "--bundle_root", str(trained), "--output_dir", str(out / "two"),
                      "--input_data", json.dumps([{"image": str(two)}]), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert "has 2 channels" in text.strip().splitlines()[-1] and str(two) in text.strip().splitlines()[-1]


def test_monai_bundle_load(trained):
    """monai.bundle.load with the bundle's inference.json; an architecture mismatch is an error, not random weights."""
    from monai.bundle import load

    bundle_dir = trained / "bundle_dir"
    (bundle_dir / "meduet_vae" / "models").mkdir(parents=True)
    (bundle_dir / "meduet_vae" / "configs").symlink_to(REPO / "bundles/meduet_vae/configs")
    (bundle_dir / "meduet_vae" / "models" / "model.pt").write_bytes((trained / "models/model.pt").read_bytes())
    tiny = {"num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}
    net = load("meduet_vae", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu", net_override=tiny)
    ref = records.load(trained / "models/model.pt", expect="vae")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    with pytest.raises(Exception, match="another 'vae' architecture"):
        load("meduet_vae", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
             net_override={**tiny, "latent_channels": 8})


def test_missing_checkpoint_and_bad_input_are_one_line(tmp_path, tiny_data):
    proc = bundle_run("meduet_vae", "evaluate", "--bundle_root", str(tmp_path), "--dataset_dir",
                      str(tiny_data / "phantoms"), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("MeduetConfigError: ") and "does not exist; train meduet_vae first" in last
    assert "Traceback" not in proc.stderr  # one line, not MONAI's nested traceback
    # a NaN volume in a datalist stops training before anything is written
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    arr = np.zeros((32, 32, 32), np.float32)
    arr[5, 5, 5] = np.nan
    arr[10:20, 10:20, 10:20] = 100
    nib.save(nib.Nifti1Image(arr, np.eye(4)), bad / "images/nan.nii.gz")
    (bad / "datalist.json").write_text(json.dumps(
        {"domains": ["a"], "training": [{"image": "images/nan.nii.gz", "domain": "a"}],
         "validation": [{"image": "images/nan.nii.gz", "domain": "a"}]}))
    proc = bundle_run("meduet_vae", "train", "--bundle_root", str(tmp_path / "b"), "--dataset_dir", str(bad),
                      run_id="training", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("MeduetInputError: ") and "nan.nii.gz" in last and "NaN" in last
    assert not (tmp_path / "b" / "models" / "model.pt").exists()


def test_torchrun_two_processes_gloo(tiny_data, tmp_path, monkeypatch):
    """multi_gpu_train.yaml: 2 processes (gloo, CPU); the ranks end with identical VAE and discriminator weights."""
    import os

    root = tmp_path / "ddp"
    dump = tmp_path / "dump_ranks.yaml"  # appended after the bundle's own `training` list: each rank saves its nets
    dump.write_text("+training:\n  - \"$torch.save({'vae': meduet.engines.checkpoint.unwrap(@network).state_dict(), "
                    "'disc': meduet.engines.checkpoint.unwrap(@discriminator).state_dict(), "
                    "'replicas': @train#sampler.num_replicas, 'sampler_rank': @train#sampler.rank}, "
                    "os.path.join(@bundle_root, 'rank' + os.environ['RANK'] + '.pt'))\"\n")
    cfg_dir = REPO / "bundles" / "meduet_vae" / "configs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = bundle_run("meduet_vae", "train", "--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms"),
                      "--max_epochs", "2", run_id="training", launcher=torchrun_launcher(2),
                      extra_configs=("multi_gpu_train", os.path.relpath(dump.with_suffix(""), cfg_dir)))
    log = proc.stdout + proc.stderr
    # no rank printed a traceback or an error (torch tags a failing rank's lines "[rank1]: Traceback ...")
    errors = [line for line in log.splitlines() if re.search(r"Traceback|Error\b|\bERROR\b", line)]
    assert not errors, "\n".join(errors[:20])
    vae = records.load(root / "models" / "model.pt", expect="vae")
    assert vae.meta["stage"] == "meduet_vae"
    assert load_checkpoint(root / "models" / "checkpoint.pt")["engine"]["epoch"] == 2
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # both processes trained, each on its own half of the data (DistributedSampler over 2 replicas)
    assert [(r["replicas"], r["sampler_rank"]) for r in ranks] == [(2, 0), (2, 1)]
    for part in ("vae", "disc"):
        assert ranks[0][part]
        for k, v in ranks[0][part].items():
            if k.endswith("_extra_state"):  # the record rank 0 refreshes when it saves
                continue
            assert torch.equal(v, ranks[1][part][k]), f"{part} {k} differs between ranks"

