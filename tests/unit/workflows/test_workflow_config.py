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
