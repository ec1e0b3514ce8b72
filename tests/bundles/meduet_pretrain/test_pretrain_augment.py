"""Appearance-augmented pairs for meduet_pretrain's optional ``aug_content`` term: meduet_vae's encode.yaml caches
augmented copies of the training latents, the pretraining chain crops a latent and one of its copies alike, and
the loss compares the student's content with the teacher's content of the copy."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bundle_run
from meduet.data import get_appearance_augment
from meduet.engines.ema import EMATeacher
from meduet import records
from meduet.data.latents import pretrain_transforms
from meduet.latent import LatentSpace, load_latent, read_items
from meduet.errors import MeduetInputError
from meduet.losses.meduet import aug_content_loss
from meduet.losses.meduet_step import meduet_step_losses
from meduet.networks.encoder import PRETRAIN_KINDS, PretrainedEncoder
from meduet.networks.meduet import build_meduet
from meduet.networks.meduet_extras import MeduetExtras
from meduet.networks.windows import encode_latents


def load_pretrain(path):
    return records.load(path, expect=PRETRAIN_KINDS)


def load_encoder(path):
    return records.load_part(path, PretrainedEncoder)


def test_appearance_augment_changes_intensities_only_within_range_and_reproducibly():
    g = torch.Generator().manual_seed(0)
    img = F.avg_pool3d(torch.rand(1, 1, 24, 24, 24, generator=g), 5, stride=1, padding=2)[0]
    assert torch.equal(get_appearance_augment(0.0)(img), img)  # strength 0: identity
    aug = get_appearance_augment(1.0)
    outs = []
    for seed in (3, 3, 4):
        aug.set_random_state(seed=seed)
        outs.append(torch.as_tensor(aug(img.clone())))
    assert outs[0].shape == img.shape and 0.0 <= float(outs[0].min()) and float(outs[0].max()) <= 1.0
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])  # seeded
    assert (outs[0] - img).abs().mean() > 0.01  # it does change the appearance


def _write(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.moveaxis(arr, 0, -1).astype(np.float32), np.diag([6.0, 6.0, 6.0, 1.0])), path)
    return str(path)


def test_pairs_are_the_same_crop_flip_and_rotation(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 10, 11, 12)).astype(np.float32)
    item = {"latent": _write(tmp_path / "a.nii.gz", z),
            "latent_aug": [_write(tmp_path / "a_aug0.nii.gz", z + 5.0), _write(tmp_path / "a_aug1.nii.gz", z - 3.0)],
            "domain_index": 0}
    chain = pretrain_transforms([4, 4, 4], crops_per_latent=6, augmented_pairs=True)
    chain.set_random_state(seed=1)
    offsets = set()
    for _ in range(8):
        for crop in chain(dict(item)):
            assert crop["latent"].shape == crop["latent_aug"].shape == (4, 4, 4, 4)
            diff = (crop["latent_aug"] - crop["latent"]).as_tensor()
            offset = float(diff.mean())
            # the same voxels, however the crop was placed, flipped and turned: only the copy's offset differs
            torch.testing.assert_close(diff, torch.full_like(diff, offset), atol=1e-4, rtol=0)
            offsets.add(round(offset))
    assert offsets == {5, -3}  # both copies get picked
    # an item without copies is paired with itself
    lone = pretrain_transforms([4, 4, 4], 2, augmented_pairs=True)({"latent": item["latent"]})
    assert all(torch.equal(c["latent"].as_tensor(), c["latent_aug"].as_tensor()) for c in lone)
    # a listed copy that is missing is a one-line error naming it
    gone = {**item, "latent_aug": [str(tmp_path / "gone.nii.gz")]}
    with pytest.raises(MeduetInputError, match="gone.nii.gz"):
        pretrain_transforms([4, 4, 4], 1, augmented_pairs=True)(gone)


def test_aug_content_term_uses_the_teachers_content_of_the_copy():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    teacher = EMATeacher(model)
    x = torch.randn(4, 4, 8, 8, 8)
    x_aug = 0.5 * x + 0.3
    dom = torch.tensor([0, 1, 1, 2])
    mask = torch.rand(2, 64).argsort(1) < 32
    cfg = {"use_mftd": False, "use_siqc": False, "w_aug_content": 2.0}
    torch.manual_seed(1)
    losses = meduet_step_losses(model, teacher, x, dom, 0, cfg, mix_mask=mask, x_aug=x_aug)
    torch.manual_seed(1)
    out = model(x, mask, streams=2, reencode=0)
    expect = aug_content_loss(out["content_tokens"], teacher.encode(x_aug)["content_tokens"], out["visible"])
    torch.testing.assert_close(losses["aug_content"], expect)
    assert float(expect) > 0
    # it is in the total with its weight, and it trains the encoder
    without = meduet_step_losses(model, teacher, x, dom, 0, {**cfg, "w_aug_content": 0.0}, mix_mask=mask)
    assert "aug_content" not in without
    model.zero_grad()
    losses["aug_content"].backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x_aug"):
        meduet_step_losses(model, teacher, x, dom, 0, cfg, mix_mask=mask)
    # with MFTD/SiQC on, one teacher call serves both the plain and the augmented batch
    full = meduet_step_losses(model, teacher, x, dom, 0, {"mftd_start_step": 0, "w_aug_content": 1.0},
                              mix_mask=mask, x_aug=x_aug)
    assert {"aug_content", "mftd", "siqc"} <= set(full) and torch.isfinite(full["loss"])


def test_encode_caches_copies_and_pretraining_uses_them(tiny_vae, tiny_data, tmp_path):
    out = tmp_path / "latents"
    bundle_run("meduet_vae", "encode", "--bundle_root", str(tiny_vae), "--dataset_dir", str(tiny_data / "phantoms"),
               "--latent_dir", str(out), "--splits", "['training','test']", "--augment_copies", "2")
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["augmentation"]["copies"] == 2 and dl["augmentation"]["splits"] == ["training"]
    assert all("latent_aug" not in it for it in dl["test"])
    items = read_items(str(out / "datalist.json"), "training")
    for it in items:
        z = np.asarray(nib.load(it["latent"]).dataobj)
        copies = [np.asarray(nib.load(p).dataobj) for p in it["latent_aug"]]
        assert len(copies) == 2 and all(c.shape == z.shape for c in copies)
        assert all(np.abs(c - z).mean() > 1e-3 for c in copies) and np.abs(copies[0] - copies[1]).mean() > 1e-3
    root = tmp_path / "pretrain"
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(out / "datalist.json"),
               "--loss#w_aug_content", "1.0", "--content_eraser#enabled", "True", run_id="training")
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # the content eraser's appearance part was fitted on the copies: the directions in which the (site-erased)
    # pooled content follows them are gone, so the copies move the content far less than the head alone
    model = load_pretrain(root / "models" / "model.pt")
    er = model.meta["content_eraser"]
    assert er["appearance_copies"] == 2 * len(items) and 1 <= er["appearance_dims"] <= 8
    scale = LatentSpace.from_record(dl)
    orig = [load_latent(it["latent"]) for it in items for _ in it["latent_aug"]]
    copies = [load_latent(p) for it in items for p in it["latent_aug"]]

    def moves():
        a = np.stack([e["content"].numpy() for e in encode_latents(model, orig, scale)])
        b = np.stack([e["content"].numpy() for e in encode_latents(model, copies, scale)])
        return np.linalg.norm(b - a, axis=1)

    erased = moves()
    model.backbone.factors.eraser.set(None, None)
    raw = moves()
    assert erased.mean() < 0.8 * raw.mean()


def test_unlabeled_pretraining_pool_is_encoded_pretrained_on_and_erased_with(tiny_vae, tmp_path):
    from meduet.data.sample import main as sample_main

    data = tmp_path / "data"
    assert sample_main(["--out", str(data), "--size", "32", "--subjects", "8", "--sites", "4", "--no-brain",
                        "--pretrain-subjects", "6"]) == 0
    out = tmp_path / "latents"
    bundle_run("meduet_vae", "encode", "--bundle_root", str(tiny_vae), "--dataset_dir", str(data / "phantoms"),
               "--latent_dir", str(out))
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["pretraining"]) == 6 and all("label" not in it for it in dl["pretraining"])
    n_train = len(dl["training"])
    root = tmp_path / "pretrain"
    # labelled training items and unlabeled pool items share batches (tiny: 4 latents a batch, drop_last)
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(out / "datalist.json"),
               "--content_eraser#enabled", "True", run_id="training")
    ckpt = torch.load(root / "models" / "checkpoint.pt", weights_only=True)
    assert ckpt["engine"]["iteration"] == 2 * ((n_train + 6) // 4)  # 2 epochs over training + pool
    er = load_pretrain(root / "models" / "model.pt").meta["content_eraser"]
    assert er["splits"] == ["training", "validation", "pretraining"]
    assert er["cases"] == n_train + len(dl["validation"]) + 6 and er["appearance_copies"] == 0
    # --extra_train_splits [] pretrains on the training split alone
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(tmp_path / "only"), "--latent_datalist",
               str(out / "datalist.json"), "--extra_train_splits", "[]", run_id="training")
    ckpt = torch.load(tmp_path / "only" / "models" / "checkpoint.pt", weights_only=True)
    assert ckpt["engine"]["iteration"] == 2 * (n_train // 4)
    # the site eraser is an option (not in the paper): off by default, the content head stays as trained
    enc = load_pretrain(tmp_path / "only" / "models" / "model.pt")
    assert "content_eraser" not in enc.meta and not bool(enc.backbone.factors.eraser.fitted)


def test_synthetic_site_repaints_every_tissue_on_its_own_and_keeps_the_air():
    from meduet.data import SyntheticSiteAugment
    from meduet.errors import MeduetConfigError

    # four tissues of known intensity, the darkest (0.05) being the background
    regions = torch.zeros(24, 24, 24, dtype=torch.long)
    regions[4:20, 4:20, 4:20] = 1
    regions[6:12, 6:18, 6:18] = 2
    regions[14:18, 8:16, 8:16] = 3
    img = torch.tensor([0.05, 0.3, 0.55, 0.8])[regions][None]
    exact = SyntheticSiteAugment(num_tissues=4, smooth_sigma=0.0, blur_sigma=(0, 0), scale=(1, 1), noise_std=(0, 0))
    lab, centres = exact.tissue_classes(img[0].numpy())
    np.testing.assert_array_equal(lab, regions.numpy())  # the classes are the tissues, darkest first
    np.testing.assert_allclose(centres, [0.05, 0.3, 0.55, 0.8], atol=1e-6)
    orders = set()
    for seed in range(12):
        exact.set_random_state(seed)
        out = exact(img)
        assert out.shape == img.shape and out.dtype == torch.float32
        values = [torch.unique(out[0][regions == r]) for r in range(4)]
        assert all(len(v) == 1 for v in values)  # each tissue is one new value: the anatomy is kept exactly
        assert abs(float(values[0]) - 0.05) < 1e-6  # the air stays where it was
        assert all(0.1 <= float(v) <= 0.95 for v in values[1:])
        orders.add(tuple(np.argsort([float(v) for v in values[1:]])))
    assert len(orders) > 2  # unlike a monotone curve, the tissues' order of brightness changes
    # the default (blur, scale, noise) is seeded and stays in [0, 1]
    aug = SyntheticSiteAugment(num_tissues=4)
    aug.set_random_state(7)
    a = aug(img)
    aug.set_random_state(7)
    assert torch.equal(a, aug(img)) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    with pytest.raises(MeduetInputError, match=r"\(C, X, Y, Z\)"):
        aug(img[0])
    with pytest.raises(MeduetConfigError, match="num_tissues"):
        SyntheticSiteAugment(num_tissues=1)


def test_cross_appearance_decodes_own_content_with_the_copys_style():
    from meduet.losses.meduet import dual_reconstruction_loss, patch_targets

    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    x = torch.randn(4, 4, 8, 8, 8)
    x_aug = torch.randn(4, 4, 8, 8, 8)
    dom = torch.tensor([0, 1, 1, 2])
    mask = torch.rand(2, 64).argsort(1) < 32
    cfg = {"use_mftd": False, "use_siqc": False, "w_cross_appearance": 3.0}
    losses = meduet_step_losses(model, None, x, dom, 0, cfg, mix_mask=mask, x_aug=x_aug)
    # the same term by hand: content tokens of the mixed forward + the pooled style of the copy -> the copy
    out = model(x, mask, streams=2, reencode=0)
    style = model.encode(x_aug)["style"][:, None, : model.style_dim]
    grid = tuple(s // model.patch_size for s in x.shape[2:])
    pred = model.decoder(model.recombine(torch.cat([out["content_tokens"]] * 2), style), out["visible"], grid)
    expect = dual_reconstruction_loss(pred, patch_targets(x_aug, model.patch_size), mask, "hidden")
    torch.testing.assert_close(losses["cross_appearance"], expect)
    plain = meduet_step_losses(model, None, x, dom, 0, {**cfg, "w_cross_appearance": 0.0}, mix_mask=mask)
    assert "cross_appearance" not in plain
    torch.testing.assert_close(losses["loss"], plain["loss"] + 3.0 * expect)
    # it trains the style head (through the copy), the content path and the decoder
    model.zero_grad()
    losses["cross_appearance"].backward()
    for p in (model.factors.style.weight, model.encoder.patch_embed.weight, model.decoder.pred.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # another copy (another appearance) gives another rendering of the same content
    a = model(x, mask, streams=0, extras=MeduetExtras(x_cross=x_aug))["pred_cross"]
    b = model(x, mask, streams=0, extras=MeduetExtras(x_cross=2.0 * x_aug + 1.0))["pred_cross"]
    assert (a - b).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="x_aug"):
        meduet_step_losses(model, None, x, dom, 0, cfg, mix_mask=mask)


def test_synthetic_site_copies_feed_the_cross_appearance_term(tiny_vae, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "latents"
    bundle_run("meduet_vae", "encode", "--bundle_root", str(tiny_vae), "--dataset_dir", str(tiny_data / "phantoms"),
               "--latent_dir", str(out), "--splits", "['training']", "--augment_copies", "1",
               "--augment_kind", "synthetic_site")
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["augmentation"]["kind"] == "synthetic_site"
    for it in read_items(str(out / "datalist.json"), "training"):
        (copy,) = it["latent_aug"]
        assert np.abs(np.asarray(nib.load(copy).dataobj) - np.asarray(nib.load(it["latent"]).dataobj)).mean() > 1e-3
    root = tmp_path / "pretrain"
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(out / "datalist.json"),
               "--loss#w_cross_appearance", "1.0", "--output_dir", str(root / "tb"), run_id="training")
    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.endswith("cross_appearance")]
    assert tags, events.Tags()["scalars"]
    values = [e.value for e in events.Scalars(tags[0])]
    assert values and all(np.isfinite(values)) and min(values) > 0
    # the checkpoint records how it was pretrained: the loss and the kind of copies
    meta = load_pretrain(root / "models" / "model.pt").meta
    assert meta["loss"]["w_cross_appearance"] == 1.0 and meta["augmentation"]["kind"] == "synthetic_site"
    proc = bundle_run("meduet_vae", "encode", "--bundle_root", str(tiny_vae), "--dataset_dir",
                      str(tiny_data / "phantoms"), "--latent_dir", str(tmp_path / "bad"), "--augment_copies", "1",
                      "--augment_kind", "tissue", check=False)
    assert proc.returncode != 0 and "augment_kind must be one of" in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "datalist.json").exists()
