"""The paper preset's two weight files (MAISI's autoencoder, the perceptual network) are required, not silently off:
a one-line error names the keys, `allow_missing_paper_weights: True` opts out with a one-line warning; the
perceptual term is built from local weights only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import bundle_run
from meduet.engines.vae import MedicalNetPerceptualLoss, build_perceptual_loss, check_paper_weights
from meduet.errors import MeduetConfigError, find_meduet_error

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "meduet_vae" / "configs"


def _config(*presets: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([CONFIGS / "train.yaml", *(CONFIGS / "presets" / f"{p}.yaml" for p in presets)])
    return parser


def _medicalnet_file(path: Path) -> torch.nn.Module:
    """A locally made file in MedicalNet's format ({"state_dict": {"module.<key>": tensor}}) of a random resnet10."""
    from monai.networks import nets
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias, shortcut = get_medicalnet_pretrained_resnet_args(10)
    torch.manual_seed(0)
    net = nets.resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
                        bias_downsample=bias)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net.eval()


def _parse_error(parser: ConfigParser, key: str) -> str:
    """The MeduetConfigError MONAI's expression evaluation wraps (the bundle run's excepthook prints that one)."""
    with pytest.raises(Exception) as err:
        parser.get_parsed_content(key)
    found = find_meduet_error(err.value)
    assert isinstance(found, MeduetConfigError), err.value
    return str(found)


def test_paper_preset_without_weights_is_a_one_line_error_naming_the_keys():
    msg = _parse_error(_config("paper"), "paper_check")
    assert "\n" not in msg
    for key in ("pretrained_ckpt", "perceptual_weights", "allow_missing_paper_weights: True", "docs/README.md",
                "Using MAISI's pretrained CT autoencoder", "The perceptual term from local weights"):
        assert key in msg, key
    # one of the two given: the error names only the other
    parser = _config("paper")
    parser["pretrained_ckpt"] = "/somewhere/autoencoder_epoch273.pt"
    msg = _parse_error(parser, "paper_check")
    assert "perceptual_weights" in msg and "set pretrained_ckpt" not in msg


def test_opt_out_warns_once_naming_what_is_not_the_paper(caplog):
    parser = _config("paper")
    parser["allow_missing_paper_weights"] = True
    with caplog.at_level(logging.WARNING, logger="meduet.engines.vae"):
        assert parser.get_parsed_content("paper_check") is False
    lines = [r.getMessage() for r in caplog.records if r.name == "meduet.engines.vae"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "not the paper" in lines[0] and "random initial weights" in lines[0] and "no perceptual term" in lines[0]


def test_the_cpu_presets_and_the_base_config_do_not_require_the_files():
    for presets in ((), ("tiny",), ("demo",)):
        parser = _config(*presets)
        assert parser.get_parsed_content("paper_weights_required") is False
        assert parser.get_parsed_content("paper_check") is False  # not the paper's weights, and no error
        assert parser.get_parsed_content("perceptual_loss") is None  # default off: nothing built, nothing fetched
    assert check_paper_weights(True, False, "a.pt", "hub_dir") is True


def test_paper_preset_training_stops_before_anything_is_written(tmp_path, tiny_data):
    """A bounded run: train.yaml + tiny + paper_weights_required (the paper preset's key) stops with the one-line
    error before training; with the opt-out it trains (1 epoch) and logs the warning."""
    args = ["--bundle_root", str(tmp_path), "--dataset_dir", str(tiny_data / "phantoms"), "--max_epochs", "1",
            "--paper_weights_required", "True"]
    proc = bundle_run("meduet_vae", "train", *args, run_id="training", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("MeduetConfigError: ") and "allow_missing_paper_weights" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "model.pt").exists()
    proc = bundle_run("meduet_vae", "train", *args, "--allow_missing_paper_weights", "True", run_id="training")
    assert "allow_missing_paper_weights: not the paper" in proc.stderr + proc.stdout
    assert (tmp_path / "models" / "model.pt").exists()


def test_medicalnet_perceptual_loss_from_a_local_file(tmp_path):
    path = tmp_path / "resnet_10_23dataset.pth"
    ref = _medicalnet_file(path)
    loss = build_perceptual_loss(str(path), "medicalnet")
    assert isinstance(loss, MedicalNetPerceptualLoss)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32, 32, generator=g), torch.rand(2, 1, 32, 32, 32, generator=g)
    assert float(loss(a, a)) == 0.0
    # the file's weights, as MONAI's MedicalNet perceptual similarity computes the distance
    def feats(x):
        x = (x - x.mean((2, 3, 4), keepdim=True)) / x.std((2, 3, 4), keepdim=True)
        x = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.act(ref.bn1(ref.conv1(x))))))))
        return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    with torch.no_grad():
        expected = (feats(a) - feats(b)).pow(2).mean((2, 3, 4)).sum(1).mean()
    a.requires_grad_(True)
    value = loss(a, b)
    assert torch.allclose(value, expected, atol=1e-5) and float(value) > 0
    value.backward()  # the reconstruction gets a gradient, the perceptual network none
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


def test_perceptual_errors_are_one_line(tmp_path):
    assert build_perceptual_loss(None) is None
    with pytest.raises(MeduetConfigError) as err:
        build_perceptual_loss(str(tmp_path), "squeeze")  # no SqueezeNet file under checkpoints/
    assert "\n" not in str(err.value) and "squeezenet1_1" in str(err.value) and "docs/README.md" in str(err.value)
    with pytest.raises(MeduetConfigError, match="perceptual_network"):
        build_perceptual_loss(str(tmp_path), "vgg")
    with pytest.raises(MeduetConfigError, match="weights_path|does not exist|MedicalNet"):
        build_perceptual_loss(str(tmp_path / "absent.pth"), "medicalnet")
