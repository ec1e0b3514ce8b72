"""meduet_diffusion's presets against the bundle's configs: every workflow config parses with every preset; the
`paper` preset switches off what the seeds do not describe (classifier-free guidance, the factor prior, the
v-prediction / zero-terminal-SNR options) and its configs still build; a bool key given as a string on the command
line is a one-line error before training starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from conftest import REPO, bundle_run
from meduet.engines.diffusion import FactorPriorFit
from meduet.losses.diffusion import DiffusionObjective

CFG = REPO / "bundles/meduet_diffusion/configs"
WORKFLOWS = ("train.yaml", "sample.yaml", "evaluate.yaml", "transfer.yaml", "inference.json")


def _parser(workflow: str, preset: str | None, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CFG / workflow)] + ([str(CFG / "presets" / f"{preset}.yaml")] if preset else []))
    for k, v in overrides.items():
        parser[k] = v
    return parser


@pytest.mark.filterwarnings("ignore:Can't merge entry")  # +prior in the workflows that have no prior: copied
@pytest.mark.parametrize("preset", [None, "tiny", "demo", "paper"])
def test_presets_and_what_the_paper_preset_switches_off(preset):
    paper = preset == "paper"
    for wf in WORKFLOWS:
        p = _parser(wf, preset)
        if "guidance_scale" in p.config:
            assert p["guidance_scale"] == (1.0 if paper else 1.5), wf
        if "source" in p.config:
            assert p["source"] == ("reference" if paper else "prior"), wf
    train = _parser("train.yaml", preset)
    assert train["cond_dropout"] == (0.0 if paper else 0.1)
    assert train["prior"]["enabled"] is (not paper)
    # v-prediction (not in the DiT paper) only in demo, where its header lists it; zero terminal SNR nowhere
    assert train["prediction_type"] == ("v_prediction" if preset == "demo" else "epsilon")
    assert train["zero_terminal_snr"] is False
    if preset == "demo":
        assert "prediction_type v_prediction" in (CFG / "presets/demo.yaml").read_text().split("model_preset:")[0]


@pytest.mark.filterwarnings("ignore:Can't merge entry")
def test_paper_preset_configs_build(tiny_latents, tiny_pretrain, tmp_path):
    """train.yaml + paper: the objective and the (disabled) factor prior build on a real latent cache and encoder,
    and fitting the prior writes nothing; sample/evaluate.yaml + paper build their typed configs (reference scans)."""
    dl, pre = str(tiny_latents), str(tiny_pretrain / "models/model.pt")
    train = _parser("train.yaml", "paper", latent_datalist=dl, pretrain_ckpt=pre, bundle_root=str(tmp_path),
                    device="cpu")
    obj = train.get_parsed_content("objective")
    assert isinstance(obj, DiffusionObjective) and obj.prediction_type == "epsilon" and not obj.zero_terminal_snr
    prior = train.get_parsed_content("prior")
    assert isinstance(prior, FactorPriorFit) and prior.fit() is None
    assert not (tmp_path / "models" / "factor_prior.pt").exists()
    sample = _parser("sample.yaml", "paper", latent_datalist=dl).get_parsed_content("sample")
    assert sample.source == "reference" and sample.guidance_scale == 1.0 and sample.reference_split == "test"
    ev = _parser("evaluate.yaml", "paper", latent_datalist=dl).get_parsed_content("evaluate")
    assert ev.source == "reference" and ev.reference_split == "training" and ev.guidance_scale == 1.0


def test_string_bool_on_the_command_line_fails_before_training(tiny_latents, tiny_pretrain, tmp_path):
    proc = bundle_run("meduet_diffusion", "train", "--bundle_root", str(tmp_path), "--latent_datalist",
                      str(tiny_latents), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
                      "--prior#enabled", "false", run_id="training", check=False)
    assert proc.returncode != 0
    assert "prior#enabled must be True or False, got 'false'" in proc.stdout + proc.stderr
    assert not Path(tmp_path / "models" / "checkpoint.pt").exists()  # failed before the first epoch
