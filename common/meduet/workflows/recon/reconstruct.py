"""meduet_recon reconstruct.yaml / inference.json: one subject's volume from its measurement file.

In: a measurement file (``.npy`` / ``.npz`` / NIfTI) and its acquisition JSON (``meduet.data.measurements``), the
pretrained ``model.pt`` (kind ``inr``; not needed for ``method: classical``) and optionally the clean volume
(``truth``, a NIfTI on the acquisition's grid, in the units the measurement was simulated from: the ``[0, 1]`` scale
of ``simulate.yaml``). The reconstruction itself is ``meduet.engines.recon_fit`` (``method``: ``disinr`` fits only a
new subject encoder with the shared pair frozen; ``scratch``, ``finetune``, ``classical`` are the baselines).

Out, in ``output_dir``, named ``<measurement name>_<method>``:

* ``.nii.gz``: the volume on the acquisition's grid with its affine (array axes = the acquisition's ``(S1, S2, S3)``);
* ``.json``: the inputs, the method's summary (iterations, seconds, optimised / total parameters, final loss, PSNR,
  SSIM), the loss of every iteration and, with a truth, PSNR/SSIM every ``metric_interval`` iterations;
* ``_convergence.png``: the loss curve (and PSNR with a truth) over the iterations, and orthogonal slices of the
  result (beside the truth if given).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from meduet import records  # noqa: E402
from meduet.data.measurements import Measurement, read_measurement  # noqa: E402
from meduet.engines.recon_fit import FitResult, SubjectFit  # noqa: E402
from meduet.errors import MeduetInputError  # noqa: E402
from meduet.io import atomic_path, removes_partial_outputs, save_nifti, write_json  # noqa: E402
from meduet.workflows.config import WorkflowConfig  # noqa: E402

__all__ = ["Config", "run", "read_truth"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """reconstruct.yaml: the measurement and its acquisition, the checkpoint, the fitting settings (``inferer``,
    a ``SubjectFit``), where the outputs go."""

    measurement: str
    acquisition: str
    output_dir: str
    inferer: SubjectFit
    ckpt_path: str | None = None
    network: Any = None
    truth: str | None = None
    device: str | torch.device = "cpu"


def read_truth(path: str, measurement: Measurement) -> torch.Tensor:
    """The clean volume ``(1, 1, S1, S2, S3)`` from a NIfTI on the acquisition's grid (one-line errors)."""
    try:
        arr = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise MeduetInputError(f"truth file {path} is unreadable ({type(e).__name__}); pass a NIfTI volume or "
                               "--truth null") from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    shape = measurement.acquisition.image_shape
    if arr.shape != tuple(shape):
        raise MeduetInputError(f"truth file {path} has shape {arr.shape} but the acquisition's image_shape is "
                               f"{tuple(shape)}; pass the clean volume on the acquisition's grid (or --truth null)")
    if not np.isfinite(arr).all():
        raise MeduetInputError(f"truth file {path} has NaN/Inf values; replace them or pass --truth null")
    return torch.from_numpy(arr)[None, None]


def _network(cfg: Config, measurement: Measurement) -> torch.nn.Module | None:
    if cfg.inferer.method == "classical":
        return None
    if cfg.ckpt_path is None and cfg.network is None:
        raise MeduetInputError(f"method '{cfg.inferer.method}' needs the pretrained network; pass --ckpt_path "
                               "(meduet_recon's models/model.pt) or --method classical")
    if cfg.network is not None:
        net = cfg.network
    else:
        records.require(cfg.ckpt_path, "meduet_recon")
        net = records.load(cfg.ckpt_path, cfg.device, expect="inr")
    trained_on = (net.meta or {}).get("modality")
    modality = measurement.acquisition.modality
    if trained_on is not None and trained_on != modality:
        raise MeduetInputError(f"measurement {measurement.path} is {modality} but the checkpoint "
                               f"{cfg.ckpt_path or 'network'} was pretrained on {trained_on} measurements; pass a "
                               f"meduet_recon model.pt trained with --modality {modality} (or --method classical)")
    return net.to(cfg.device)


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    s1, s2, s3 = volume.shape
    return [volume[:, :, s3 // 2].T, volume[:, s2 // 2, :].T, volume[s1 // 2, :, :].T]


def save_convergence(path: str, result: FitResult, title: str, truth: torch.Tensor | None) -> None:
    """The loss (log scale) and PSNR curves over the iterations, and orthogonal slices of the result (and truth)."""
    rows = [("result", result.image[0, 0].numpy())] + ([("truth", truth[0, 0].numpy())] if truth is not None else [])
    fig, axes = plt.subplots(1 + len(rows), 3, figsize=(10, 3.2 * (1 + len(rows))), squeeze=False)
    ax = axes[0, 0]
    if result.losses:
        ax.semilogy(np.arange(1, len(result.losses) + 1), result.losses)
    ax.set(title="measurement loss", xlabel="iteration")
    ax = axes[0, 1]
    if result.metrics:
        its = [m["iteration"] for m in result.metrics]
        ax.plot(its, [m["psnr"] for m in result.metrics], marker="o")
        axes[0, 2].plot(its, [m["ssim"] for m in result.metrics], marker="o")
    ax.set(title="PSNR (dB)" if result.metrics else "PSNR (no truth given)", xlabel="iteration")
    axes[0, 2].set(title="SSIM" if result.metrics else "SSIM (no truth given)", xlabel="iteration")
    lo, hi = (float(truth.min()), float(truth.max())) if truth is not None else (
        float(result.image.min()), float(result.image.max()))
    for r, (name, vol) in enumerate(rows, start=1):
        for c, sl in enumerate(_slices(vol)):
            axes[r, c].imshow(sl, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
            axes[r, c].set_title(f"{name}: {('S3', 'S2', 'S1')[c]} mid-slice")
            axes[r, c].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _name(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Reconstruct the measurement and write the NIfTI, the JSON report and the convergence plot; returns the
    report."""
    cfg = config
    measurement = read_measurement(cfg.measurement, cfg.acquisition)
    truth = read_truth(cfg.truth, measurement) if cfg.truth else None
    network = _network(cfg, measurement)
    torch.manual_seed(int(cfg.inferer.seed))
    result = cfg.inferer(measurement, network, truth=truth)
    acq = measurement.acquisition
    stem = os.path.join(cfg.output_dir, f"{_name(cfg.measurement)}_{cfg.inferer.method}")
    report = {
        "measurement": os.path.abspath(cfg.measurement), "acquisition": acq.to_json(),
        "checkpoint": os.path.abspath(cfg.ckpt_path) if cfg.ckpt_path and network is not None else None,
        "truth": os.path.abspath(cfg.truth) if cfg.truth else None,
        "settings": {"learning_rate": cfg.inferer.learning_rate,
                     "subject_learning_rate": cfg.inferer.subject_learning_rate,
                     "subject_init": cfg.inferer.subject_init,
                     "seed": cfg.inferer.seed, "metric_interval": cfg.inferer.metric_interval,
                     "mlem_iterations": cfg.inferer.mlem_iterations},
        "parameter_counts": network.parameter_counts() if network is not None else None,
        **result.summary(), "loss": result.losses, "metrics": result.metrics,
        "outputs": {"image": stem + ".nii.gz", "report": stem + ".json", "plot": stem + "_convergence.png"},
    }
    save_nifti(stem + ".nii.gz", result.image[0, 0].numpy().astype(np.float32), acq.affine_array)
    save_convergence(stem + "_convergence.png", result, f"{_name(cfg.measurement)}: {acq.modality}, "
                     f"{cfg.inferer.method}", truth)
    write_json(stem + ".json", report)
    return report
