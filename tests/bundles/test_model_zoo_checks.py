"""The MONAI model zoo's bundle checks that run offline on CPU (``meduet.deploy.zoo``: the zoo's ``verify_bundle.py``
steps and its unit-test pattern, our own code) on the four bundles as they are shipped: trained at the tiny preset,
packaged with it merged, unzipped side by side."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from meduet.deploy import zoo
from meduet.deploy.package import BUNDLES, package_bundle


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_vae, tiny_pretrain, sit_factors, seg_trained, recon_trained) -> Path:
    """The five tiny-trained bundles packaged with the tiny preset and unzipped into one folder."""
    dist, root = tmp_path_factory.mktemp("zoo_dist"), tmp_path_factory.mktemp("zoo_bundles")
    models = {"meduet_vae": tiny_vae, "meduet_pretrain": tiny_pretrain, "meduet_diffusion": sit_factors,
              "meduet_seg": seg_trained, "meduet_recon": recon_trained}
    for name in BUNDLES:
        with zipfile.ZipFile(package_bundle(REPO / "bundles" / name, dist, preset="tiny",
                                            models=models[name] / "models")) as zf:
            zf.extractall(root)
    return root


def _data(bundle: str, tiny_data: Path, tiny_latents: Path) -> str:
    return str(tiny_latents.parent if bundle in ("meduet_pretrain", "meduet_diffusion") else tiny_data / "phantoms")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_zoo_checks_pass_or_are_documented_opt_outs(bundle, shipped, tiny_data, tiny_latents, tmp_path):
    b = shipped / bundle
    meta = json.loads((b / "configs/metadata.json").read_text())
    # 1-2: necessary files (in the zip), version in the changelog
    assert zoo.check_files(b) == []
    zoo.check_version(meta)
    # 3: verify_net_in_out on the shipped (preset-merged) network, and on the repository's paper-sized config
    zoo.check_net_in_out(b)
    zoo.check_net_in_out(REPO / "bundles" / bundle)
    # 4: TorchScript ckpt_export, or an opt-out the bundle documents (the zoo's exclude list + docs statement)
    opt_out = zoo.torchscript_opt_out(b)
    if opt_out is None:
        assert zoo.check_torchscript(b, tmp_path / "model.ts") is None
    else:
        assert "TorchScript" in opt_out and "exclude_verify_torchscript_list" in opt_out
    # 5: the zoo's unit-test pattern: initialise and check the properties of the train and infer workflows
    data = {"dataset_dir": _data(bundle, tiny_data, tiny_latents)}
    assert not zoo.check_workflow(b, "train", **data)
    assert not zoo.check_workflow(b, "infer", **data)


def test_packaged_metadata_describes_the_packaged_network(shipped):
    """Packaging with a preset rewrites outputs.pred.num_channels to what the preset's network gives (pretrain:
    tiny content + style = 32 + 8, the repository's paper-sized metadata says 768 + 192)."""
    shipped_meta = json.loads((shipped / "meduet_pretrain/configs/metadata.json").read_text())
    repo_meta = json.loads((REPO / "bundles/meduet_pretrain/configs/metadata.json").read_text())
    assert repo_meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 960
    assert shipped_meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 40
    assert zoo.extra_forward_args(json.loads((shipped / "meduet_diffusion/configs/metadata.json").read_text())) == {
        "t": 500.0}
