"""meduet_diffusion's harmonisation served by a real ``monailabel start_server`` on 127.0.0.1 (MONAI Label 0.8.5 in its
own virtualenv, as tests/unit/deploy/test_deploy_monailabel.py runs it): the folder ``meduet.deploy.monailabel
--harmonise`` prepares, the app's harmonisation task listed in ``/info/``, an image harmonised to a site over HTTP
(the same volume as the library's service), bad requests answered with a 400 and one line, nothing left in the
server's temp folder; the server is stopped at the end. Bounded: every wait has a timeout."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, bundle_run
from meduet.deploy.monailabel import APP_MAIN_MARKER, prepare_monailabel_harmoniser
from meduet.workflows.diffusion.harmonise_serve import HarmoniseService
from monailabel_server import download_app, http, ml_env, ml_python, serve

NAME = "meduet_harmonise"


def _infer(base: str, image_id: str, params: dict, timeout: float = 300) -> tuple[int, bytes]:
    """``POST /infer/<NAME>?image=<id>&output=image`` with the ``params`` form field (``curl -F params=...``)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}--\r\n").encode()
    return http(f"{base}/infer/{NAME}?image={image_id}&output=image", body,
                f"multipart/form-data; boundary={boundary}", timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data, tiny_vae, tiny_latents, tiny_pretrain, sit_factors):
    """The monaibundle sample app with the tiny chain's harmonisation prepared into ``model/meduet_harmonise``
    (4 sampling steps), a datastore of two test scans, and a running server (its process group killed at teardown)."""
    py = ml_python()
    root = tmp_path_factory.mktemp("ml_harmonise")
    styles = root / "site_styles.json"
    bundle_run("meduet_diffusion", "harmonise", "--bundle_root", str(sit_factors), "--vae_ckpt",
               str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
               "--latent_datalist", str(tiny_latents), "--site_styles_file", str(styles), run_id="site_styles")
    app = download_app(py, root)
    folder = prepare_monailabel_harmoniser(REPO / "bundles/meduet_diffusion", app / "model" / NAME,
                                           model=str(sit_factors / "models/model.pt"),
                                           vae=str(tiny_vae / "models/model.pt"),
                                           pretrain=str(tiny_pretrain / "models/model.pt"), site_styles=str(styles))
    cfg = json.loads((folder / "configs/harmonise.json").read_text())
    cfg["num_steps"] = 4  # a user edits the served folder's config the same way
    (folder / "configs/harmonise.json").write_text(json.dumps(cfg, indent=4))
    assert (app / "main.py").read_text().startswith(APP_MAIN_MARKER)
    store = root / "studies"
    store.mkdir()
    dl = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    for it in dl["test"][:2]:
        shutil.copy(tiny_data / "phantoms" / it["image"], store / Path(it["image"]).name)
    with serve(py, app, store, root, NAME, conf=("--conf", "skip_trainers", "true"),
               env=ml_env(OMP_NUM_THREADS="1")) as server:
        yield {**server, "store": store, "folder": folder, "styles": styles}


@pytest.mark.slow
def test_monailabel_serves_harmonisation_over_http(served, tmp_path):
    base, info, store = served["base"], served["info"], served["store"]
    sites = sorted(json.loads(served["styles"].read_text())["sites"])
    assert NAME in info["models"], info["models"].keys()
    model = info["models"][NAME]
    assert model["config"]["target_site"] == sites and model["dimension"] == 3
    image = sorted(store.glob("*.nii.gz"))[0]
    image_id = image.name[: -len(".nii.gz")]
    before = sorted(os.listdir(served["tmpdir"]))

    status, payload = _infer(base, image_id, {"target_site": sites[-1]})
    assert status == 200, payload[-2000:]
    (tmp_path / "served.nii.gz").write_bytes(payload)
    out, src = nib.load(tmp_path / "served.nii.gz"), nib.load(image)
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    vol = np.asarray(out.dataobj, dtype=np.float32)
    assert np.isfinite(vol).all() and -175.0 - 1e-3 <= vol.min() and vol.max() <= 250.0 + 1e-3
    # the library's service on the same folder gives the same volume (the weights and bank arrived); the server runs
    # in another process and virtualenv with its own thread count, so float32 sums may differ in the last bits:
    # 0.01 HU on a 425 HU window (a wrong weight or style moves whole regions by far more)
    ours = HarmoniseService(served["folder"] / "configs/harmonise.json", bundle_root=served["folder"])(
        image, tmp_path / "ours.nii.gz", target_site=sites[-1])
    np.testing.assert_allclose(vol, np.asarray(nib.load(ours).dataobj), atol=1e-2)

    # bad requests: 400 with our one line, nothing written
    status, body = _infer(base, image_id, {"target_site": "site9"})
    assert status == 400, body
    detail = json.loads(body)["detail"]
    assert detail.startswith("MeduetConfigError: unknown target_site 'site9'; known sites:") and "\n" not in detail
    status, body = _infer(base, image_id, {})
    assert status == 400 and "name either a target_site" in json.loads(body)["detail"], body

    status, body = http(f"{base}/info/", timeout=30)  # still serving
    assert status == 200 and NAME in json.loads(body)["models"]
    deadline = time.time() + 10
    while sorted(os.listdir(served["tmpdir"])) != before and time.time() < deadline:
        time.sleep(0.5)  # the returned file is deleted just after its response
    assert sorted(os.listdir(served["tmpdir"])) == before, "files left in the server's temp folder"
