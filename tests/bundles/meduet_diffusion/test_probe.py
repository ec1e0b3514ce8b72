"""meduet_diffusion probe.yaml at the tiny preset, run as users do: linear probes of the tiny phantoms' per-case
attributes on the longitudinal cohort for MeDUET's content and style and the MAE baseline side by side (the ldae row
left out with a note for the factor-conditioned SiT), and the one-line errors for a missing or constant attribute."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from conftest import bundle_run


def _chain(sit_factors: Path, datalist: Path, tiny_pretrain: Path) -> list[str]:
    return ["--bundle_root", str(sit_factors), "--latent_datalist", str(datalist),
            "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
            "--baseline_ckpt", str(tiny_pretrain / "models/baseline_mae/model.pt"),
            "--model_ckpt", str(sit_factors / "models/model.pt")]


def test_probe_reports_each_source_with_intervals_and_chance(sit_factors, tiny_latents, tiny_pretrain, tmp_path):
    out = tmp_path / "probe"
    proc = bundle_run("meduet_diffusion", "probe", *_chain(sit_factors, tiny_latents, tiny_pretrain),
                      "--output_dir", str(out))
    rep = json.loads((out / "probe.json").read_text())
    items = json.loads(tiny_latents.read_text())["longitudinal"]
    assert rep["splits"] == ["longitudinal"] and rep["cases"] == len(items)
    assert rep["subjects"] == len({it["subject"] for it in items}) and rep["subject_key"]
    # attributes: null -> the defaults the cohort carries; integers with few values are classes
    assert rep["attributes"] == {"lesion": "classification", "organ_b_ml": "regression", "age": "regression"}
    sources = ("meduet_content", "meduet_style", "mae")
    assert sorted(rep["sources"]) == sorted(sources)
    assert rep["notes"]["ldae"].startswith("the generator is conditioned on factors, not semantic; train with "
                                           "--condition semantic")
    for attr, by_source in rep["results"].items():
        assert sorted(by_source) == sorted(sources), attr
        for source, r in by_source.items():
            assert r["n_cases"] == len(items) and r["n_subjects"] == rep["subjects"] and r["folds"] >= 2
            keys = ("balanced_accuracy", "roc_auc") if r["task"] == "classification" else ("mae", "rmse")
            for k in keys:
                lo, hi = r[f"{k}_ci95"]
                assert math.isfinite(r[k]) and lo <= hi, (attr, source, k)
                assert k in r["chance"]
            if r["task"] == "classification":
                assert r["chance"] == {"balanced_accuracy": 0.5, "roc_auc": 0.5} and 0 <= r["roc_auc"] <= 1
            else:
                assert r["chance"]["mae"] > 0 and r["rmse"] >= r["mae"]
    assert (out / "probe.png").stat().st_size > 0
    table = (out / "probe.md").read_text()
    assert "| age | regression | mae | MAE |" in table
    assert "| lesion | classification | meduet_style | ROC-AUC |" in table
    assert "| attribute | task | source | metric | value | 95 % interval | chance |" in proc.stdout


def _fails_in_one_line(proc, out: Path, *words: str) -> None:
    text = proc.stdout + proc.stderr
    last = text.strip().splitlines()[-1]
    assert proc.returncode != 0, text[-2000:]
    assert last.startswith("Meduet") and "Error: " in last, last
    for w in words:
        assert w in last, last
    assert "Traceback" not in text
    assert not (out / "probe.json").exists()


def test_missing_or_constant_attribute_is_one_line(sit_factors, tiny_latents, tiny_pretrain, tmp_path):
    out = tmp_path / "probe"
    # age exists only on the longitudinal cohort
    n_test = len(json.loads(tiny_latents.read_text())["test"])
    proc = bundle_run("meduet_diffusion", "probe", *_chain(sit_factors, tiny_latents, tiny_pretrain), "--output_dir",
                      str(out), "--splits", "['longitudinal','test']", "--attributes", "['age']", check=False)
    _fails_in_one_line(proc, out, "'age'", "split 'test'", f"missing from {n_test} of {n_test} items",
                       str(tiny_latents))
    # a constant attribute: the same latent datalist with a scanner model written on every item
    data = json.loads(tiny_latents.read_text())
    base = tiny_latents.parent
    for it in data["longitudinal"]:
        it["latent"] = os.path.join(base, it["latent"])
        it["latent_aug"] = [os.path.join(base, p) for p in it.get("latent_aug") or []]
        it["scanner"] = "ct-64"
    constant = tmp_path / "constant.json"
    constant.write_text(json.dumps(data))
    proc = bundle_run("meduet_diffusion", "probe", *_chain(sit_factors, constant, tiny_pretrain), "--output_dir",
                      str(out), "--attributes", "['scanner']", check=False)
    _fails_in_one_line(proc, out, "'scanner'", "same value ('ct-64')", "nothing to probe")


@pytest.mark.filterwarnings("ignore:Can't merge entry")  # the presets' +prior: probe.yaml has no prior
def test_probe_config_builds_with_every_preset():
    from monai.bundle import ConfigParser

    from conftest import REPO
    from meduet.workflows.diffusion.probe import SOURCES, Config

    cfg = REPO / "bundles/meduet_diffusion/configs"
    for preset in (None, "tiny", "demo", "paper"):
        parser = ConfigParser()
        parser.read_config([str(cfg / "probe.yaml")] + ([str(cfg / "presets" / f"{preset}.yaml")] if preset else []))
        built = parser.get_parsed_content("probe")
        assert isinstance(built, Config) and built.sources == list(SOURCES) and built.splits is None, preset
        assert built.model_ckpt.endswith("models/ldae/model.pt") and built.output_dir.endswith("eval/probe")
