"""Tests for meduet.data.controls (the ControlNet task inputs in image space) and the paired crop of a latent and
its control (get_train_crop_transforms on both keys)."""

from __future__ import annotations

import pytest
import torch

from meduet.data import get_train_crop_transforms
from meduet.data.controls import ControlTask, item_seed, label_control, num_label_classes
from meduet.errors import MeduetConfigError, MeduetInputError


def _phantom(n: int = 16) -> torch.Tensor:
    """(1, 1, n, n, n) in [0, 1]: an ellipsoid with a brighter ball."""
    c = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    img = 0.6 * ((x / 6) ** 2 + (y / 5) ** 2 + (z / 6) ** 2 <= 1).float()
    return (img + 0.4 * ((x - 1) ** 2 + y ** 2 + z ** 2 <= 6).float())[None, None]


@pytest.mark.parametrize("task,kw", [("mri", {}), ("mri", {"acceleration": 8}), ("ct", {}), ("ct", {"views": 30})])
def test_image_inputs_keep_the_shape_range_and_lose_detail(task, kw):
    x = _phantom()
    y = ControlTask(task, **kw).degrade(x, seed=1)
    assert y.shape == x.shape and y.dtype == torch.float32 and float(y.min()) >= 0 and float(y.max()) <= 1
    err = float((y - x).abs().mean())
    assert 1e-3 < err < 0.3  # degraded, yet the same object
    assert torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.6


def test_harder_settings_degrade_more_and_masks_follow_the_seed():
    x = _phantom()
    mri4, mri8 = ControlTask("mri"), ControlTask("mri", acceleration=8)
    assert float((mri8.degrade(x) - x).abs().mean()) > float((mri4.degrade(x) - x).abs().mean())
    ct60, ct30 = ControlTask("ct"), ControlTask("ct", views=30)
    assert float((ct30.degrade(x) - x).abs().mean()) > float((ct60.degrade(x) - x).abs().mean())
    assert torch.equal(mri4.degrade(x, seed=5), mri4.degrade(x, seed=5))
    assert not torch.equal(mri4.degrade(x, seed=5), mri4.degrade(x, seed=6))
    assert item_seed(0, "a.nii.gz") == item_seed(0, "a.nii.gz") != item_seed(0, "b.nii.gz")


def test_settings_record_and_tags():
    assert ControlTask("mri").settings() == {"task": "mri", "acceleration": 4.0, "center_fraction": 0.08,
                                             "pattern": "1d", "seed": 0}
    assert ControlTask("ct", views=30).settings() == {"task": "ct", "views": 30, "filter": "ramp"}
    assert ControlTask("label").settings() == {"task": "label"} and not ControlTask("label").is_image
    assert {ControlTask("mri").tag(), ControlTask("mri", acceleration=8).tag(), ControlTask("ct").tag()} == {
        "acc4_cf0.08_seed0", "acc8_cf0.08_seed0", "views60"}


@pytest.mark.parametrize("kw,words", [({"task": "pet"}, "control_task must be one of"),
                                      ({"task": "mri", "acceleration": 0.5}, "'acceleration' must be"),
                                      ({"task": "mri", "center_fraction": 1.0}, "'center_fraction' must be"),
                                      ({"task": "ct", "views": 2.5}, "'views' must be an integer"),
                                      ({"task": "ct", "views": True}, "'views' must be")])
def test_bad_settings_are_one_line(kw, words):
    with pytest.raises(MeduetConfigError) as info:
        ControlTask(**kw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_label_control_pools_one_hot_to_fractions_that_sum_to_one():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 5, (1, 16, 12, 8), generator=g).float()
    c = label_control(lab, 5, 4)
    assert c.shape == (5, 4, 3, 2) and c.dtype == torch.float32
    assert torch.allclose(c.sum(0), torch.ones(4, 3, 2))
    # block (0, 0, 0): the class counts of the first 4^3 voxels / 64
    counts = torch.bincount(lab[0, :4, :4, :4].long().flatten(), minlength=5).float() / 64
    assert torch.allclose(c[:, 0, 0, 0], counts)
    # sizes that are not multiples of the factor are edge-padded: still fractions
    c = label_control(lab[0, :10], 5, 4)
    assert c.shape == (5, 3, 3, 2) and torch.allclose(c.sum(0), torch.ones(3, 3, 2))
    with pytest.raises(MeduetInputError, match="outside the datalist's 3 labels"):
        label_control(lab, 3, 4)
    with pytest.raises(MeduetConfigError, match="'label' degrade|no image input"):
        ControlTask("label").degrade(_phantom())


def test_num_label_classes():
    assert num_label_classes({"0": "background", "1": "body", "4": "lesion"}) == 5
    assert num_label_classes(["bg", "a", "b"]) == 3
    with pytest.raises(MeduetConfigError, match="needs the latent datalist's 'labels'"):
        num_label_classes({})


def test_latent_and_control_get_the_same_random_crop_flips_and_rotation():
    """The paired crop: keys ['latent', 'control'] share every random draw, whatever their channel counts."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(4, 10, 9, 7, generator=g)
    control = torch.cat([latent * 2 + 1, latent[:1] - 3])  # 5 channels, each a function of the latent's
    chain = get_train_crop_transforms([6, 6, 6], keys=["latent", "control"], pad_mode="replicate",
                                      flip_prob=0.5, rot90_prob=0.5)
    seen = set()
    for seed in range(12):
        chain.set_random_state(seed=seed)
        out = chain({"latent": latent.clone(), "control": control.clone()})
        lat, con = torch.as_tensor(out["latent"]), torch.as_tensor(out["control"])
        assert lat.shape == (4, 6, 6, 6) and con.shape == (5, 6, 6, 6)
        assert torch.allclose(con[:4], lat * 2 + 1, atol=1e-6) and torch.allclose(con[4], lat[0] - 3, atol=1e-6)
        seen.add(tuple(lat[0, 0, 0, :2].tolist()))
    assert len(seen) > 3  # the crops did differ between seeds
