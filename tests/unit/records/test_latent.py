"""meduet.latent: the latent space (scale / unscale) and latent datalists, the one place that owns both."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.latent import (ENCODE_HINT, LatentDatalist, LatentSpace, latent_affine, latent_record, load_latent,
                           save_latent)
from meduet.networks.vae import MAISI_CT_ARCHITECTURE, build_vae


def test_scale_and_unscale_are_the_factor_and_its_inverse():
    space = LatentSpace(0.8)
    z = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    scaled = space.scale(z)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, z.float() * 0.8)
    torch.testing.assert_close(space.unscale(scaled), z.float())
    meta = space.scale(MetaTensor(torch.ones(1, 2, 2, 2), affine=torch.eye(4) * 2))
    assert isinstance(meta, MetaTensor) and float(meta.affine[0, 0]) == 2.0 and float(meta.max()) == pytest.approx(0.8)


def test_space_from_its_carriers_and_the_same_vae_check():
    vae = build_vae(dict(MAISI_CT_ARCHITECTURE, num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], norm_num_groups=4))
    vae.meta.update(LatentSpace.measured(2.0), config_hash="abc")
    space = LatentSpace.from_vae(vae)
    assert space == LatentSpace(0.5, 4, 4, "abc")
    assert vae.meta["latent_std"] == 2.0
    record = latent_record({**space.facts(), "domains": ["a"], "other": 1}, crop_size=(8, 8, 8))
    assert record == {"latent_scale_factor": 0.5, "latent_channels": 4, "downsample_factor": 4,
                      "vae_config_hash": "abc", "domains": ["a"], "crop_size": [8, 8, 8]}
    assert LatentSpace.from_record(record) == space
    space.check_same(LatentSpace(0.5), "a.pt", "b.json")  # unknown facts are not compared
    with pytest.raises(MeduetConfigError, match="'a.pt' has vae_config_hash='abc' but 'b.json' has "
                                                "vae_config_hash='xyz'"):
        space.check_same(LatentSpace(0.5, vae_config_hash="xyz"), "a.pt", "b.json")
    with pytest.raises(MeduetConfigError, match="has no latent_scale_factor"):
        LatentSpace.from_record({"domains": ["a"]}, "some record")


def test_latent_files_round_trip_on_the_coarser_grid(tmp_path):
    z = np.random.default_rng(0).normal(size=(4, 3, 5, 6)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    save_latent(tmp_path / "z.nii.gz", z, affine, 4)
    np.testing.assert_array_equal(load_latent(tmp_path / "z.nii.gz").numpy(), z)
    lat = nib.load(tmp_path / "z.nii.gz").affine
    np.testing.assert_allclose(lat, latent_affine(affine, 4))
    # latent voxel 0 sits at the centre of image voxels 0..3: 1.5 image voxels from the image origin
    np.testing.assert_allclose(lat[:3, 3], [10.0 + 1.5 * 1.5, -4.0 + 1.5 * 1.5, 3.0 + 1.5 * 2.0])
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "3d.nii.gz")
    with pytest.raises(MeduetConfigError, match="not 4D"):
        load_latent(tmp_path / "3d.nii.gz")


def _datalist(tmp_path, **top):
    (tmp_path / "latents").mkdir(exist_ok=True)
    for name in ("a", "b", "c", "a_aug0"):
        save_latent(tmp_path / "latents" / f"{name}.nii.gz", np.zeros((4, 2, 2, 2), np.float32), np.eye(4), 4)
    data = {"latent_channels": 4, "downsample_factor": 4, "latent_scale_factor": 0.5, "domains": ["s0", "s1"],
            "training": [{"latent": "latents/a.nii.gz", "domain": "s1", "latent_aug": ["latents/a_aug0.nii.gz"]}],
            "test": [{"latent": "latents/b.nii.gz", "domain": "s0"}],
            "pretraining": [{"latent": "latents/c.nii.gz", "domain": "s0"}], **top}
    path = LatentDatalist.write(tmp_path / "datalist.json", data)
    return path


def test_latent_datalist_items_and_errors(tmp_path):
    path = _datalist(tmp_path)
    dl = LatentDatalist(path)
    assert dl.domains == ["s0", "s1"] and dl.space == LatentSpace(0.5, 4, 4) and "test" in dl
    (a,) = dl.items("training")
    assert a["latent"] == str(tmp_path / "latents" / "a.nii.gz") and a["domain_index"] == 1
    assert a["latent_aug"] == [str(tmp_path / "latents" / "a_aug0.nii.gz")]
    assert [it["latent"].rsplit("/", 1)[1] for it in dl.items("training", ["pretraining", "missing"])] == [
        "a.nii.gz", "c.nii.gz"]
    with pytest.raises(MeduetInputError, match="has no split 'validation'"):
        dl.items("validation")
    with pytest.raises(MeduetConfigError) as err:
        LatentDatalist(tmp_path / "nope.json")
    assert "does not exist" in str(err.value) and ENCODE_HINT in str(err.value) and "bundles/" not in str(err.value)
    raw = json.loads((tmp_path / "datalist.json").read_text())
    raw["test"][0]["domain"] = "s9"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(MeduetInputError, match=r"item 0 of 'test': domain 's9' not in \['s0', 's1'\]"):
        LatentDatalist(tmp_path / "bad.json").items("test")
    raw["domains"] = []
    (tmp_path / "nodomains.json").write_text(json.dumps(raw))
    with pytest.raises(MeduetInputError, match="'domains' must be a non-empty list"):
        LatentDatalist(tmp_path / "nodomains.json")
    (tmp_path / "image_datalist.json").write_text(json.dumps({"domains": ["s0"], "training": []}))
    with pytest.raises(MeduetInputError, match="not a latent datalist"):
        LatentDatalist(tmp_path / "image_datalist.json")
    with pytest.raises(MeduetConfigError, match="lacks"):
        LatentDatalist.write(tmp_path / "x.json", {"domains": ["s0"]})
    (tmp_path / "latents" / "b.nii.gz").unlink()
    with pytest.raises(MeduetInputError, match="latent file .* does not exist"):
        dl.items("test")
