"""meduet_seg: the network on the pretrained latent encoder, and the bundle's workflows at the tiny preset on the
tiny VAE / pretraining checkpoints of conftest."""

from __future__ import annotations

import json
import math
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, assert_same, bundle_run, run_killed_at_save, torchrun_launcher
from meduet.engines.checkpoint import load_checkpoint
from meduet import records
from meduet.engines.seg import build_seg, select_training_cases
from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.meduet import MEDUET_PRESETS
from meduet.networks.seg import MeduetSegNet

TINY_VAE = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[8, 16, 16],
                num_res_blocks=[1, 1, 1], norm_num_groups=4, norm_eps=1e-6, attention_levels=[False] * 3,
                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_convtranspose=False)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("patch,size", [(2, 16), (4, 32)])
def test_network_scales_skips_and_frozen_vae(patch, size):
    vit = dict(MEDUET_PRESETS["tiny"], patch_size=patch, input_size=size // 4)
    net = MeduetSegNet(TINY_VAE, vit, out_channels=3, feature_size=4)
    t = 4 * patch
    assert net.image_per_token == t
    assert net.token_scales == [t // 2 ** k for k in range(1, int(math.log2(patch)) + 1)]
    assert net.image_scales == [2, 1]
    x = torch.rand(2, 1, size, size, size)
    net.train()
    y = net(x)
    assert y.shape == (2, 3, size, size, size)  # full resolution
    assert not net.latent_encoder.training  # the VAE stays in eval mode
    y.square().mean().backward()
    assert all(p.grad is None for p in net.latent_encoder.parameters())
    assert all(not p.requires_grad for p in net.latent_encoder.parameters())
    assert net.encoder.vit.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.decoder_parameters())
    # every trainable parameter is used (DDP needs no find_unused_parameters); the unused style head is frozen
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in net.encoder.backbone.factors.style.parameters())
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 1, size + 4, size, size))


def test_bottleneck_choice_and_init_errors():
    vit = MEDUET_PRESETS["tiny"]
    both = MeduetSegNet(TINY_VAE, vit, out_channels=2, features="content+style", feature_size=4)
    assert both.ups[0].transp_conv.conv.in_channels == 32 + 8  # content (D) + style (D/4)
    assert MeduetSegNet(TINY_VAE, vit, 2, init="mae", feature_size=4).ups[0].transp_conv.conv.in_channels == 32
    with pytest.raises(MeduetConfigError, match="no style factor"):
        MeduetSegNet(TINY_VAE, vit, 2, init="mae", features="content+style")
    with pytest.raises(MeduetConfigError, match="init must be"):
        MeduetSegNet(TINY_VAE, vit, 2, init="imagenet")


def test_build_seg_loads_upstream_weights(tiny_vae, tiny_pretrain):
    vae_ckpt = tiny_vae / "models/model.pt"
    net = build_seg(str(vae_ckpt), str(tiny_pretrain / "models/model.pt"), init="meduet", out_channels=3)
    vae, enc = records.load(vae_ckpt, expect="vae"), records.load_part(tiny_pretrain / "models/model.pt", PretrainedEncoder)
    for k, v in net.vae.state_dict().items():
        assert torch.equal(v, vae.state_dict()[k]), k
    for k, v in enc.state_dict().items():
        assert torch.equal(v, net.encoder.state_dict()[k]), k
    assert LatentSpace.from_vae(net.vae).scale_factor == pytest.approx(LatentSpace.from_vae(vae).scale_factor)
    mae = build_seg(str(vae_ckpt), str(tiny_pretrain / "models/baseline_mae/model.pt"), init="mae", out_channels=3)
    assert mae.encoder.objective == "mae"
    scratch = build_seg(str(vae_ckpt), None, init="scratch", vit_preset="tiny", out_channels=3)
    assert not torch.equal(scratch.encoder.vit.patch_embed.weight, net.encoder.vit.patch_embed.weight)
    with pytest.raises(MeduetConfigError, match="a 'meduet' network but init 'mae'"):
        build_seg(str(vae_ckpt), str(tiny_pretrain / "models/model.pt"), init="mae")
    with pytest.raises(MeduetConfigError, match="needs pretrain_ckpt"):
        build_seg(str(vae_ckpt), None, init="meduet")


def test_build_seg_refuses_a_vit_pretrained_on_another_vaes_latents(tiny_vae, tiny_pretrain, tmp_path):
    """The paper presets once trained a VAE with a ViT pretrained on another VAE's latents without a word."""
    other = records.load(tiny_vae / "models/model.pt", expect="vae")
    other.meta = {**other.meta, "config_hash": "0123456789abcdef"}  # another VAE's record, same architecture
    torch.save(other.state_dict(), tmp_path / "other_vae.pt")
    assert records.read(tiny_pretrain / "models/model.pt")[1].get("vae_config_hash")  # the record says which VAE
    with pytest.raises(MeduetConfigError, match=r"has vae_config_hash='0123456789abcdef' but .*different VAEs") as err:
        build_seg(str(tmp_path / "other_vae.pt"), str(tiny_pretrain / "models/model.pt"), init="meduet")
    assert "\n" not in str(err.value)
    build_seg(str(tmp_path / "other_vae.pt"), None, init="scratch", vit_preset="tiny")  # no pretrained ViT: no pair


def test_label_fraction_keeps_sites_and_is_seeded():
    items = [{"image": f"i{i}", "label": f"l{i}", "domain": f"site{i % 4}"} for i in range(20)]
    items.append({"image": "unlabelled", "domain": "site0"})
    sub = select_training_cases(items, 0.25, seed=1)
    assert len(sub) == 5 and {it["domain"] for it in sub} == {"site0", "site1", "site2", "site3"}
    assert sub == select_training_cases(items, 0.25, seed=1)
    assert sub != select_training_cases(items, 0.25, seed=2)
    assert len(select_training_cases(items, 1.0)) == 20  # the unlabelled item is never used
    only = select_training_cases(items, 1.0, domains=["site1"])
    assert {it["domain"] for it in only} == {"site1"}
    with pytest.raises(MeduetConfigError, match="label_fraction"):
        select_training_cases(items, 0.0)


def test_training_record_and_resumable_checkpoint(seg_trained, tiny_data):
    net = records.load(seg_trained / "models/model.pt", expect="meduet_seg")
    dl = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    n_labelled = len([it for it in dl["training"] if it.get("label")])
    assert net.meta["training_cases"] == math.ceil(0.5 * n_labelled)
    assert net.meta["labels"]["0"] == "background" and net.meta["init"] == "meduet"
    assert net.meta["preprocessing"]["pad_multiple"] == net.image_per_token
    ckpt = load_checkpoint(seg_trained / "models/checkpoint.pt")
    assert ckpt["engine"]["epoch"] == 2 and {"model", "optimizer", "lr_scheduler", "rng"} <= set(ckpt)


def test_kill_and_resume_gives_the_same_weights(seg_trained, tiny_data, tiny_vae, tiny_pretrain, tmp_path):
    """Run seg_trained's training (its command less the MLflow tracking), SIGKILL it when it is about to save epoch 2
    of 2 (validated already), resume it with the same command, and get what seg_trained's uninterrupted run got, bit
    for bit: network (checkpoint and model.pt), optimiser, schedule, step counters and RNG states."""
    root = tmp_path / "killed"
    args = ["--dataset_dir", str(tiny_data / "phantoms"), "--vae_ckpt", str(tiny_vae / "models/model.pt"),
            "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"), "--label_fraction", "0.5"]
    run_killed_at_save("meduet_seg", root, tmp_path, *args)
    resumed = bundle_run("meduet_seg", "train", "--bundle_root", str(root), *args, run_id="training")
    assert f"resumed from {root / 'models/checkpoint.pt'} at epoch 1," in resumed.stdout + resumed.stderr
    ref = seg_trained / "models"
    ckpt, again = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(root / "models/checkpoint.pt")
    assert {"model", "optimizer", "lr_scheduler", "engine", "rng"} <= set(ckpt) and ckpt["engine"]["epoch"] == 2
    # Python's own RNG state is left out: training draws nothing from it, but the reference run (tracked with MLflow
    # when installed, conftest.mlflow_args) may have: MLflow's file store draws from it when it creates an
    # experiment whose random id has leading zeros, about one run in ten (mlflow.utils.name_utils)
    del ckpt["rng"]["python"], again["rng"]["python"]
    assert_same(ckpt, again, "checkpoint.pt")
    assert_same(torch.load(ref / "model.pt", weights_only=True), torch.load(root / "models/model.pt",
                                                                            weights_only=True), "model.pt")


def test_evaluate_reports_dice_hd95_per_class_and_site(seg_trained, tiny_data):
    out = seg_trained / "eval"
    bundle_run("meduet_seg", "evaluate", "--bundle_root", str(seg_trained), "--dataset_dir",
               str(tiny_data / "phantoms"), "--output_dir", str(out), "--save_images", "1")
    m = json.loads((out / "metrics.json").read_text())
    dl = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    assert m["overall"]["n"] == len(dl["test"])
    assert set(m["per_site"]) == set(dl["domains"])
    assert m["unseen_sites"]["n"] == len([it for it in dl["test"] if it["domain"] in dl["heldout_domains"]]) > 0
    assert set(m["overall"]["dice"]) == {"body", "organ_a", "organ_b", "lesion"}
    body = m["overall"]["dice"]["body"]
    assert 0.0 <= body <= 1.0
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == len(dl["test"]) + 1 and "hd95_body" in rows[0]
    assert len(list((out / "images").glob("*.png"))) == 1


def test_inference_writes_labels_on_the_input_grid(seg_trained, tiny_data, tmp_path):
    image = tiny_data / "phantoms" / json.loads((tiny_data / "phantoms/datalist.json").read_text())["test"][0]["image"]
    bundle_run("meduet_seg", "inference", "--bundle_root", str(seg_trained), "--output_dir", str(tmp_path),
               "--input_data", f"[{{'image': '{image}'}}]")
    out = list(tmp_path.glob("*_seg.nii.gz"))
    assert len(out) == 1
    seg, src = nib.load(out[0]), nib.load(image)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    values = np.unique(np.asarray(seg.dataobj))
    assert values.min() >= 0 and values.max() <= 4 and seg.get_data_dtype() == np.uint8


def test_monai_bundle_load_and_mismatch(seg_trained, tmp_path):
    from monai.bundle import load

    bundle_dir = tmp_path / "dl"
    (bundle_dir / "meduet_seg" / "models").mkdir(parents=True)
    (bundle_dir / "meduet_seg" / "configs").symlink_to(REPO / "bundles/meduet_seg/configs")
    shutil.copy(seg_trained / "models/model.pt", bundle_dir / "meduet_seg/models/model.pt")
    ref = records.load(seg_trained / "models/model.pt", expect="meduet_seg")
    override = {"vae_architecture": ref.arch["vae_architecture"], "vit": ref.arch["vit"], "feature_size": 8}
    net = load("meduet_seg", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu", net_override=override)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref(x))
    with pytest.raises(MeduetConfigError, match="another 'meduet_seg' architecture"):
        load("meduet_seg", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
             net_override={**override, "feature_size": 16})


def test_missing_upstream_checkpoint_is_one_line(tmp_path, tiny_data):
    proc = bundle_run("meduet_seg", "train", "--bundle_root", str(tmp_path), "--dataset_dir",
                      str(tiny_data / "phantoms"), "--vae_ckpt", str(tmp_path / "none.pt"), run_id="training",
                      check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("MeduetConfigError: ") and "train meduet_vae first" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "models").exists()


def test_torchrun_two_processes_gloo(tiny_data, tiny_vae, tiny_pretrain, tmp_path, monkeypatch):
    """multi_gpu_train.yaml: 2 processes (gloo, CPU); the ranks end with identical weights."""
    root = tmp_path / "ddp"
    dump = tmp_path / "dump_ranks.yaml"  # appended after the bundle's own `training` list: each rank saves its net
    dump.write_text("+training:\n  - \"$torch.save(meduet.engines.checkpoint.unwrap(@network).state_dict(), "
                    "os.path.join(@bundle_root, 'rank' + os.environ['RANK'] + '.pt'))\"\n")
    cfg_dir = REPO / "bundles" / "meduet_seg" / "configs"
    launcher = torchrun_launcher(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bundle_run("meduet_seg", "train", "--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms"),
               "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt",
               str(tiny_pretrain / "models/model.pt"), "--batch_size", "1", "--max_epochs", "1", run_id="training",
               extra_configs=("multi_gpu_train", os.path.relpath(dump.with_suffix(""), cfg_dir)),
               launcher=launcher, timeout=300)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = torch.load(root / "models/model.pt", weights_only=True)
    trained = [k for k in model if k.startswith(("encoder.", "ups.", "out."))]
    assert trained and all(torch.isfinite(model[k]).all() for k in trained if model[k].is_floating_point())
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs between ranks"
        if k != "_extra_state":  # model.pt's record also carries the training stamp
            assert torch.equal(ranks[0][k], model[k]), k


def test_dicom_series_in_dicom_seg_out(seg_trained, tiny_data, tmp_path):
    """A DICOM series folder (written here with pydicom) is read like NIfTI; the label map comes back as NIfTI and
    as a DICOM SEG whose frames lie on the source instances and reference the source series."""
    import highdicom as hd
    import pydicom

    from conftest import write_ct_series
    from meduet.data.dicom import label_frames, read_series

    item = json.loads((tiny_data / "phantoms/datalist.json").read_text())["test"][0]
    vol = np.asarray(nib.load(tiny_data / "phantoms" / item["image"]).dataobj)
    series = write_ct_series(vol, tmp_path / "series_ct")
    out = tmp_path / "out"
    bundle_run("meduet_seg", "inference", "--bundle_root", str(seg_trained), "--output_dir", str(out),
               "--input_data", f"[{{'image': '{series}'}}]")
    nifti = out / "series_ct_seg.nii.gz"
    seg_path = out / "series_ct_seg.dcm"
    assert nifti.is_file() and seg_path.is_file()
    seg = hd.seg.segread(seg_path)
    source = read_series(series)
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    refs = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert refs == {source[0].SeriesInstanceUID}
    # the SEG's frames equal the NIfTI label map sampled on every source slice
    lab = nib.load(nifti)
    expected = label_frames(np.asarray(lab.dataobj), lab.affine, source)
    numbers = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    names = records.load(seg_trained / "models/model.pt", expect="meduet_seg").meta["labels"]
    present = [int(k) for k in sorted(names, key=int) if int(k) > 0 and (expected == int(k)).any()]
    assert [numbers[i + 1] for i in range(len(present))] == [names[str(k)] for k in present]
    sop_uids = [ds.SOPInstanceUID for ds in source]
    for i, k in enumerate(present):
        mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[i + 1],
                                                 assert_missing_frames_are_empty=True)[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), expected == k)
    # NIfTI output on the DICOM grid as MONAI reads it
    from monai.transforms import LoadImage

    ref = LoadImage(image_only=True)(str(series))
    assert lab.shape == tuple(ref.shape) and np.allclose(lab.affine, np.asarray(ref.affine), atol=1e-4)
    assert pydicom.dcmread(seg_path).Modality == "SEG"


def test_input_the_network_cannot_take_is_one_line_and_writes_nothing(seg_trained, tmp_path):
    two_channels = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32, 2), np.float32), np.diag([1.5, 1.5, 1.5, 1])), two_channels)
    out = tmp_path / "out"
    proc = bundle_run("meduet_seg", "inference", "--bundle_root", str(seg_trained), "--output_dir", str(out),
                      "--input_data", f"[{{'image': '{two_channels}'}}]", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("MeduetInputError: ") and "two_channels.nii.gz" in last and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("flip,expect_flipped", [(None, False), (1.0, True)])
def test_training_crops_keep_the_side_of_the_body_unless_flips_are_set(tmp_path, flip, expect_flipped):
    """train.yaml's crops are not flipped or turned by default (labels told apart by their side would swap); with
    flip_prob set they are. A ramp along x tells which way each crop faces."""
    from monai.bundle import ConfigParser

    ramp = np.broadcast_to(np.linspace(-150.0, 200.0, 24, dtype=np.float32)[:, None, None], (24, 20, 22)).copy()
    lab = (ramp > 0).astype(np.uint8)
    for name, arr in (("img", ramp), ("lab", lab)):
        nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 1.5, 1.0])), str(tmp_path / f"{name}.nii.gz"))
    cfgs = REPO / "bundles" / "meduet_seg" / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfgs / "train.yaml"), str(cfgs / "presets" / "tiny.yaml")])
    parser["preprocessing"] = {"modality": "CT", "spacing": None, "crop_foreground": False, "pad_multiple": None}
    parser["roi_size"], parser["crops_per_volume"] = [16, 16, 16], 4
    if flip is not None:
        parser["flip_prob"] = flip
    chain = parser.get_parsed_content("train#preprocessing", instantiate=True)
    chain.set_random_state(seed=0)
    for _ in range(3):
        for crop in chain({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}):
            x = crop["image"][0].numpy()
            profile = x.mean(axis=(1, 2))
            assert np.ptp(x.mean(axis=0)) < 1e-5, "the ramp must stay along x (no 90-degree turn)"
            assert (np.diff(profile) < 0).all() == expect_flipped and (np.diff(profile) > 0).all() != expect_flipped
            assert torch.equal(crop["label"][0] > 0, crop["image"][0] > (0 + 175) / 425)  # label moved with it
