"""Wrong-type command-line overrides of the train and inference configs (``--batch_size abc``, ``--roi_size abc``)
are one line naming the key, raised by the configs' ``key_check`` before any component is built; every shipped
config and preset passes its own check."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from meduet.errors import MeduetConfigError, find_meduet_error
from meduet.workflows.config import KEY_KINDS, check_keys

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted(glob.glob(str(REPO / "bundles/*/configs/train*.yaml"))
                     + glob.glob(str(REPO / "bundles/*/configs/inference.json")))
PRESETS = (None, "tiny", "demo", "paper")  # None: the base config alone
# overlays merged on top of their bundle's train.yaml (multi-GPU, the MAE baseline, LDAE, ControlNet): their run
# lists replace train.yaml's and must start with the key check too
OVERLAYS = sorted(p for name in ("multi_gpu_train.yaml", "mae_baseline.yaml", "ldae.yaml", "controlnet_train.yaml")
                  for p in glob.glob(str(REPO / "bundles/*/configs" / name)))


def _parser(config: str, preset: str | None = None, overlay: str | None = None) -> ConfigParser:
    files = [config] + ([overlay] if overlay else [])
    files += [str(Path(config).parent / "presets" / f"{preset}.yaml")] if preset else []
    parser = ConfigParser()
    parser.read_config(files)
    return parser


def _run_lists(parser: ConfigParser) -> dict[str, list]:
    return {k: parser[k] for k in ("training", "run") if isinstance(parser.get().get(k), list)}


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: "/".join(Path(p).parts[-3::2]))
def test_every_run_list_starts_with_the_key_check_of_every_checkable_key(config):
    parser = _parser(config)
    lists = _run_lists(parser)
    assert lists and all(steps[0] == "@key_check" for steps in lists.values()), lists
    checked = {part.split("=")[0].strip() for part in parser["key_check"].split("(", 1)[1].rstrip(")").split(",")}
    top_level = {k for k in parser.get() if k in KEY_KINDS}
    assert checked == top_level, (checked ^ top_level)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: "/".join(Path(p).parts[-3::2]))
def test_shipped_configs_and_presets_pass_their_key_check(config, preset):
    assert _parser(config, preset).get_parsed_content("key_check") is True


@pytest.mark.parametrize("preset", (None, "tiny"))
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: "/".join(Path(p).parts[-3::2]))
def test_overlays_keep_the_key_check_first_and_pass_it(overlay, preset):
    parser = _parser(str(Path(overlay).parent / "train.yaml"), preset, overlay)
    lists = _run_lists(parser)
    if isinstance(parser.get().get("run"), str):  # run: '@training'
        assert parser.get()["run"] == "@training"
    assert lists and all(steps[0] == "@key_check" for steps in lists.values()), (overlay, lists)
    assert parser.get_parsed_content("key_check") is True


@pytest.mark.parametrize("key,bad", [("batch_size", "abc"), ("roi_size", "abc"), ("roi_size", [64, 64]),
                                     ("learning_rate", -1.0), ("max_epochs", 0), ("resume", "false")])
def test_a_wrong_override_is_one_line_naming_the_key(key, bad):
    configs = [c for c in RUN_CONFIGS if key in _parser(c).get()]
    assert configs, key
    for config in configs:
        parser = _parser(config, "tiny")
        parser[key] = bad
        with pytest.raises(Exception) as info:
            parser.get_parsed_content("key_check")
        err = find_meduet_error(info.value)
        assert isinstance(err, MeduetConfigError), (config, info.value)
        assert f"'{key}' must be" in str(err) and f"--{key}" in str(err) and "\n" not in str(err)


def test_check_keys_kinds():
    assert check_keys(roi_size=32, crop_size=[24, 24, 24], patch_size=None, seed=None, flip_prob=0.5, num_workers=0)
    for key, value in [("roi_size", [24, 24, 0]), ("flip_prob", 1.5), ("num_workers", -1), ("amp", 1),
                       ("grad_clip", float("nan")), ("batch_size", 2.0), ("batch_size", True)]:
        with pytest.raises(MeduetConfigError, match=f"'{key}' must be"):
            check_keys(**{key: value})
    with pytest.raises(KeyError):
        check_keys(not_a_checked_key=1)
