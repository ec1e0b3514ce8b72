"""apps/meduet_seg_app: meduet_seg as a MONAI Deploy application (MONAI Deploy App SDK 4.0.0, Holoscan on CPU).

The app lives in its own virtualenv (``make deploy-setup``, pins in DEVELOPERS.md); these tests run its interpreter
as a subprocess on DICOM series written here, with the tiny trained meduet_seg packaged as users get it (the zip).
Skipped only where ``.venv-deploy`` does not exist, ``MEDUET_DEPLOY_PYTHON`` is unset and ``make test`` did not ask
for it (``MEDUET_REQUIRE_DEPLOY=1``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from conftest import REPO, bundle_run, write_ct_series

APP = REPO / "apps" / "meduet_seg_app" / "app.py"


@pytest.fixture(scope="module")
def deploy_python() -> str:
    venv = REPO / ".venv-deploy"
    override = os.environ.get("MEDUET_DEPLOY_PYTHON")
    py = override or str(venv / "bin" / "python")
    if not override and not venv.exists():
        if os.environ.get("MEDUET_REQUIRE_DEPLOY") == "1":
            pytest.fail(f"MONAI Deploy's virtualenv is missing ({venv}) although `make test` builds it")
        pytest.skip(f"MONAI Deploy's virtualenv is not installed ({venv}); `make deploy-setup` builds it")
    probe = subprocess.run([py, "-c", "import monai.deploy.core, holoscan"], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, f"{py} cannot import the MONAI Deploy App SDK: {probe.stderr.strip()[-500:]}"
    return py


def run_app(py: str, *args: str, timeout: float = 300, app: Path = APP, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The app as a user runs it (``python app.py``), with the stack size Holoscan wants; ``env`` is added to the
    environment (whose ``HOLOSCAN_*`` variables are dropped first)."""
    cmd = [py, str(app)]
    full = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_") and k != "PYTHONPATH"}
    full.update(MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(["bash", "-c", 'ulimit -s 32768 && exec "$@"', "bash", *cmd, *args], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=cwd)


@pytest.fixture(scope="module")
def bundle_zip(seg_trained, tmp_path_factory) -> Path:
    from meduet.deploy.package import package_bundle

    return package_bundle(REPO / "bundles" / "meduet_seg", tmp_path_factory.mktemp("dist"), preset="tiny",
                          models=seg_trained / "models")


@pytest.fixture(scope="module")
def volume(tiny_data) -> np.ndarray:
    item = json.loads((tiny_data / "phantoms/datalist.json").read_text())["test"][0]
    return np.asarray(nib.load(tiny_data / "phantoms" / item["image"]).dataobj)


def write_series(vol: np.ndarray, folder: Path, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL") -> Path:
    """A CT series (conftest.write_ct_series) whose instances carry ``ImageType`` and share one study."""
    write_ct_series(vol, folder)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.ImageType = image_type.split("\\")
        ds.save_as(f, enforce_file_format=True)
    return folder


def same_study(folder: Path, study_uid: str) -> None:
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.save_as(f, enforce_file_format=True)


@pytest.fixture(scope="module")
def reference(seg_trained, volume, tmp_path_factory) -> tuple[Path, Path]:
    """The series through our own inference.json (``monai.bundle run``, the main virtualenv): (series, NIfTI)."""
    root = tmp_path_factory.mktemp("ref")
    series = write_series(volume, root / "study" / "ct")
    out = root / "out"
    bundle_run("meduet_seg", "inference", "--bundle_root", str(seg_trained), "--output_dir", str(out),
               "--input_data", f"[{{'image': '{series}'}}]", "--write_dicom_seg", "False")
    (nifti,) = list(out.glob("*_seg.nii.gz"))
    return series, nifti


def check_outputs(out: Path, series: Path, ref_nifti: Path) -> None:
    """One SEG readable by highdicom that references ``series`` with frames on the right slices, one NIfTI; both
    carry the labels our inference.json gives on the same series."""
    import highdicom as hd

    from meduet.data.dicom import label_frames, read_series

    segs, niftis = sorted(out.glob("*.dcm")), sorted(out.glob("*.nii.gz"))
    assert len(segs) == 1 and len(niftis) == 1, sorted(p.name for p in out.iterdir())
    source = read_series(series)
    ref = nib.load(ref_nifti)
    expected = label_frames(np.asarray(ref.dataobj), ref.affine, source)
    lab = nib.load(niftis[0])
    np.testing.assert_array_equal(label_frames(np.asarray(lab.dataobj), lab.affine, source), expected)
    assert (expected > 0).any()
    seg = hd.seg.segread(segs[0])
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {source[0].SeriesInstanceUID}
    meta = json.loads((REPO / "bundles/meduet_seg/configs/metadata.json").read_text())
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    codes = meta["label_codes"]
    by_number = {d.SegmentNumber: d for d in seg.SegmentSequence}
    sop_uids = [ds.SOPInstanceUID for ds in source]
    for k in range(1, len(names)):
        d = by_number[k]  # the SDK writer numbers segments by label value
        assert d.SegmentLabel == names[str(k)]
        assert d.SegmentDescription == codes[names[str(k)]].get("description", names[str(k)])[:64].rstrip()
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes[names[str(k)]]["type"][0]
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes[names[str(k)]]["category"][0]
        if not (expected == k).any():
            continue
        mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[k],
                                                 assert_missing_frames_are_empty=True)[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), expected == k)


def test_app_segments_a_series_like_inference_json(deploy_python, bundle_zip, reference, tmp_path):
    """``python app.py -i -o -m <zip>``: SEG + NIfTI equal to inference.json's labels."""
    series, ref_nifti = reference
    out = tmp_path / "out"
    proc = run_app(deploy_python, "-i", str(series.parent), "-o", str(out), "-m", str(bundle_zip))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_outputs(out, series, ref_nifti)


def test_rules_pick_the_primary_series_of_two(deploy_python, bundle_zip, reference, volume, tmp_path):
    """A study with a derived (SECONDARY) series beside the original one: the rules pick the original."""
    series, ref_nifti = reference
    study = tmp_path / "study"
    derived = write_series(volume[::-1].copy(), study / "a_derived", image_type="DERIVED\\SECONDARY\\AXIAL")
    shutil.copytree(series, study / "b_original")
    same_study(derived, pydicom.dcmread(next(series.glob("*.dcm"))).StudyInstanceUID)
    out = tmp_path / "out"
    proc = run_app(deploy_python, "-i", str(study), "-o", str(out), "-m", str(bundle_zip))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_outputs(out, series, ref_nifti)


def _bad(case: str, volume: np.ndarray, root: Path) -> tuple[Path, str]:
    study = root / "study"
    study.mkdir()
    if case == "empty":
        return study, "empty"
    if case == "no_match":
        write_series(volume[:, :, :4].copy(), study / "short")  # 4 slices < min_slices
        return study, "matches the selection rules"
    series = write_series(volume, study / "ct")
    files = sorted(series.glob("*.dcm"))
    if case == "missing_slice":
        files[len(files) // 2].unlink()
        return study, "slices are missing"
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(files[3], enforce_file_format=True)
    return study, "mixes slice orientations"


@pytest.mark.parametrize("case", ["empty", "no_match", "missing_slice", "mixed_orientation"])
def test_bad_input_is_one_line_and_writes_nothing(deploy_python, bundle_zip, volume, tmp_path, case):
    study, words = _bad(case, volume, tmp_path)
    out = tmp_path / "out"
    proc = run_app(deploy_python, "-i", str(study), "-o", str(out), "-m", str(bundle_zip))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("AppInputError: ") and words in last, last
    assert not out.exists() or not any(out.iterdir())


def test_holoscan_environment_variables_instead_of_arguments(deploy_python, bundle_zip, reference, tmp_path):
    """No -i/-o/-m: the SDK's AppContext reads HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH (how a
    MAP runs the app); same SEG + NIfTI as with arguments."""
    series, ref_nifti = reference
    out = tmp_path / "out"
    proc = run_app(deploy_python, env={"HOLOSCAN_INPUT_PATH": str(series.parent), "HOLOSCAN_OUTPUT_PATH": str(out),
                                       "HOLOSCAN_MODEL_PATH": str(bundle_zip)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_outputs(out, series, ref_nifti)


def _artifacts_manifest(path: Path, holoscan: str) -> Path:
    """A holoscan-cli artifacts manifest (what ``--source`` takes instead of the one the packager downloads) naming
    local placeholder images: nothing is pulled or built here."""
    images = {"dgpu": {"x64-workstation": "local/build:test", "sbsa": "local/build:test"}, "igpu": {},
              "cpu": {"x64-workstation": "local/build:test"}}
    path.write_text(json.dumps({holoscan: {
        "holoscan": {"debian-version": f"{holoscan}.1-1", "wheel-version": holoscan,
                     "base-images": {"dgpu": "local/base:test"}, "build-images": images},
        "health-probes": {arch: "https://invalid.example/probe" for arch in ("linux/amd64", "linux/arm64")}}}))
    return path


def test_map_packaging_stages_an_app_that_runs_as_in_its_container(deploy_python, bundle_zip, reference, tmp_path):
    """`monai-deploy package apps/meduet_seg_app -c app.yaml -t ... --platform x86_64 -m <zip>` (holoscan-cli 4.2.0)
    up to its Docker build (tests/unit/deploy/map_dryrun.py), then the staged app run as the image's entry point runs
    it: app.json's command and environment, with /opt/holoscan and /var/holoscan mapped to the staged build context
    and a work folder. The closest this machine gets to `monai-deploy run <MAP>` (no Docker daemon here)."""
    series, ref_nifti = reference
    ask = "import importlib.metadata as m; print(m.version('holoscan-cu13'))"  # the version the packager detects
    holoscan = subprocess.run([deploy_python, "-c", ask], capture_output=True, text=True, timeout=120).stdout.strip()
    stage = tmp_path / "stage"
    app_dir = APP.parent
    proc = subprocess.run(
        [deploy_python, str(Path(__file__).with_name("map_dryrun.py")), str(stage), str(app_dir),
         "-c", str(app_dir / "app.yaml"), "-t", "meduet-seg-app:test", "--platform", "x86_64", "-m", str(bundle_zip),
         "--source", str(_artifacts_manifest(tmp_path / "artifacts.json", holoscan.split("+")[0])),
         "--build-cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "Status:     Succeeded" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    app_json = json.loads((stage / "map" / "app.json").read_text())
    pkg_json = json.loads((stage / "map" / "pkg.json").read_text())
    config = yaml.safe_load((app_dir / "app.yaml").read_text())
    assert json.loads(app_json["command"]) == ["python3", "/opt/holoscan/app"]  # the folder's __main__.py
    assert app_json["sdk"] == "monai-deploy" and app_json["version"] == str(config["application"]["version"])
    assert app_json["input"]["formats"] == config["application"]["input-formats"]
    assert pkg_json["resources"] == config["resources"]
    assert pkg_json["models"] == {bundle_zip.stem: f"/opt/holoscan/models/{bundle_zip.stem}"}
    assert (stage / "models" / bundle_zip.stem / bundle_zip.name).read_bytes() == bundle_zip.read_bytes()
    ours = [ln for ln in (app_dir / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert set(ours) <= set((stage / "pip" / "requirements.txt").read_text().splitlines())
    dockerfile = (stage / "Dockerfile").read_text()
    assert "COPY ./app /opt/holoscan/app" in dockerfile and "COPY ./models  /opt/holoscan/models" in dockerfile
    assert "pip install monai-deploy-app-sdk==4.0.0" in dockerfile

    # the image's files under a root folder, as the Dockerfile's COPY lines place them; its ENV HOLOSCAN_* paths
    # under that root; app.json's command run from its working directory (what the image's entry point does)
    root = tmp_path / "image_root"
    for src, dst in re.findall(r"^COPY\s+\./(\S+)\s+(/\S+)\s*$", dockerfile, re.M):
        target = root / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (stage / src).is_dir() else shutil.copyfile)(stage / src, target)
    env = dict(re.findall(r"^ENV\s+(HOLOSCAN_\w+)=(\S+)\s*$", dockerfile, re.M))

    def local(value: str) -> str:
        return str(root / value.lstrip("/")) if value.startswith("/") else value

    env = {k: local(v) for k, v in env.items()}
    assert {"HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH", "HOLOSCAN_CONFIG_PATH"} <= set(env)
    shutil.copytree(series, Path(env["HOLOSCAN_INPUT_PATH"]) / "ct")  # `monai-deploy run -i` mounts the input here
    app_path = Path(local(json.loads(app_json["command"])[1]))
    proc = run_app(deploy_python, app=app_path, env=env, cwd=Path(local(app_json["workingDirectory"])))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_outputs(Path(env["HOLOSCAN_OUTPUT_PATH"]), series, ref_nifti)
