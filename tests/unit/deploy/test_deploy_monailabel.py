"""meduet_seg in MONAI Label's monaibundle app: the prepared bundle folder, MONAI Label's own bundle infer and train
tasks, and a real ``monailabel start_server`` on 127.0.0.1 answering an inference over HTTP.

MONAI Label 0.8.5 lives in its own virtualenv (``make monailabel-setup``, pins in DEVELOPERS.md); these tests run
its interpreter as a subprocess. They are skipped only where that virtualenv does not exist and
``MEDUET_MONAILABEL_PYTHON`` is not set; an interpreter that is there (or named) but cannot import monailabel fails
them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, bundle_run
from meduet.deploy.monailabel import prepare_monailabel_bundle, site_path
from meduet.errors import MeduetConfigError
from meduet import records

NAME = "meduet_seg"
BUNDLE = REPO / "bundles" / "meduet_seg"


def _ml_python() -> str:
    venv = REPO / ".venv-monailabel"
    override = os.environ.get("MEDUET_MONAILABEL_PYTHON")
    py = override or str(venv / "bin" / "python")
    if not override and not venv.exists():  # pytest run by hand without `make test`, which builds it (CI always does)
        if os.environ.get("MEDUET_REQUIRE_MONAILABEL") == "1":  # set by `make test`: a missing venv is a failure
            pytest.fail(f"MONAI Label's virtualenv is missing ({venv}) although `make test` builds it")
        pytest.skip(f"MONAI Label's virtualenv is not installed ({venv}); `make monailabel-setup` builds it")
    # a MONAI Label interpreter that was asked for (the virtualenv exists, or MEDUET_MONAILABEL_PYTHON is set) but is
    # missing, does not run or cannot import monailabel is a broken install: a failure, never a skip
    try:
        probe = subprocess.run([py, "-c", "import monailabel"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        pytest.fail(f"{py} does not run ({e}); rebuild it with `make monailabel-setup`")
    assert probe.returncode == 0, f"{py} cannot import monailabel: {probe.stderr.strip().splitlines()[-1:]}"
    return py


def _ml_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=site_path(), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")


def _ml_run(py: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([py, *args], capture_output=True, text=True, timeout=timeout, env=_ml_env(), cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def ml_python() -> str:
    return _ml_python()


@pytest.fixture(scope="module")
def ml_app(ml_python, seg_trained, tmp_path_factory) -> Path:
    """MONAI Label's monaibundle sample app (copied from the monailabel wheel, no network) with the tiny trained
    meduet_seg bundle prepared into ``model/meduet_seg``."""
    root = tmp_path_factory.mktemp("mlapp")
    proc = subprocess.run([ml_python, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                           "--output", str(root)], capture_output=True, text=True, timeout=300, env=_ml_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    app = root / "monaibundle"
    prepare_monailabel_bundle(BUNDLE, app / "model" / NAME, model=str(seg_trained / "models/model.pt"))
    return app


@pytest.fixture(scope="module")
def studies(tiny_data, tmp_path_factory) -> Path:
    """A MONAI Label datastore: a few phantom images with their final labels under the image's name."""
    root = tmp_path_factory.mktemp("studies")
    (root / "labels" / "final").mkdir(parents=True)
    dl = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    for it in dl["training"][:4]:
        name = Path(it["image"]).name
        shutil.copy(tiny_data / "phantoms" / it["image"], root / name)
        shutil.copy(tiny_data / "phantoms" / it["label"], root / "labels" / "final" / name)
    return root


def _bundle_prediction(seg_trained: Path, image: Path, out: Path) -> np.ndarray:
    """The same image through our own inference.json (monai.bundle run), for comparison."""
    bundle_run("meduet_seg", "inference", "--bundle_root", str(seg_trained), "--output_dir", str(out),
               "--input_data", f"[{{'image': '{image}'}}]", "--write_dicom_seg", "0")
    (path,) = list(out.glob("*_seg.nii.gz"))
    return np.asarray(nib.load(path).dataobj)


def test_prepared_bundle_describes_the_trained_network(seg_trained, tmp_path):
    out = prepare_monailabel_bundle(BUNDLE, tmp_path / "model" / NAME, model=str(seg_trained / "models/model.pt"))
    net = records.load(seg_trained / "models/model.pt", expect="meduet_seg")
    inf = json.loads((out / "configs/inference.json").read_text())
    arch = {k: v for k, v in inf["network_def"].items() if k != "_target_"}
    assert json.loads(json.dumps(net.arch)) == arch
    assert inf["roi_size"] == net.meta["roi_size"]
    assert inf["preprocessing_args"]["pad_multiple"] == net.image_per_token
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == net.meta["labels"]
    train = json.loads((out / "configs/train.json").read_text())
    assert "records.load" in train["network_def"] and train["resume"] is False and "run" in train
    assert not (out / "configs/train.yaml").exists() and (out / "models/model.pt").is_file()
    # the served config alone (no preset) builds the trained network and loads model.pt strictly
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(out / "configs/inference.json"))
    parser["bundle_root"] = str(out)
    built = parser.get_parsed_content("network_def")
    built.load_state_dict(net.state_dict(), strict=True)

    with pytest.raises(MeduetConfigError, match="already exists"):
        prepare_monailabel_bundle(BUNDLE, out, model=str(seg_trained / "models/model.pt"))
    missing = tmp_path / "nothing" / NAME
    with pytest.raises(MeduetConfigError, match="does not exist"):
        prepare_monailabel_bundle(BUNDLE, missing, model=str(tmp_path / "no_model.pt"))
    assert not missing.parent.exists()  # nothing written


def test_monailabel_bundle_infer_task_matches_the_bundle(ml_python, ml_app, seg_trained, studies, tmp_path):
    image = sorted(studies.glob("*.nii.gz"))[0]
    res = _ml_run(ml_python, str(REPO / "tests/unit/deploy/monailabel_tasks.py"), "infer", str(ml_app / "model" / NAME),
                  str(image))
    assert res["labels"] == {v: int(k) for k, v in records.load(seg_trained / "models/model.pt", expect="meduet_seg").meta["labels"].items()
                             if v != "background"}
    assert res["dimension"] == 3 and "SEGMENTATION" in res["type"].upper()
    src = nib.load(image)
    assert res["shape"] == list(src.shape) and np.allclose(res["affine"], src.affine)
    served = np.asarray(nib.load(res["label_file"]).dataobj)
    ours = _bundle_prediction(seg_trained, image, tmp_path / "ours")
    # MONAI Label loads model.pt non-strictly: agreeing with our strictly-loaded inference shows the weights arrived
    assert served.shape == ours.shape and float((served == ours).mean()) > 0.999
    os.remove(res["label_file"])


def test_monailabel_bundle_train_task_finetunes_model_pt(ml_python, ml_app, studies, tmp_path):
    bundle = tmp_path / NAME
    shutil.copytree(ml_app / "model" / NAME, bundle)  # keep the served copy unchanged for the other tests
    res = _ml_run(ml_python, str(REPO / "tests/unit/deploy/monailabel_tasks.py"), "train", str(bundle), str(studies))
    assert res["n_datalist"] == 4 and res["keys_same"] and res["finite"]
    assert res["changed"] > 0, "MONAI Label's training did not change model.pt"
    assert res["frozen_changed"] == 0, "the frozen VAE encoder changed during fine-tuning"
    records.load(bundle / "models/model.pt", expect="meduet_seg")  # still a complete meduet_seg model.pt with its record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_monailabel_server_serves_inference_over_http(ml_python, ml_app, seg_trained, studies, tmp_path):
    port = _free_port()
    store = tmp_path / "studies"
    shutil.copytree(studies, store)
    log = open(tmp_path / "server.log", "w")
    cmd = [ml_python, "-m", "monailabel.main", "start_server", "--app", str(ml_app), "--studies", str(store),
           "--conf", "models", NAME, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
           "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_ml_env(), cwd=tmp_path,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, info = time.time() + 240, None
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                status, body = _get(f"{base}/info/", timeout=5)
                if status == 200:
                    info = json.loads(body)
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        assert info is not None, "MONAI Label did not answer /info/ in 240 s:\n" + (tmp_path / "server.log").read_text()[-4000:]
        assert NAME in info["models"], info["models"].keys()
        assert set(info["models"][NAME]["labels"]) == {"body", "organ_a", "organ_b", "lesion"}

        image = sorted(store.glob("*.nii.gz"))[0]
        image_id = image.name[: -len(".nii.gz")]
        req = urllib.request.Request(f"{base}/infer/{NAME}?image={image_id}&output=image", method="POST",
                                     data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200
            payload = r.read()
        label = tmp_path / "served.nii.gz"
        label.write_bytes(payload)
        seg, src = nib.load(label), nib.load(image)
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
        served = np.asarray(seg.dataobj)
        ours = _bundle_prediction(seg_trained, studies / image.name, tmp_path / "ours")
        assert float((served == ours).mean()) > 0.999
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
    assert server.poll() is not None
