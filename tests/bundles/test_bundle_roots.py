"""--bundle_root moves everything a bundle reads of its own or its chained bundles' files: the configs name the
chained bundles (meduet_vae, meduet_pretrain) only through ``siblings``, the folder that holds ``bundle_root``
(the layout of the repository's ``bundles/`` and of ``monai.bundle download --bundle_dir models``)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in glob.glob(str(REPO / "bundles/*/configs/*.*")) if p.endswith((".yaml", ".json"))
                 and "multi_gpu" not in p and "mae_baseline" not in p and "logging" not in p and "metadata" not in p)


#: overlays users merge on top of another config of the bundle: parsed merged on it
OVERLAY_BASE = {"controlnet_train.yaml": "train.yaml"}


def _keys_using_siblings(parser: ConfigParser) -> list[str]:
    return [k for k, v in parser.get().items() if isinstance(v, str) and "@siblings" in v]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: "/".join(Path(p).parts[-3::2]))
def test_chained_bundle_files_follow_bundle_root(config, tmp_path):
    raw = Path(config).read_text()
    body = [ln for ln in raw.splitlines() if not ln.lstrip().startswith("#") and "bundle_root" not in ln]
    # no path into the repository's bundles/ folder besides the bundle_root default
    assert not any("bundles/meduet_" in ln.split("#")[0] for ln in body), config
    parser = ConfigParser()
    base = OVERLAY_BASE.get(Path(config).name)
    parser.read_config([str(Path(config).with_name(base)), config] if base else config)
    keys = _keys_using_siblings(parser)
    if not keys:
        return
    root = tmp_path / "models" / Path(config).parts[-3]
    parser["bundle_root"] = str(root)
    if "init" in parser.get():
        parser["init"] = "meduet"
    for key in keys:
        value = parser.get_parsed_content(key)
        assert os.path.commonpath([str(value), str(tmp_path / "models")]) == str(tmp_path / "models"), (key, value)
        assert Path(value).parts[len((tmp_path / "models").parts)] in ("meduet_vae", "meduet_pretrain"), value
    # from inside a downloaded bundle's folder (bundle_root "."): the folder next to it
    parser["bundle_root"] = "."
    here = os.getcwd()
    try:
        root.mkdir(parents=True)
        os.chdir(root)
        for key in keys:
            value = os.path.realpath(parser.get_parsed_content(key))
            assert value.startswith(os.path.realpath(tmp_path / "models") + os.sep), (key, value)
    finally:
        os.chdir(here)
