"""bundles/meduet_pretrain train.yaml at the tiny preset, run as `python -m monai.bundle run training ...`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, assert_same, bundle_run, run_killed_at_save, torchrun_launcher
from meduet.data import write_datalist
from meduet.engines.checkpoint import load_checkpoint
from meduet.latent import read_datalist, read_items
from meduet.errors import MeduetConfigError, MeduetInputError


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    """A latent datalist in meduet_vae encode.yaml's format: 3 sites, 4-channel latents of 10-12 voxels a side."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    domains = ["site0", "site1", "site2"]
    items = []
    for i in range(8):
        shape = (10 + i % 3, 11, 12, 4)
        lat = rng.normal(size=shape).astype(np.float32) + np.array([1.0, 0, -1, 0.5]) * (i % 3)
        rel = f"latents/case{i}.nii.gz"
        (root / "latents").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(lat, np.diag([6.0, 6.0, 6.0, 1.0])), root / rel)
        items.append({"latent": rel, "image": f"case{i}.nii.gz", "domain": domains[i % 3],
                      "latent_shape": [4, *shape[:3]]})
    write_datalist(root / "datalist.json", {
        "domains": domains, "latent_channels": 4, "downsample_factor": 4, "latent_scale_factor": 0.8,
        "training": items, "validation": [], "test": items[:2]})
    return root / "datalist.json"


@pytest.mark.parametrize("objective", ["meduet", "mae"])
def test_tiny_training_writes_resumable_checkpoints(latent_cache, tmp_path, objective):
    root = tmp_path / objective
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(latent_cache),
               run_id="training", extra_configs=("mae_baseline",) if objective == "mae" else ())
    models = root / "models" / ("baseline_mae" if objective == "mae" else "")  # the baseline keeps its own files
    ckpt = load_checkpoint(models / "checkpoint.pt")
    assert ckpt["engine"]["epoch"] == 2 and ckpt["engine"]["iteration"] == 4  # 8 latents, batch 4, 2 epochs
    assert ("teacher" in ckpt) == (objective == "meduet")
    # model.pt: the deployable encoder (no decoder); training_network.pt: the whole network, whose encoder weights
    # are model.pt's, bit for bit
    state = torch.load(models / "model.pt", weights_only=True)
    full = torch.load(models / "training_network.pt", weights_only=True)
    assert not any("decoder" in k for k in state) and any("decoder" in k for k in full)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    for k, v in state.items():
        if k != "_extra_state":
            assert torch.equal(v, full[k]), k


def test_kill_and_resume_gives_the_same_weights(tiny_latents, tiny_pretrain, tmp_path):
    """Run tiny_pretrain's training (its command less the MLflow tracking), SIGKILL it when it is about to save epoch
    2 of 2, resume it with the same command, and get what tiny_pretrain's uninterrupted run got, bit for bit: student
    (checkpoint, model.pt, training_network.pt, with the content eraser fitted after the last epoch), EMA teacher,
    optimiser, schedule, step counters and RNG states."""
    root = tmp_path / "killed"
    args = ["--latent_datalist", str(tiny_latents), "--content_eraser#enabled", "True"]
    run_killed_at_save("meduet_pretrain", root, tmp_path, *args)
    resumed = bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), *args, run_id="training")
    assert f"resumed from {root / 'models/checkpoint.pt'} at epoch 1," in resumed.stdout + resumed.stderr
    ref, res = tiny_pretrain / "models", root / "models"
    ckpt, again = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(res / "checkpoint.pt")
    assert {"model", "teacher", "optimizer", "lr_scheduler", "engine", "rng"} <= set(ckpt)
    assert ckpt["engine"]["epoch"] == 2
    # Python's own RNG state is left out: training draws nothing from it, but the reference run (tracked with MLflow
    # when installed, conftest.mlflow_args) may have: MLflow's file store draws from it when it creates an
    # experiment whose random id has leading zeros, about one run in ten (mlflow.utils.name_utils)
    del ckpt["rng"]["python"], again["rng"]["python"]
    assert_same(ckpt, again, "checkpoint.pt")
    for name in ("model.pt", "training_network.pt"):
        assert_same(torch.load(ref / name, weights_only=True), torch.load(res / name, weights_only=True), name)


def test_latent_datalist_errors(latent_cache, tmp_path):
    with pytest.raises(MeduetConfigError, match="encode"):
        read_datalist(str(tmp_path / "missing.json"))
    items = read_items(str(latent_cache), "training")
    assert items[1]["domain_index"] == 1 and Path(items[1]["latent"]).is_absolute()
    bad = json.loads(latent_cache.read_text())
    bad["training"][0]["domain"] = "site9"
    (tmp_path / "dl.json").write_text(json.dumps(bad))
    (tmp_path / "latents").symlink_to(latent_cache.parent / "latents")
    with pytest.raises(MeduetInputError, match="site9"):
        read_items(str(tmp_path / "dl.json"), "training")


def test_torchrun_two_processes_gloo(latent_cache, tmp_path, monkeypatch):
    """multi_gpu_train.yaml: 2 processes (gloo, CPU), DDP + DistributedSampler; the ranks end with the same weights."""
    root = tmp_path / "ddp"
    # appended after the bundle's own `training` list (after destroy_process_group): each rank saves its own
    # final student and EMA teacher weights
    dump = tmp_path / "dump_ranks.yaml"
    dump.write_text(
        "+training:\n"
        "  - \"$torch.save({'model': meduet.engines.checkpoint.unwrap(@network).state_dict(), "
        "'teacher': @teacher.state_dict()['module']}, "
        "os.path.join(@bundle_root, 'rank' + os.environ['RANK'] + '.pt'))\"\n"
    )
    cfg_dir = REPO / "bundles" / "meduet_pretrain" / "configs"
    launcher = torchrun_launcher(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # 8 latents -> 4 per rank, per-rank batch 2 (one pair) -> 2 iterations per epoch; MFTD starts at step 2
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(latent_cache),
               "--batch_size", "2", run_id="training",
               extra_configs=("multi_gpu_train", os.path.relpath(dump.with_suffix(""), cfg_dir)),
               launcher=launcher, timeout=300)
    ckpt = load_checkpoint(root / "models" / "checkpoint.pt")
    assert ckpt["engine"]["epoch"] == 2 and ckpt["engine"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped
    model = torch.load(root / "models" / "model.pt", weights_only=True)
    floats = {k: v for k, v in model.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert floats and all(torch.isfinite(v).all() for v in floats.values())
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in floats.items():  # model.pt is rank 0's final student
        assert torch.equal(v, ranks[0]["model"][k]), k
    for part in ("model", "teacher"):  # DDP kept the ranks in sync although they trained on different latents
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for k, v in ranks[0][part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ranks[1][part][k]), f"{part}.{k} differs between ranks"
    for k, v in ranks[0]["teacher"].items():
        assert torch.equal(v, ckpt["teacher"]["module"][k]), k
