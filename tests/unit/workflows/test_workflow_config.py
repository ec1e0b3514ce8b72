"""meduet.workflows.config: every workflow's typed config refuses a wrong type with one line naming the key."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import meduet.workflows
from meduet.errors import MeduetConfigError
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.vae.evaluate import Config as EvaluateConfig


def test_types_are_checked_on_construction():
    ok = EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", patch_size=[32, 32, 32], max_cases=None,
                        device=torch.device("cpu"))
    assert ok.patch_size == [32, 32, 32] and ok.split == "test"
    assert EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", patch_size=16, seam_width=2)
    with pytest.raises(MeduetConfigError, match=r"'max_cases' must be an integer or null, got 'abc'") as err:
        EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", max_cases="abc")
    assert "\n" not in str(err.value)
    with pytest.raises(MeduetConfigError, match="'patch_size' must be a list or an integer"):
        EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", patch_size=["a", "b", "c"])
    with pytest.raises(MeduetConfigError, match="'save_images' must be an integer, got True"):
        EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", save_images=True)


def test_every_workflow_module_has_a_typed_config_and_run():
    found = []
    for info in pkgutil.walk_packages(meduet.workflows.__path__, "meduet.workflows."):
        mod = importlib.import_module(info.name)
        if hasattr(mod, "run"):
            assert issubclass(mod.Config, WorkflowConfig), info.name
            found.append(info.name.removeprefix("meduet.workflows."))
    assert {"vae.evaluate", "vae.encode", "pretrain.evaluate", "pretrain.extract", "diffusion.sample",
            "diffusion.transfer", "diffusion.evaluate", "seg.evaluate"} <= set(found)


def test_bool_keys_refuse_the_string_python_fire_passes_for_lowercase_false():
    """``--resume false`` reaches the config as the string 'false' (truthy): every bool a bundle config hands to our
    code is checked where it is used, with one line saying to write True / False."""
    from meduet.engines.checkpoint import TrainingCheckpointer
    from meduet.engines.pretrain import optimizer_param_groups
    from meduet.engines.trainer import MeduetTrainer
    from meduet.engines.vae import check_paper_weights

    net = torch.nn.Linear(2, 2)
    hint = "capitalised, so that python-fire passes a bool"
    with pytest.raises(MeduetConfigError, match=rf"resume must be True or False, got 'false' .*{hint}"):
        TrainingCheckpointer("unused", {"model": net}, resume="false")
    assert TrainingCheckpointer("unused", {"model": net}, resume=False).resume is False
    with pytest.raises(MeduetConfigError, match="amp must be True or False, got 'false'"):
        MeduetTrainer("cpu", 1, [torch.zeros(1)], net, torch.optim.SGD(net.parameters(), 0.1), amp="false")
    with pytest.raises(MeduetConfigError, match="decay_bias_and_norm must be True or False"):
        optimizer_param_groups(net, 0.05, "false")
    assert len(optimizer_param_groups(net, 0.05, False)) == 2  # the bool itself still selects the public code's groups
    with pytest.raises(MeduetConfigError, match="paper_weights_required must be True or False"):
        check_paper_weights("false", False, None, None)
    with pytest.raises(MeduetConfigError, match=rf"'noise_free' must be true or false, got 'false'.*{hint}"):
        EvaluateConfig(vae_ckpt="m.pt", datalist="d.json", output_dir="out", noise_free="false")


def test_a_trainer_whose_data_make_no_batch_is_one_line():
    """meduet_pretrain's paper batch (256) on fewer latents used to log "dataloader is empty", exit 0, write nothing."""
    from torch.utils.data import DataLoader

    from meduet.engines.trainer import MeduetTrainer

    net = torch.nn.Linear(2, 2)
    loader = DataLoader([torch.zeros(2)] * 3, batch_size=4, drop_last=True)
    with pytest.raises(MeduetConfigError, match=r"the training data \(3 items\) make no batch of batch_size 4.*at most 3"):
        MeduetTrainer("cpu", 1, loader, net, torch.optim.SGD(net.parameters(), 0.1))
    for bad in ("abc", 0, 2.5):  # `--max_epochs abc` used to end in an ignite traceback
        with pytest.raises(MeduetConfigError, match=rf"max_epochs must be a positive integer, got {bad!r}"):
            MeduetTrainer("cpu", bad, DataLoader([torch.zeros(2)] * 3, batch_size=1), net,
                          torch.optim.SGD(net.parameters(), 0.1))
    ok = DataLoader([torch.zeros(2)] * 3, batch_size=4, drop_last=False)
    assert MeduetTrainer("cpu", 1, ok, net, torch.optim.SGD(net.parameters(), 0.1)).state.max_epochs == 1
