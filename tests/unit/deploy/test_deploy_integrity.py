"""The packaged-bundle check (meduet.integrity, python -m meduet.deploy.verify) on a tiny bundle packaged by the real
``package_bundle``: files changed or added after a first successful check are refused, whatever ``meduet`` is
imported; what this library's own checkpoint writer puts there, and files outside the code folders, are accepted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO
from meduet import integrity, records
from meduet.deploy.package import package_bundle, undeclared_imports
from meduet.engines.checkpoint import atomic_save
from meduet.integrity import STAMP, BundleIntegrityError, sha256_file

CONFIG = {
    "imports": ["$import os", "$import meduet", "$import meduet.records"],
    "bundle_root": "bundles/meduet_tiny",
    "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
    "record": "$meduet.records.read(@ckpt_path, 'meduet_seg')[1]",
    "run": ["$print('MEDUET', meduet.__file__)", "$meduet.records.require(@ckpt_path, 'meduet_seg')",
            "$print('RECORD', @record['kind'])"],
}


def _weights(value: float) -> dict:
    record = records.encode({"kind": "meduet_seg", "architecture": {"channels": 2}})
    return {"w": torch.full((2,), value), "_extra_state": record}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """A tiny bundle (one workflow config, a script, a model.pt with a record) packaged by ``package_bundle``."""
    src = tmp_path_factory.mktemp("src") / "meduet_tiny"
    (src / "configs").mkdir(parents=True)
    (src / "scripts").mkdir()
    (src / "models").mkdir()
    meta = json.loads((REPO / "bundles/meduet_seg/configs/metadata.json").read_text())
    # declares what the vendored library imports (test_deploy_package checks the real bundles' declarations)
    meta["required_packages_version"].update({m: "0" for m in undeclared_imports(REPO / "common/meduet", meta)})
    (src / "configs/metadata.json").write_text(json.dumps(meta))
    (src / "configs/inference.json").write_text(json.dumps(CONFIG, indent=4))
    (src / "scripts/helper.py").write_text("VALUE = 1\n")
    (src / "LICENSE").write_text("tiny\n")
    torch.save(_weights(1.0), src / "models/model.pt")
    return package_bundle(src, tmp_path_factory.mktemp("dist"), check=False)


@pytest.fixture
def bundle(packaged, tmp_path) -> Path:
    """A fresh extraction of the packaged zip, verified once (so its stamp is there)."""
    with zipfile.ZipFile(packaged) as zf:
        zf.extractall(tmp_path / "downloaded")
    root = tmp_path / "downloaded/meduet_tiny"
    assert integrity.verify_bundle(root) > 0 and (root / STAMP).is_file()
    return root


def _refused(root: Path, match: str) -> None:
    with pytest.raises(BundleIntegrityError, match=match):
        integrity.check_bundle(root)
    assert not integrity.skipped()


@pytest.mark.parametrize("rel", ["configs/extra.yaml", "meduet/extra.py", "meduet/networks/extra.py",
                                 "scripts/extra.py"])
def test_an_added_file_under_a_code_folder_is_refused_after_the_stamp(bundle, rel):
    (bundle / rel).write_text("print('not published')\n")
    _refused(bundle, f"failed its checksum check: {rel} is not part of the published bundle;")
    with pytest.raises(BundleIntegrityError, match=f"{rel} is not part of the published bundle"):
        records.read(bundle / "models/model.pt")


def test_a_changed_config_is_refused_after_the_stamp_even_with_its_size_and_mtime_restored(bundle):
    cfg = bundle / "configs/inference.json"
    st = cfg.stat()
    cfg.write_bytes(cfg.read_bytes().replace(b"meduet_seg", b"meduet_sag"))
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))  # what unzip or touch -r can do: the ctime still changed
    assert cfg.stat().st_size == st.st_size and cfg.stat().st_mtime_ns == st.st_mtime_ns
    _refused(bundle, r"configs/inference.json differs from the published file; .* --accept \(or set "
                     r"MEDUET_SKIP_INTEGRITY=1\)")


def test_a_changed_weight_file_is_refused_through_records_read_with_the_installed_meduet(bundle):
    # the repository's meduet, not the bundle's vendored copy: the check does not depend on which one is imported
    assert Path(records.__file__).resolve().is_relative_to(REPO / "common")
    assert records.read(bundle / "models/model.pt", "meduet_seg")[1]["kind"] == "meduet_seg"
    torch.save(_weights(2.0), bundle / "models/model.pt")  # not through this library's checkpoint writer
    for load in (lambda p: records.read(p, "meduet_seg"), lambda p: records.require(p, "meduet_seg"),
                 lambda p: records.read_state_dict(p, "weights", "")):
        with pytest.raises(BundleIntegrityError, match="models/model.pt differs from the published file"):
            load(bundle / "models/model.pt")
    _refused(bundle, "models/model.pt differs")  # and the stamp was not refreshed by the refusals
    # a new stamp cannot be had by deleting the old one
    (bundle / STAMP).unlink()
    _refused(bundle, "models/model.pt differs")


def test_model_pt_written_by_atomic_save_into_a_verified_bundle_is_accepted(bundle):
    model = bundle / "models/model.pt"
    atomic_save(_weights(3.0), model)  # e.g. fine-tuning inside the downloaded bundle
    assert torch.equal(records.read(model, "meduet_seg")[0]["w"], torch.full((2,), 3.0))
    assert integrity.verify_bundle(bundle) > 0  # a full verification accepts it too (its digest is in the stamp)
    stamp = json.loads((bundle / STAMP).read_text())
    assert stamp["local"] == {"models/model.pt": sha256_file(model)}
    atomic_save(_weights(4.0), model)  # again: the stamp follows
    integrity.check_bundle(bundle)
    torch.save(_weights(5.0), model)  # anything else changing it afterwards is refused
    _refused(bundle, "models/model.pt differs")


def test_atomic_save_into_a_bundle_that_was_not_intact_records_nothing(bundle):
    (bundle / "configs/inference.json").write_text("{}")
    atomic_save(_weights(3.0), bundle / "models/model.pt")
    assert "models/model.pt" not in json.loads((bundle / STAMP).read_text())["local"]
    with pytest.raises(BundleIntegrityError, match=r"configs/inference.json differs .* \(and 1 more\)"):
        integrity.verify_bundle(bundle)


def test_unlisted_files_outside_the_code_folders_and_pycache_are_accepted(bundle):
    (bundle / "runs").mkdir()
    (bundle / "runs/events.out").write_text("tensorboard")
    (bundle / "eval").mkdir()
    (bundle / "eval/metrics.json").write_text("{}")
    atomic_save({"engine": {"epoch": 1}}, bundle / "models/checkpoint.pt")
    torch.save(_weights(6.0), bundle / "models/model_stage1.pt")
    (bundle / "meduet/__pycache__").mkdir(exist_ok=True)
    (bundle / "meduet/__pycache__/records.cpython-311.pyc").write_bytes(b"\0")
    (bundle / "scripts/__pycache__").mkdir()
    (bundle / "scripts/__pycache__/helper.cpython-311.pyc").write_bytes(b"\0")
    integrity.check_bundle(bundle)
    assert integrity.verify_bundle(bundle) > 0
    assert records.read(bundle / "models/model.pt")[1]["kind"] == "meduet_seg"


def test_skip_env_skips_every_check(bundle, monkeypatch):
    torch.save(_weights(7.0), bundle / "models/model.pt")
    (bundle / "configs/extra.yaml").write_text("x: 1\n")
    monkeypatch.setenv("MEDUET_SKIP_INTEGRITY", "1")
    assert integrity.check_path(bundle / "models/model.pt") is None
    integrity.check_bundle(bundle)
    assert torch.equal(records.read(bundle / "models/model.pt")[0]["w"], torch.full((2,), 7.0))
    monkeypatch.setenv("MEDUET_SKIP_INTEGRITY", "0")
    with pytest.raises(BundleIntegrityError, match=r"models/model.pt differs from the published file \(and 1 more\)"):
        records.read(bundle / "models/model.pt")


def _verify(*args: str, cwd: Path | None = None, module: str = "meduet.deploy.verify") -> tuple[int, list[str]]:
    env = dict(os.environ)
    env.pop("MEDUET_SKIP_INTEGRITY", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()


def test_the_verify_command(bundle, packaged, tmp_path):
    published = sha256_file(packaged)
    rc, out = _verify(str(bundle))
    assert rc == 0 and len(out) == 1 and "files match checksums.sha256, none unlisted" in out[0], out
    rc, out = _verify("--zip", str(packaged), "--sha256", published)  # before extracting
    assert rc == 0 and out == [f"{packaged.name} has the published sha256"], out
    rc, out = _verify(str(bundle), "--zip", str(packaged), "--sha256", f"{published}  {packaged.name}")
    assert rc == 0 and len(out) == 1 and out[0].endswith(f"; {packaged.name} has the published sha256"), out
    # a zip rewritten together with its manifest passes the manifest check, not the published sha256
    bad = tmp_path / packaged.name
    with zipfile.ZipFile(packaged) as zi, zipfile.ZipFile(bad, "w") as zo:
        meta = zi.read("meduet_tiny/configs/metadata.json")
        old, new = (hashlib.sha256(m).hexdigest() for m in (meta, meta + b" "))
        for info in zi.infolist():
            data = zi.read(info)
            if info.filename.endswith("configs/metadata.json"):
                data += b" "
            elif info.filename.endswith("checksums.sha256"):
                data = data.replace(old.encode(), new.encode())
            zo.writestr(info, data)
    with zipfile.ZipFile(bad) as zf:
        zf.extractall(tmp_path / "rewritten")
    assert integrity.verify_bundle(tmp_path / "rewritten/meduet_tiny") > 0  # what the manifest cannot catch
    rc, out = _verify("--zip", str(bad), "--sha256", published)
    assert rc == 1 and len(out) == 1 and f"not the published {published}" in out[0], out
    rc, out = _verify(str(bundle), "--zip", str(bad), "--sha256", "0" * 64)
    assert rc == 1 and len(out) == 1 and "do not extract it" in out[0], out
    # a folder that was not extracted from the published zip
    (bundle / "checksums.sha256").write_text((bundle / "checksums.sha256").read_text() + "\n")
    rc, out = _verify(str(bundle), "--zip", str(packaged), "--sha256", published)
    assert rc == 1 and len(out) == 1 and "is not the one in" in out[0], out
    rc, out = _verify(str(bundle), "--sha256", published)
    assert rc == 2 and "--zip and --sha256 go together" in out[-1], out


def test_the_verify_command_refuses_changes_and_accepts_ones_own(bundle):
    (bundle / "configs/extra.yaml").write_text("x: 1\n")
    torch.save(_weights(8.0), bundle / "models/model.pt")
    rc, out = _verify(str(bundle))
    assert rc == 1 and len(out) == 1 and "failed its checksum check: models/model.pt differs" in out[0], out
    assert "(and 1 more)" in out[0] and "Traceback" not in out[0]
    rc, out = _verify(str(bundle), module="meduet.deploy.integrity")  # the older entry point: the same command
    assert rc == 1 and len(out) == 1 and "failed its checksum check: models/model.pt differs" in out[0], out
    # from inside the bundle folder it is the vendored copy, whose import check leaves the bundle to the command
    # (so that --accept can run)
    code = "import meduet.deploy.verify as v; print(v.__file__)"  # (the import check is skipped for the command)
    where = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, MEDUET_SKIP_INTEGRITY="1"))
    assert where.stdout.strip() == str(bundle / "meduet/deploy/verify.py"), where.stdout + where.stderr
    rc, out = _verify(".", "--accept", cwd=bundle)
    assert rc == 0 and len(out) == 1 and "2 accepted as your own: models/model.pt, configs/extra.yaml" in out[0], out
    rc, out = _verify(str(bundle))
    assert rc == 0 and "accepted" not in out[0], out
    assert records.read(bundle / "models/model.pt")[1]["kind"] == "meduet_seg"
    (bundle / "configs/extra.yaml").write_text("x: 2\n")  # accepted once is not accepted for any content
    _refused(bundle, "configs/extra.yaml is not part of the published bundle")


_PREIMPORTED = ("import sys, runpy, meduet; sys.argv = ['monai.bundle', *sys.argv[1:]]; "
                "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("meduet_first", [True, False], ids=["installed_meduet", "plain_cli"])
def test_monai_bundle_run_from_outside_the_folder_refuses_a_changed_model(bundle, tmp_path, meduet_first):
    """``monai.bundle run --bundle_root`` from another folder. With the installed meduet imported first (the
    issue's bypass: a program, notebook or server that imported it), the vendored copy never runs, and the first
    checkpoint read (``records.require``) checks the bundle; plain, MONAI puts the bundle on ``sys.path`` when it
    runs and the vendored copy refuses on import. Either way: non-zero exit, the file named on the last line."""
    args = ["run", "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle)]
    cmd = [sys.executable, "-c", _PREIMPORTED, *args] if meduet_first else [sys.executable, "-m", "monai.bundle", *args]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.pop("MEDUET_SKIP_INTEGRITY", None)
    torch.save(_weights(9.0), bundle / "models/model.pt")
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0 and "RECORD" not in out, out[-3000:]
    assert "models/model.pt differs from the published file" in out.splitlines()[-1], out[-3000:]
    assert out.splitlines()[-1].startswith("BundleIntegrityError: ") and "Traceback" not in out, out[-3000:]
    if meduet_first:
        assert f"MEDUET {REPO / 'common/meduet/__init__.py'}" in out, out[-3000:]
