"""``--tracking mlflow`` on every train workflow: the session fixtures train each bundle once with MONAI's
MLFlowHandler patched in (tests/conftest.py ``mlflow_args``); here the MLflow file stores they wrote are read back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import mlflow_args

mlflow = pytest.importorskip("mlflow")

# (fixture, experiment, run name, metrics the validation logs once per epoch)
WORKFLOWS = [
    ("tiny_vae", "meduet_vae", "vae", ("val_psnr", "val_ssim")),  # train.yaml
    ("tiny_vae", "meduet_vae", "decoder", ()),  # train_decoder.yaml
    ("tiny_pretrain", "meduet_pretrain", "meduet", ()),
    ("seg_trained", "meduet_seg", "seg_meduet", ("val_mean_dice",)),
    ("sit_factors", "meduet_diffusion", "rflow_factors", ("val_loss",)),
    ("recon_trained", "meduet_recon", "recon_mri", ()),
]


def _client(root: Path):
    store = mlflow_args(root)[-1]
    assert store.startswith("file:") and (root / "mlruns").is_dir(), f"no MLflow store at {store}"
    return mlflow.tracking.MlflowClient(tracking_uri=store)


@pytest.mark.parametrize("fixture, experiment, run_name, val_metrics", WORKFLOWS, ids=[w[2] for w in WORKFLOWS])
def test_train_run_tracked(request, monkeypatch, fixture, experiment, run_name, val_metrics):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.13 opens file stores only when allowed
    root = request.getfixturevalue(fixture)
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {root / 'mlruns'}"
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    assert len(runs) == 1, [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert int(params["max_epochs"]) >= 1 and int(params["epoch_length"]) >= 1, params
    iterations = int(params["max_epochs"]) * int(params["epoch_length"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, iterations + 1))
    assert all(math.isfinite(m.value) for m in history)
    assert len({m.value for m in history}) > 1  # a real loss curve, not a constant
    assert len(client.get_metric_history(run.info.run_id, "lr_group_0")) == iterations
    for key in val_metrics:
        values = client.get_metric_history(run.info.run_id, key)
        assert values and all(math.isfinite(m.value) for m in values), key
    # MONAI logs the executed config as an artifact of the trainer's run
    assert any(a.path.startswith("config_") for a in client.list_artifacts(run.info.run_id))


def test_only_tracked_runs(request, monkeypatch):
    """tiny_pretrain's second objective (mae) ran without ``--tracking``: nothing of it in the store."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = _client(request.getfixturevalue("tiny_pretrain"))
    exp = client.get_experiment_by_name("meduet_pretrain")
    assert [r.info.run_name for r in client.search_runs([exp.experiment_id])] == ["meduet"]


def test_mlflow_uri_opens_a_plain_file_store(tmp_path, monkeypatch):
    """The configs' ``tracking_uri``: MONAI's MLFlowHandler accepts it (it refuses ``file:``), MLflow writes a plain
    file store there, read back as ``file:``; odd characters in the path survive; other URIs pass unchanged."""
    from monai.handlers import MLFlowHandler

    from meduet.engines.tracking import mlflow_uri, store_path

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MONAI's handler would take it over tracking_uri
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = tmp_path / "my runs#1"
    uri = mlflow_uri(store.as_uri())
    assert uri.startswith("meduet-file:") and store_path(uri) == store and mlflow_uri(store) == uri
    with pytest.raises(ValueError, match="file store"):
        MLFlowHandler(tracking_uri=store.as_uri())
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="e", run_name="r")
    run = handler.client.create_run(handler.client.create_experiment("e"), run_name="r")
    handler.client.log_metric(run.info.run_id, "m", 1.5, step=1)
    back = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())  # MLFLOW_ALLOW_FILE_STORE set on opening
    assert [m.value for m in back.get_metric_history(run.info.run_id, "m")] == [1.5]
    for other in ("http://127.0.0.1:5000", "sqlite:///x/mlruns.db", "databricks"):
        assert mlflow_uri(other) == other
