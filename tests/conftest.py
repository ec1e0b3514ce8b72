"""Shared fixtures: tiny sample data made once per session, and running bundle workflows as users do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MEDUET_PROGRESS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


class _ForkRuns:
    """``python -m monai.bundle <args>`` as forks of one helper that imported torch and MONAI once
    (``meduet.forkrun``; 10-15 s per fresh interpreter on the 2-core CI machines): same arguments, working folder,
    environment, exit status and output as the subprocess, each run in its own process group (timeouts)."""

    def __init__(self):
        self.runner = None
        self.log = Path(tempfile.gettempdir()) / f"meduet_forkrun_{os.getpid()}.log"

    def close(self) -> None:
        """Stop the helper; its log stays only if the helper wrote something to it (a crash to look at)."""
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.log.exists() and self.log.stat().st_size == 0:
            self.log.unlink()

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        from meduet.forkrun import ForkRunner

        if self.runner is None:
            self.runner = ForkRunner(log=self.log)
        fd_out, out = tempfile.mkstemp(prefix="bundle_out_")
        fd_err, err = tempfile.mkstemp(prefix="bundle_err_")
        os.close(fd_out)
        os.close(fd_err)
        try:
            rc, timed_out = self.runner.run(cmd[1:], cwd=cwd, env=env, stdout=out, stderr=err, timeout=timeout,
                                            new_session=True)
            stdout, stderr = Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
        finally:
            os.unlink(out)
            os.unlink(err)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


_FORK_RUNS = _ForkRuns()


def pytest_sessionfinish(session, exitstatus):
    _FORK_RUNS.close()


def bundle_run(bundle: str, workflow: str, *overrides: str, run_id: str | None = None, preset: str = "tiny",
               extra_configs: tuple[str, ...] = (), timeout: float = 600, check: bool = True,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file [workflow, *extra, preset] <overrides>`` from the repo root:
    a fork of the ``meduet.forkrun`` helper, or a fresh subprocess with a ``launcher`` (torchrun) or when
    ``MEDUET_FRESH_PROCESS=1``."""
    cfg_dir = f"bundles/{bundle}/configs"
    ext = "json" if workflow == "inference" or (REPO / cfg_dir / f"{workflow}.json").is_file() else "yaml"
    files = [f"{cfg_dir}/{workflow}.{ext}", *(f"{cfg_dir}/{c}.yaml" for c in extra_configs)]
    if preset:
        files.append(f"{cfg_dir}/presets/{preset}.yaml")
    cmd = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    cmd += ["--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]", *overrides]
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")
    from meduet.forkrun import fresh_process_requested

    if launcher is None and not fresh_process_requested():
        proc = _FORK_RUNS.run(cmd, cwd=REPO, env=env, timeout=timeout)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def one_line_error(fn, *words: str, error: type = Exception) -> str:
    """Call ``fn``, which must raise ``error`` with a one-line message holding a fix after ``"; "`` and every word
    of ``words``; returns the message."""
    with pytest.raises(error) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "; " in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def torchrun_launcher(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` local processes and a free port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Phantoms of 32^3, 8 subjects, 4 sites (one held out), a longitudinal cohort of 4 subjects x 3 visits, and the
    32^3 MNI152 brain."""
    from meduet.data.sample import main

    out = tmp_path_factory.mktemp("sample")
    assert main(["--out", str(out), "--size", "32", "--subjects", "8", "--sites", "4", "--brain-size", "32",
                 "--longitudinal-subjects", "4", "--visits", "3"]) == 0
    return out


def mlflow_args(root: Path) -> list[str]:
    """``--tracking mlflow`` into a file store at ``<root>/mlruns`` (read by tests/bundles/test_tracking.py, which is skipped
    without mlflow, the ``tracking`` extra)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        return []
    return ["--tracking", "mlflow", "--tracking_dir", (root / "mlruns").as_uri()]


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory, tiny_data) -> Path:
    """meduet_vae's bundle root after one tiny training run (3 epochs) and decoder fine-tuning; shared by the VAE
    bundle tests and the downstream stages. Tests must not modify its models/."""
    root = tmp_path_factory.mktemp("vae_bundle")
    data = ["--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms")]
    bundle_run("meduet_vae", "train", *data, "--max_epochs", "3", *mlflow_args(root), run_id="training")
    bundle_run("meduet_vae", "train_decoder", *data, *mlflow_args(root), run_id="training")
    return root


@pytest.fixture(scope="session")
def tiny_latents(tiny_vae, tiny_data) -> Path:
    """The latent datalist of the tiny phantoms encoded by ``tiny_vae`` (meduet_vae encode.yaml)."""
    out = tiny_vae / "latents_shared"
    bundle_run("meduet_vae", "encode", "--bundle_root", str(tiny_vae), "--dataset_dir", str(tiny_data / "phantoms"),
               "--latent_dir", str(out))
    return out / "datalist.json"


@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory, tiny_latents) -> Path:
    """meduet_pretrain's bundle root with a tiny MeDUET (models/model.pt: its encoder; models/training_network.pt:
    the whole network) and its masked-autoencoder baseline (models/baseline_mae/), trained on ``tiny_latents``. The
    MeDUET run switches on the site-eraser option (off by default, not in the paper) so that its tests and the
    report's ``stored eraser`` row have one. Tests must not modify its models/."""
    root = tmp_path_factory.mktemp("pretrain")
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--content_eraser#enabled", "True", *mlflow_args(root), run_id="training")
    bundle_run("meduet_pretrain", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               run_id="training", extra_configs=("mae_baseline",))
    return root


@pytest.fixture(scope="session")
def seg_trained(tmp_path_factory, tiny_data, tiny_vae, tiny_pretrain) -> Path:
    """A meduet_seg bundle root trained at the tiny preset (half of the labelled cases), shared by the seg and
    MONAI Label tests."""
    root = tmp_path_factory.mktemp("seg")
    bundle_run("meduet_seg", "train", "--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms"),
               "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt",
               str(tiny_pretrain / "models/model.pt"), "--label_fraction", "0.5", *mlflow_args(root), run_id="training")
    return root


@pytest.fixture(scope="session")
def sit_factors(tmp_path_factory, tiny_latents, tiny_pretrain) -> Path:
    """meduet_diffusion's bundle root with a SiT (rectified flow) conditioned on the tiny MeDUET's factors, 2 tiny
    epochs, with its factor prior; shared by the diffusion and packaging tests. Tests must not modify its models/."""
    root = tmp_path_factory.mktemp("diffusion")
    bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"), *mlflow_args(root), run_id="training")
    return root


@pytest.fixture(scope="session")
def recon_trained(tmp_path_factory, tiny_data) -> Path:
    """A meduet_recon bundle root pretrained (DisINR, MRI x4) at the tiny preset on the tiny phantoms' training
    split, 2 epochs; shared by the recon and packaging tests. Tests must not modify its models/."""
    root = tmp_path_factory.mktemp("recon")
    bundle_run("meduet_recon", "train", "--bundle_root", str(root), "--dataset_dir", str(tiny_data / "phantoms"),
               *mlflow_args(root), run_id="training")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny torch ops on one thread: on a shared 2-core machine, OpenMP contention makes each
    tiny op milliseconds slower with two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_ct_slice(path: Path, pixels, *, uids: tuple[str, str, str], position, row_dir, col_dir,
                   pixel_spacing, thickness: float, instance: int) -> str:
    """Write one CT slice with pydicom. ``pixels`` (rows, columns) int16-able; ``uids`` = (study, series, frame of
    reference); ``row_dir`` / ``col_dir``: ImageOrientationPatient's two directions (of increasing column index, of
    increasing row index); ``pixel_spacing`` = (between rows, between columns). Returns the SOP instance UID."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P1", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20260101", "000000", "1", "", "")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, int(instance), "test"
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
    ds.PixelSpacing, ds.SliceThickness = [float(v) for v in pixel_spacing], float(thickness)
    pixels = np.ascontiguousarray(np.asarray(pixels).astype(np.int16))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop


def write_ct_series(volume, folder: Path, spacing=(1.5, 1.5, 1.5)) -> Path:
    """Write ``volume`` (X, Y, Z in HU) as a CT DICOM series with pydicom: slice k holds ``volume[:, :, k]`` with
    rows along Y and columns along X (ImageOrientationPatient 1,0,0 / 0,1,0), positions 0, dz, 2 dz, ..."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    nz = volume.shape[2]
    for k in range(nz):
        write_ct_slice(folder / f"slice{k:03d}.dcm", volume[:, :, k].T, uids=uids, position=(0.0, 0.0, k * spacing[2]),
                       row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0), pixel_spacing=(spacing[1], spacing[0]),
                       thickness=spacing[2], instance=nz - k)
    return folder


def kill_at_save(tmp_path: Path, bundle: str, epoch: int) -> str:
    """An extra config for ``bundle_run``: the run SIGKILLs itself right before it writes the checkpoint of ``epoch``
    (that epoch trained and logged, ``checkpoint.pt`` still the previous epoch's; nothing of the run's own clean-up
    runs), through the ``before_save`` hook of train.yaml's ``TrainingCheckpointer``."""
    import yaml

    handlers = yaml.safe_load((REPO / "bundles" / bundle / "configs/train.yaml").read_text())["train"]["handlers"]
    i = next(i for i, h in enumerate(handlers) if h["_target_"].endswith("TrainingCheckpointer"))
    kill = tmp_path / "kill_at_save.yaml"
    kill.write_text("+imports: ['$import signal']\n"
                    f"train#handlers#{i}#before_save: \"$lambda engine: os.kill(os.getpid(), signal.SIGKILL) "
                    f"if engine.state.epoch == {epoch} else None\"\n")
    return os.path.relpath(kill.with_suffix(""), REPO / "bundles" / bundle / "configs")


def run_killed_at_save(bundle: str, root: Path, tmp_path: Path, *args: str) -> None:
    """Run ``bundle``'s train.yaml (``args``, ``--bundle_root root``) so that it SIGKILLs itself before writing epoch
    2's checkpoint (``kill_at_save``), and check it died that way with epoch 1's checkpoint left behind."""
    from meduet.engines.checkpoint import load_checkpoint

    killed = bundle_run(bundle, "train", "--bundle_root", str(root), *args, run_id="training", check=False,
                        extra_configs=(kill_at_save(tmp_path, bundle, epoch=2),))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_checkpoint(root / "models/checkpoint.pt")["engine"]["epoch"] == 1


def assert_same(a, b, where: str) -> None:
    """The same keys at every level, every tensor bit for bit (dtype included), every other value equal."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
