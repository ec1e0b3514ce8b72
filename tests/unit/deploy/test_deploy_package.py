"""Packaged bundles (meduet.deploy.package) served over HTTP on 127.0.0.1, downloaded with `monai.bundle download`
and run / loaded in a fresh interpreter where this repository is not importable (only the vendored copy is)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from meduet.deploy.integrity import MANIFEST, sha256_file
from meduet.deploy.package import BUNDLES, package_bundle, undeclared_imports

# python -c BOOT <module> <args>: runs a module as `python -m` would, with the repository's source folder taken off
# sys.path (the editable install of meduet points there), so only a bundle's vendored copy can be imported.
_NO_REPO = ("import os, sys, runpy; src = os.path.realpath(sys.argv[1]); "
            "sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != src]; ")
BOOT = _NO_REPO + ("mod = sys.argv[2]; sys.argv = sys.argv[2:]; "
                   "runpy.run_module(mod, run_name='__main__', alter_sys=True)")
EXEC = _NO_REPO + "exec(sys.argv[2])"


def clean(module: str, *args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BOOT, str(REPO / "common"), module, *args]
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A static HTTP server on 127.0.0.1 serving a fresh folder; stopped at the end of the module."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def dist(server, tiny_vae, tiny_pretrain, sit_factors, seg_trained, recon_trained) -> Path:
    """The bundles trained at the tiny preset, packaged into the served folder; meduet_seg's model.pt is made
    a large file (beside the zip, listed in large_files.yml)."""
    www, url = server
    roots = {"meduet_vae": tiny_vae, "meduet_pretrain": tiny_pretrain, "meduet_diffusion": sit_factors,
             "meduet_seg": seg_trained, "meduet_recon": recon_trained}
    for name in BUNDLES:
        limit = 0.2 if name == "meduet_seg" else 1900.0
        package_bundle(REPO / "bundles" / name, www, preset="tiny", models=roots[name] / "models",
                       max_file_mb=limit, base_url=url)
    return www


def test_zips_are_self_contained_checksummed_and_reproducible(dist, tiny_pretrain, seg_trained, tmp_path):
    sums = dict(reversed(line.split("  ")) for line in (dist / "SHA256SUMS").read_text().splitlines())
    for name in BUNDLES:
        meta = json.loads((REPO / "bundles" / name / "configs/metadata.json").read_text())
        z = dist / f"{name}_v{meta['version']}.zip"
        assert sums[z.name] == sha256_file(z) == (dist / f"{z.name}.sha256").read_text().split()[0]
        with zipfile.ZipFile(z) as zf:
            names = zf.namelist()
            assert {n.split("/")[0] for n in names} == {name}
            manifest = {k: v for k, v in (line.split("  ")[::-1] for line in
                                          zf.read(f"{name}/{MANIFEST}").decode().splitlines())}
            inf = json.loads(zf.read(f"{name}/configs/inference.json"))
            packaged = json.loads(zf.read(f"{name}/meduet/_packaged.json"))
        inside = {n[len(name) + 1:] for n in names} - {MANIFEST}
        large = set(manifest) - inside
        assert inside <= set(manifest) and "meduet/__init__.py" in inside and "configs/metadata.json" in inside
        assert not any(n.startswith("models/checkpoint") for n in inside) and "models/model.pt" in manifest
        assert inf["bundle_root"] == "." and "bundles/" not in json.dumps(inf)
        assert packaged == {"name": name, "version": meta["version"], "preset": "tiny",
                            "meduet_version": packaged["meduet_version"]}
        # the vendored library imports nothing at module level that metadata.json does not declare
        assert not undeclared_imports(REPO / "common" / "meduet", meta)
        if name == "meduet_seg":  # the large file: published beside the zip with its hash in large_files.yml
            assert large == {"models/model.pt"}
            with zipfile.ZipFile(z) as zf:
                entry = yaml.safe_load(zf.read(f"{name}/large_files.yml"))["large_files"][0]
            asset = dist / f"{name}_v{meta['version']}_models_model.pt"
            assert entry["path"] == "models/model.pt" and entry["hash_type"] == "sha256"
            assert entry["hash_val"] == manifest["models/model.pt"] == sha256_file(asset) == sums[asset.name]
        else:
            assert not large
    # packaging the same inputs again gives the same bytes: without weights,
    twice = [package_bundle(REPO / "bundles/meduet_pretrain", tmp_path / d, preset="tiny", check=False,
                            models=tmp_path / "no_weights") for d in ("a", "b")]
    assert sha256_file(twice[0]) == sha256_file(twice[1])
    # with the same trained model.pt (shipped byte for byte inside the zip),
    weights = tiny_pretrain / "models"
    twice = [package_bundle(REPO / "bundles/meduet_pretrain", tmp_path / d, preset="tiny", models=weights)
             for d in ("wa", "wb")]
    with zipfile.ZipFile(twice[0]) as zf:
        assert zf.read("meduet_pretrain/models/model.pt") == (weights / "model.pt").read_bytes()
    assert sha256_file(twice[0]) == sha256_file(twice[1])
    assert (tmp_path / "wa/SHA256SUMS").read_bytes() == (tmp_path / "wb/SHA256SUMS").read_bytes()
    # and with model.pt published beside the zip as a large file: every published file, SHA256SUMS included
    twice = [package_bundle(REPO / "bundles/meduet_seg", tmp_path / d, preset="tiny", models=seg_trained / "models",
                            max_file_mb=0.2, base_url="https://example.org/release") for d in ("la", "lb")]
    published = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("la", "lb")]
    assert published[0] == published[1] and f"{twice[0].stem}_models_model.pt" in published[0]
    assert (tmp_path / "la" / f"{twice[0].stem}_models_model.pt").read_bytes() == \
        (seg_trained / "models/model.pt").read_bytes()
    for n in published[0]:
        assert (tmp_path / "la" / n).read_bytes() == (tmp_path / "lb" / n).read_bytes(), f"{n} differs"


def test_wrong_preset_is_refused_and_nothing_is_written(seg_trained, tmp_path):
    from meduet.errors import MeduetConfigError

    with pytest.raises(MeduetConfigError, match="does not describe models/model.pt"):
        package_bundle(REPO / "bundles/meduet_seg", tmp_path, preset="demo", models=seg_trained / "models")
    assert not list(tmp_path.iterdir())


def test_files_of_the_bundles_own_large_files_yml_are_not_shipped(tmp_path):
    """A MAISI autoencoder fetched into meduet_vae/models by download_large_files stays out of the zip; the packaged
    large_files.yml still points users at its source."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"trained weights")
    (models / "autoencoder_epoch273.pt").write_bytes(b"MAISI's weights, fetched from its own address")
    z = package_bundle(REPO / "bundles/meduet_vae", tmp_path / "dist", preset="tiny", models=models, check=False)
    with zipfile.ZipFile(z) as zf:
        names = set(zf.namelist())
        listed = yaml.safe_load(zf.read("meduet_vae/large_files.yml"))["large_files"]
        manifest = zf.read(f"meduet_vae/{MANIFEST}").decode()
    assert "meduet_vae/models/model.pt" in names
    assert "meduet_vae/models/autoencoder_epoch273.pt" not in names and "autoencoder_epoch273" not in manifest
    assert [e["path"] for e in listed] == ["models/autoencoder_epoch273.pt"]


def _download(name: str, url: str, where: Path) -> Path:
    clean("monai.bundle", "download", "--name", name, "--url", url, "--bundle_dir", str(where), cwd=where)
    return where / name


def test_chain_from_downloads_in_a_clean_interpreter(dist, server, tiny_data, seg_trained, tmp_path):
    """Into an empty folder: download the four bundles, then VAE encode -> pretrain extract -> diffusion sample ->
    segmentation of the generated volumes, and monai.bundle.load, using only the downloaded folders."""
    _, url = server
    work = tmp_path / "work"
    work.mkdir()
    zips = {name: f"{url}/{next(dist.glob(f'{name}_v*.zip')).name}" for name in BUNDLES}
    # meduet_seg with the CLI; in one more interpreter (where the repository is not importable): the other three
    # with the same function the CLI calls, then meduet_seg's large file
    b = {"meduet_seg": _download("meduet_seg", zips["meduet_seg"], work)}
    assert not (b["meduet_seg"] / "models/model.pt").exists()  # a large file: fetched by MONAI with its hash
    code = ("import importlib.util, monai.bundle as mb; assert importlib.util.find_spec('meduet') is None; "
            + "; ".join(f"mb.download(name={n!r}, url={zips[n]!r}, bundle_dir={str(work)!r}, progress=False)"
                        for n in BUNDLES if n != "meduet_seg")
            + f"; mb.download_large_files(bundle_path={str(b['meduet_seg'])!r})")
    proc = subprocess.run([sys.executable, "-c", EXEC, str(REPO / "common"), code], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b.update({n: work / n for n in BUNDLES if n != "meduet_seg"})
    phantoms = str(tiny_data / "phantoms")
    clean("monai.bundle", "run", "--config_file", "configs/encode.yaml", "--dataset_dir", phantoms,
          cwd=b["meduet_vae"])
    latents = b["meduet_vae"] / "latents/phantoms/datalist.json"
    assert json.loads(latents.read_text())["training"]
    clean("monai.bundle", "run", "--config_file", "configs/extract.yaml", cwd=b["meduet_pretrain"])
    assert list((b["meduet_pretrain"] / "embeddings/phantoms").glob("*"))
    clean("monai.bundle", "run", "--config_file", "configs/inference.json",  # default: ../meduet_vae's latents
          "--num_per_site", "1", "--num_steps", "3", "--sites", "['site0']", cwd=b["meduet_diffusion"])
    samples = sorted((b["meduet_diffusion"] / "eval/inference").glob("*.nii.gz"))
    assert len(samples) == 1
    inputs = repr([{"image": str(p)} for p in samples])
    clean("monai.bundle", "run", "--config_file", "configs/inference.json", "--input_data", inputs,
          "--write_dicom_seg", "False", cwd=b["meduet_seg"])
    seg = b["meduet_seg"] / "eval/inference" / samples[0].name.replace(".nii.gz", "_seg.nii.gz")
    img, lab = nib.load(samples[0]), nib.load(seg)
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj))) <= set(range(5))
    # meduet_recon: a measurement file of a test phantom, reconstructed by the downloaded DisINR
    clean("monai.bundle", "run", "--config_file", "configs/simulate.yaml", "--dataset_dir", phantoms,
          "--image_size", "[16, 16, 16]", cwd=b["meduet_recon"])
    clean("monai.bundle", "run", "--config_file", "configs/reconstruct.yaml", "--iterations", "3", cwd=b["meduet_recon"])
    assert list((b["meduet_recon"] / "eval/reconstruct").glob("*.nii.gz"))
    # every bundle ran its own vendored library, verified once
    for name, root in b.items():
        assert (root / ".meduet_verified").is_file(), name
    # monai.bundle.load on the downloaded folder gives the trained network
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, monai.bundle, meduet; "
            f"assert meduet.__file__.startswith({str(b['meduet_seg'])!r}), meduet.__file__; "
            f"net = monai.bundle.load('meduet_seg', bundle_dir={str(work)!r}, workflow_type='inference', "
            "device='cpu').eval(); "
            f"torch.save(net(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", EXEC, str(REPO / "common"), code], cwd=b["meduet_seg"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, MEDUET_PROGRESS="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from meduet import records

    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), records.load(seg_trained / "models/model.pt", expect="meduet_seg")(x))


def _rewrite_zip(src: Path, dst: Path, member: str, change) -> None:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            zo.writestr(info, change(data) if info.filename.endswith(member) else data)


def test_tampered_or_corrupted_zip_is_refused(dist, server, tiny_data, tmp_path):
    www, url = server
    good = next(dist.glob("meduet_vae_v*.zip"))
    published = sha256_file(good)
    # a file changed inside an otherwise valid zip: monai.bundle download takes it, the first use refuses it
    _rewrite_zip(good, www / "tampered.zip", "configs/inference.json",
                 lambda d: d.replace(b'"data_split": "test"', b'"data_split": "training"'))
    work = tmp_path / "a"
    work.mkdir()
    root = _download("meduet_vae", f"{url}/tampered.zip", work)
    proc = clean("monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                 str(tiny_data / "phantoms"), cwd=root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "failed its checksum check: configs/inference.json differs" in last, proc.stderr[-2000:]
    assert not (root / "eval").exists() and not (root / ".meduet_verified").exists()
    # a corrupted zip: the download itself fails and nothing can run
    data = bytearray(good.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    (www / "corrupt.zip").write_bytes(bytes(data))
    work = tmp_path / "b"
    work.mkdir()
    proc = clean("monai.bundle", "download", "--name", "meduet_vae", "--url", f"{url}/corrupt.zip", "--bundle_dir",
                 str(work), cwd=work, check=False)
    if proc.returncode == 0:  # the damage hit a member zipfile does not check: the manifest refuses it at first use
        proc = clean("monai.bundle", "run", "--config_file", "configs/inference.json", cwd=work / "meduet_vae",
                     check=False)
        assert "failed its checksum check" in proc.stderr
    assert proc.returncode != 0
    # with the published sha256, MONAI refuses the tampered zip before extracting anything
    from monai.apps import download_and_extract

    out = tmp_path / "c"
    with pytest.raises(Exception, match="sha256 hash check of downloaded file failed"):
        download_and_extract(f"{url}/tampered.zip", filepath=str(tmp_path / "t.zip"), output_dir=str(out),
                             hash_val=published, hash_type="sha256", progress=False)
    assert not out.exists() or not any(out.iterdir())
