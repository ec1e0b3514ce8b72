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
import subprocess
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, bundle_run
from meduet.deploy.monailabel import APP_MAIN_MARKER, install_app_main, prepare_monailabel_bundle
from meduet.errors import MeduetConfigError
from meduet import records
from monailabel_server import download_app, http, ml_env, serve
from monailabel_server import ml_python as find_ml_python

NAME = "meduet_seg"
BUNDLE = REPO / "bundles" / "meduet_seg"


def _ml_run(py: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([py, *args], capture_output=True, text=True, timeout=timeout, env=ml_env(), cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def ml_python() -> str:
    return find_ml_python()


@pytest.fixture(scope="module")
def ml_app(ml_python, seg_trained, tmp_path_factory) -> Path:
    """MONAI Label's monaibundle sample app (copied from the monailabel wheel, no network) with the tiny trained
    meduet_seg bundle prepared into ``model/meduet_seg``."""
    app = download_app(ml_python, tmp_path_factory.mktemp("mlapp"))
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
               "--input_data", f"[{{'image': '{image}'}}]", "--write_dicom_seg", "False")
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


def test_install_app_main_wraps_the_monaibundle_app_once(tmp_path):
    sample = ("from monailabel.interfaces.app import MONAILabelApp\nfrom monailabel.utils.others.generic import "
              "get_bundle_models\n\n\nclass MyApp(MONAILabelApp):\n    pass\n")
    app = tmp_path / "monaibundle"
    app.mkdir()
    (app / "main.py").write_text(sample)
    assert install_app_main(app) and install_app_main(app)  # the second call finds it done
    main = (app / "main.py").read_text()
    assert main.startswith(APP_MAIN_MARKER) and "class MeduetApp(MeduetHTTPErrors, _sample.MyApp, MONAILabelApp)" in main
    assert (app / "main_monaibundle.py").read_text() == sample  # the sample app kept, not overwritten by ours
    assert sorted(p.name for p in app.iterdir()) == ["main.py", "main_monaibundle.py"]  # no temp files
    compile(main, "main.py", "exec")
    other = tmp_path / "other"
    other.mkdir()
    (other / "main.py").write_text("class CustomApp:\n    pass\n")
    assert not install_app_main(other) and not install_app_main(tmp_path / "none")  # another app: left alone
    assert (other / "main.py").read_text() == "class CustomApp:\n    pass\n"


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


def _post(url: str, data: bytes = b"{}", content_type: str = "application/json", timeout: float = 120) -> tuple[int, bytes]:
    return http(url, data, content_type, timeout)


def _upload(url: str, filename: str, content: bytes, timeout: float = 120) -> tuple[int, bytes]:
    """``POST url`` with one multipart file field ``file`` (what ``curl -F file=@x`` sends)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return _post(url, body, f"multipart/form-data; boundary={boundary}", timeout=timeout)


def _label(payload: bytes, path: Path) -> np.ndarray:
    path.write_bytes(payload)
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def ml_server(ml_python, ml_app, studies, tmp_path_factory):
    """A real ``monailabel start_server`` on 127.0.0.1 serving the prepared app (MONAI Label's defaults, e.g. no
    MONAI_LABEL_INFER_CONCURRENCY), with ``TMPDIR`` set to a folder of its own so the temp files it leaves are
    visible; killed (its whole process group) at teardown."""
    root = tmp_path_factory.mktemp("mlserver")
    store = root / "studies"
    shutil.copytree(studies, store)
    with serve(ml_python, ml_app, store, root, NAME) as server:
        yield {**server, "store": store, "root": root}


@pytest.mark.slow
def test_monailabel_server_serves_inference_over_http(ml_server, ml_app, seg_trained, studies, tmp_path):
    base, info, store = ml_server["base"], ml_server["info"], ml_server["store"]
    assert (ml_app / "main.py").read_text().startswith(APP_MAIN_MARKER)  # the sample app with our HTTP errors
    assert NAME in info["models"], info["models"].keys()
    assert set(info["models"][NAME]["labels"]) == {"body", "organ_a", "organ_b", "lesion"}

    image = sorted(store.glob("*.nii.gz"))[0]
    image_id = image.name[: -len(".nii.gz")]
    status, payload = _post(f"{base}/infer/{NAME}?image={image_id}&output=image", timeout=300)
    assert status == 200, payload[-2000:]
    label = tmp_path / "served.nii.gz"
    label.write_bytes(payload)
    seg, src = nib.load(label), nib.load(image)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
    served = np.asarray(seg.dataobj)
    ours = _bundle_prediction(seg_trained, studies / image.name, tmp_path / "ours")
    assert float((served == ours).mean()) > 0.999


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


@pytest.mark.slow
def test_monailabel_server_burst_of_good_and_bad_requests(ml_server, tmp_path):
    """A bounded burst on 127.0.0.1: 6 good requests (5 by image id, 1 upload) and 3 bad ones (unknown id, empty
    upload, non-NIfTI upload) at once. Good ones give the serial labels; bad ones a 4xx with our one-line reason;
    the server answers /info/ afterwards and no temp file is left (MONAI Label's TMPDIR, listed before and after)."""
    base, store, tmpdir = ml_server["base"], ml_server["store"], ml_server["tmpdir"]
    images = sorted(store.glob("*.nii.gz"))[:3]
    ids = [p.name[: -len(".nii.gz")] for p in images]
    serial = {}
    for i in ids:  # one at a time first: the reference labels
        status, payload = _post(f"{base}/infer/{NAME}?image={i}&output=image", timeout=300)
        assert status == 200, payload[-2000:]
        serial[i] = _label(payload, tmp_path / f"serial_{i}.nii.gz")
    time.sleep(1)  # MONAI Label deletes a returned label file after the response: let it settle
    before = sorted(os.listdir(tmpdir))

    url = f"{base}/infer/{NAME}?output=image"
    jobs = {f"good{k}": (lambda i=ids[k % 3]: _post(f"{base}/infer/{NAME}?image={i}&output=image")) for k in range(5)}
    jobs["good_upload"] = lambda: _upload(url, images[1].name, images[1].read_bytes())
    jobs["unknown_id"] = lambda: _post(f"{base}/infer/{NAME}?image=no_such_image&output=image")
    jobs["empty_upload"] = lambda: _upload(url, "empty.nii.gz", b"")
    jobs["text_upload"] = lambda: _upload(url, "notes.txt", b"not an image\n")
    results: dict[str, tuple[int, bytes] | BaseException] = {}

    def run(name):
        try:
            results[name] = jobs[name]()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in jobs]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 150 - (time.time() - start)))
    assert set(results) == set(jobs), f"no answer within 150 s: {sorted(set(jobs) - set(results))}"
    errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    assert not errors, errors

    for k in range(5):
        status, payload = results[f"good{k}"]
        assert status == 200, payload[-2000:]
        assert np.array_equal(_label(payload, tmp_path / f"good{k}.nii.gz"), serial[ids[k % 3]])
    status, payload = results["good_upload"]
    assert status == 200, payload[-2000:]
    assert np.array_equal(_label(payload, tmp_path / "good_upload.nii.gz"), serial[ids[1]])

    status, body = results["unknown_id"]
    assert status == 404, body
    detail = _detail(body)
    assert "unknown image id 'no_such_image'" in detail and str(ml_server["root"]) not in detail
    for name in ("empty_upload", "text_upload"):
        status, body = results[name]
        assert status == 400, (name, body)
        detail = _detail(body)
        assert detail.startswith("MeduetInputError: uploaded file: cannot read") and "\n" not in detail, detail
        assert str(tmpdir) not in detail  # the server's temp path means nothing to the client

    status, body = http(f"{base}/info/", timeout=30)  # still serving
    assert status == 200 and NAME in json.loads(body)["models"]
    deadline = time.time() + 10
    while sorted(os.listdir(tmpdir)) != before and time.time() < deadline:
        time.sleep(0.5)  # returned labels are deleted just after their response
    assert sorted(os.listdir(tmpdir)) == before, "temp files left by the requests"
