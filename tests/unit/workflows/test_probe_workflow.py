"""meduet_diffusion probe.yaml's workflow (meduet.workflows.diffusion.probe) on a small synthetic latent datalist:
the ldae source reads a semantic-conditioned generator's code (and is left out with a note for another condition),
and the one-line errors (missing checkpoint naming the bundle, missing / constant attribute, unknown split or
source) leave no report behind. The bundle-level run on the tiny chain is in tests/bundles/meduet_diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.latent import LatentDatalist, save_latent
from meduet.losses.diffusion import DiffusionObjective
from meduet.workflows.diffusion import probe

pytestmark = pytest.mark.usefixtures("one_thread")

C, S, SCALE = 4, 8, 0.5


def _datalist(tmp_path, n_subjects=10, visits=2):
    """Latents of ``n_subjects`` x ``visits`` cases; ``lesion`` (per subject) brightens channel 0, ``organ_ml``
    (per case) scales channel 1; ``scanner`` is the same on every item."""
    rng = np.random.default_rng(0)
    items = []
    for s in range(n_subjects):
        lesion = s % 2
        for v in range(visits):
            organ = float(rng.uniform(10, 50))
            z = rng.normal(size=(C, S, S, S)).astype(np.float32)
            z[0] += 2.0 * lesion
            z[1] += organ / 10.0
            name = f"s{s:02d}_v{v}.nii.gz"
            save_latent(tmp_path / "latents" / name, z, np.eye(4), 4)
            items.append({"image": f"images/{name}", "latent": f"latents/{name}", "domain": "site0",
                          "subject": f"s{s:02d}", "lesion": lesion, "organ_ml": organ, "scanner": 1})
    path = tmp_path / "datalist.json"
    LatentDatalist.write(path, {"latent_channels": C, "downsample_factor": 4, "latent_scale_factor": SCALE,
                                "domains": ["site0"], "test": items, "longitudinal": items})
    return path


def _generator(path, condition):
    from meduet.networks.dit import build_dit

    torch.manual_seed(0)
    net = build_dit("tiny", condition=condition, **({"content_dim": 8} if condition == "factors" else {}))
    net.meta = {"objective": DiffusionObjective("rflow").config(), "crop_size": [S, S, S], "latent_channels": C,
                "downsample_factor": 4, "latent_scale_factor": SCALE, "condition": condition}
    torch.save(net.state_dict(), path)
    return net


def _config(tmp_path, dl, **kw):
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("resamples", 200)
    return probe.Config(latent_datalist=str(dl), **kw)


def test_ldae_reads_the_semantic_code(tmp_path):
    pytest.importorskip("meduet.networks.semantic")  # the semantic condition (issue 23)
    dl = _datalist(tmp_path)
    net = _generator(tmp_path / "model.pt", "semantic")
    rep = probe.run(_config(tmp_path, dl, model_ckpt=str(tmp_path / "model.pt"), sources=["ldae"],
                            attributes={"lesion": "auto", "organ_ml": "regression"}))
    assert rep["splits"] == ["longitudinal"] and rep["cases"] == 20 and rep["subjects"] == 10
    assert rep["sources"]["ldae"]["dim"] == net.semantic_encoder.code_dim and not rep["notes"]
    r = rep["results"]
    assert r["lesion"]["ldae"]["task"] == "classification" and r["organ_ml"]["ldae"]["task"] == "regression"
    assert r["organ_ml"]["ldae"]["folds"] == 5 and np.isfinite(r["organ_ml"]["ldae"]["mae"])
    # the code of the first case is the network's code of its scaled, cropped latent
    from meduet.latent import load_latent

    items = LatentDatalist(dl).items("longitudinal")
    x = (load_latent(items[0]["latent"]) * SCALE)[None]
    codes = probe._semantic_codes(net, [load_latent(it["latent"]) for it in items[:3]], 2, torch.device("cpu"))
    np.testing.assert_allclose(codes[0], net.encode_semantic(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["results"]["lesion"]["ldae"]["roc_auc"] == r["lesion"]["ldae"]["roc_auc"]
    assert (tmp_path / "out" / "probe.png").stat().st_size > 0
    assert "| lesion | classification | ldae | ROC-AUC |" in (tmp_path / "out" / "probe.md").read_text()


def test_a_generator_that_is_not_semantic_is_a_note(tmp_path):
    dl = _datalist(tmp_path)
    _generator(tmp_path / "model.pt", "factors")
    with pytest.raises(MeduetConfigError, match="no source left"):
        probe.run(_config(tmp_path, dl, model_ckpt=str(tmp_path / "model.pt"), sources=["ldae"],
                          attributes=["lesion"]))
    assert not (tmp_path / "out" / "probe.json").exists()
    notes: dict = {}
    feats, ckpts = probe._features(_config(tmp_path, dl, model_ckpt=str(tmp_path / "model.pt"), sources=["ldae"]),
                                   LatentDatalist(dl), [], torch.device("cpu"), notes)
    assert feats == {} and ckpts == {}
    assert notes["ldae"].startswith("the generator is conditioned on factors, not semantic; train with --condition "
                                    "semantic")


def _raises(exc, cfg, *words):
    with pytest.raises(exc) as err:
        probe.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and ";" in msg, msg
    for w in words:
        assert w in msg, msg
    assert not (Path(cfg.output_dir) / "probe.json").exists()


def test_one_line_errors_leave_no_report(tmp_path):
    dl = _datalist(tmp_path)
    missing = str(tmp_path / "nowhere" / "model.pt")
    _raises(MeduetConfigError, _config(tmp_path, dl, model_ckpt=missing, sources=["ldae"], attributes=["lesion"]),
            "ldae", missing, "train the LDAE generator first", "ldae.yaml")
    _raises(MeduetConfigError, _config(tmp_path, dl, pretrain_ckpt=missing, sources=["meduet_content"],
                                       attributes=["lesion"]), "meduet_content", "train meduet_pretrain first")
    _raises(MeduetConfigError, _config(tmp_path, dl, baseline_ckpt=missing, sources=["mae"], attributes=["lesion"]),
            "mae", "mae_baseline.yaml")
    _raises(MeduetInputError, _config(tmp_path, dl, sources=["ldae"], attributes=["age"]),
            str(dl), "split 'longitudinal'", "'age'", "missing from 20 of 20 items")
    _raises(MeduetInputError, _config(tmp_path, dl, sources=["ldae"], attributes=["scanner"]),
            "'scanner'", "same value", "nothing to probe")
    _raises(MeduetConfigError, _config(tmp_path, dl, sources=["ldae"], splits=["visits"], attributes=["lesion"]),
            "'visits'", "splits")
    _raises(MeduetConfigError, _config(tmp_path, dl, sources=["vit"], attributes=["lesion"]), "sources")
    _raises(MeduetConfigError, _config(tmp_path, dl, sources=["ldae"], attributes={"lesion": "ordinal"}), "'lesion'")
    small = _datalist(tmp_path / "small", n_subjects=3)
    _raises(MeduetInputError, _config(tmp_path, small, sources=["ldae"], attributes=["organ_ml"]), "3 subject(s)")
    # no attributes given: those of lesion, organ_b_ml, age that every item carries and that vary
    notes: dict = {}
    cfg = _config(tmp_path, dl)
    assert probe._attributes(cfg, {"test": LatentDatalist(dl).items("test")}, "here", notes) == {"lesion": "auto"}
    assert set(notes) == {"organ_b_ml", "age"} and "missing from 20 of 20 items" in notes["age"]
    with pytest.raises(MeduetConfigError, match="none of the default attributes"):
        probe._attributes(cfg, {"test": [{"lesion": 1}] * 4}, "here", {})
    with pytest.raises(MeduetConfigError, match="'folds' must be an integer"):
        _config(tmp_path, dl, folds="five")
