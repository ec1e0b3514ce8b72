"""The inputs of meduet_diffusion's ControlNet inference (controlnet_infer.yaml) as cases: a measurement file with its
acquisition JSON (mri / ct), a label-map NIfTI (label) or clean scans of a latent datalist split degraded as in
training (``simulate_from``; the truth is then known).

Every case is on an image grid ``(S1, S2, S3)`` with an affine; image inputs and truths are in the preprocessed
intensity range ``[0, 1]`` (a measurement file is taken to be of such an image, as ``meduet.data.measurements
.simulate`` of a preprocessed scan gives; a truth NIfTI is read in the units the outputs are written in: HU for a CT
chain, ``[0, 1]`` otherwise).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet.data.controls import ControlTask, item_seed
from meduet.data.measurements import Acquisition, Measurement, read_measurement, simulate, write_measurement
from meduet.engines.controlnet import ControlCache
from meduet.errors import MeduetConfigError, MeduetInputError

__all__ = ["Case", "task_of", "acquisition_for", "check_acquisition", "measurement_case", "label_case",
           "simulated_cases", "read_truth"]

_MODALITY = {"mri": "mri", "ct": "ct"}


@dataclasses.dataclass
class Case:
    """One input. ``control_image``: the image control ``(1, 1, S1, S2, S3)`` in ``[0, 1]`` (the classical
    reconstruction, clipped; None for ``label``); ``label``: the label map ``(S1, S2, S3)`` (``label`` task);
    ``measurement``: what was measured (None for label maps); ``truth``: ``(S1, S2, S3)`` in ``[0, 1]`` or None;
    ``affine``: ``(4, 4)`` of the grid; ``domain``: the scan's site when known; ``files``: input files written."""

    name: str
    affine: np.ndarray
    control_image: torch.Tensor | None = None
    label: torch.Tensor | None = None
    measurement: Measurement | None = None
    truth: torch.Tensor | None = None
    domain: str | None = None
    acquisition_check: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        src = self.control_image[0, 0] if self.control_image is not None else self.label
        return tuple(int(s) for s in src.shape)  # type: ignore[union-attr,return-value]


def task_of(control: Mapping[str, Any]) -> ControlTask:
    """The ``ControlTask`` a ControlNet was trained for (its record's ``meta["control"]``)."""
    keys = ("acceleration", "center_fraction", "views", "seed")
    return ControlTask(str(control.get("task")), **{k: control[k] for k in keys if k in control})


def acquisition_for(task: ControlTask, shape: tuple[int, ...], affine: np.ndarray, seed: int) -> Acquisition:
    """The acquisition ``ControlTask.degrade`` simulates on a grid (mri: its Cartesian 1d mask drawn from ``seed``;
    ct: ``views`` angles, the default detectors)."""
    common = {"image_shape": tuple(int(s) for s in shape), "affine": np.asarray(affine).tolist()}
    if task.task == "mri":
        return Acquisition("mri", mask="cartesian", acceleration=float(task.acceleration),
                           center_fraction=float(task.center_fraction), pattern="1d", seed=int(seed), **common)
    if task.task == "ct":
        return Acquisition("ct", num_angles=int(task.views), **common)
    raise MeduetConfigError("control_task 'label' has no measurement; use a label map")


def check_acquisition(acq: Acquisition, task: ControlTask, preprocessing: Mapping[str, Any], on_mismatch: str,
                      where: str) -> dict[str, Any]:
    """Compare a measurement's acquisition with what the ControlNet was trained on: another modality is an error;
    other settings (mask kind / pattern, acceleration, centre fraction, views; voxel spacing vs the preprocessing's)
    are a warning (``on_mismatch="warn"``, the default: the network still runs, further from its training data) or
    an error (``"error"``). Returns ``{"matches": bool, "differences": [...]}``."""
    if acq.modality != _MODALITY.get(task.task):
        raise MeduetInputError(f"{where} is a {acq.modality} acquisition but the ControlNet was trained for "
                               f"control_task '{task.task}'; pass a {task.task} measurement or that task's ControlNet")
    diffs = []
    if acq.modality == "mri":
        if acq.mask_file is not None or acq.mask != "cartesian" or acq.pattern != "1d":
            kind = "a mask_file" if acq.mask_file else f"mask {acq.mask} pattern {acq.pattern}"
            diffs.append(f"{kind} (trained: cartesian 1d)")
        else:
            if abs(float(acq.acceleration) - float(task.acceleration)) > 1e-9:
                diffs.append(f"acceleration {acq.acceleration:g} (trained: {task.acceleration:g})")
            if abs(acq.center_fraction - float(task.center_fraction)) > 1e-9:
                diffs.append(f"center_fraction {acq.center_fraction:g} (trained: {task.center_fraction:g})")
    elif acq.num_angles != int(task.views):
        diffs.append(f"num_angles {acq.num_angles} (trained: views {int(task.views)})")
    spacing = preprocessing.get("spacing")
    if spacing and not np.allclose(acq.spacing, [float(s) for s in spacing], rtol=1e-3):
        diffs.append(f"spacing {list(acq.spacing)} mm (trained: {list(spacing)})")
    if diffs:
        msg = (f"{where} differs from the ControlNet's training acquisition: {'; '.join(diffs)}; use a ControlNet "
               "trained for these settings (controlnet_train.yaml) for best results")
        if on_mismatch == "error":
            raise MeduetInputError(msg)
        warnings.warn(msg, stacklevel=2)
    return {"matches": not diffs, "differences": diffs}


def read_truth(path: str, shape: tuple[int, ...], preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """A truth NIfTI on the input's grid -> ``(S1, S2, S3)`` in ``[0, 1]`` (HU mapped through the CT window)."""
    import nibabel as nib

    try:
        arr = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)
    except Exception as exc:  # nibabel raises many types
        raise MeduetInputError(f"truth_image {path} is unreadable ({type(exc).__name__}); pass a NIfTI file") from None
    arr = arr.reshape(arr.shape[:3]) if arr.ndim == 4 and arr.shape[3] == 1 else arr
    if tuple(arr.shape) != tuple(shape):
        raise MeduetInputError(f"truth_image {path} has shape {arr.shape} but the input's grid is {tuple(shape)}; "
                               "pass the truth on the same grid")
    if not np.isfinite(arr).all():
        raise MeduetInputError(f"truth_image {path} has NaN/Inf values; replace them")
    if str(preprocessing.get("modality", "CT")).upper() == "CT":
        lo, hi = (float(v) for v in preprocessing.get("ct_window", (-175.0, 250.0)))
        arr = (arr - lo) / (hi - lo)
    return torch.from_numpy(arr).clamp(0.0, 1.0)


def measurement_case(measurement: str, acquisition: str, task: ControlTask, preprocessing: Mapping[str, Any],
                     on_mismatch: str, truth_image: str | None) -> Case:
    """A measurement file (mri / ct task): its classical reconstruction clipped to ``[0, 1]`` is the image control."""
    if not task.is_image:
        raise MeduetConfigError("control_task 'label' is conditioned on a label map; pass label_map, not a "
                                "measurement")
    if not acquisition:
        raise MeduetConfigError("a measurement needs its acquisition JSON; set --acquisition")
    m = read_measurement(measurement, acquisition)
    check = check_acquisition(m.acquisition, task, preprocessing, on_mismatch, f"acquisition JSON {acquisition}")
    shape = m.acquisition.image_shape
    name = Path(measurement).name.split(".")[0]
    truth = read_truth(truth_image, shape, preprocessing) if truth_image else None
    return Case(name, m.acquisition.affine_array, control_image=m.classical().clamp(0.0, 1.0), measurement=m,
                truth=truth, acquisition_check=check)


def label_case(label_map: str, num_classes: int, truth_image: str | None,
               preprocessing: Mapping[str, Any]) -> Case:
    """A label-map NIfTI (label task): class indices ``0 .. num_classes - 1`` on the output grid."""
    import nibabel as nib

    try:
        img = nib.load(label_map)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types
        raise MeduetInputError(f"label_map {label_map} is unreadable ({type(exc).__name__}); pass a NIfTI label "
                               "map") from None
    arr = arr.reshape(arr.shape[:3]) if arr.ndim == 4 and arr.shape[3] == 1 else arr
    if arr.ndim != 3:
        raise MeduetInputError(f"label_map {label_map} has shape {arr.shape}; pass a 3D label map")
    if not np.isfinite(arr).all() or (np.abs(arr - np.rint(arr)) > 1e-3).any():
        raise MeduetInputError(f"label_map {label_map} holds non-integer or NaN values; pass class indices")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise MeduetInputError(f"label_map {label_map} has classes {int(arr.min())}..{int(arr.max())} but the "
                               f"ControlNet knows {num_classes} classes; pass a label map of the training's labels")
    shape = tuple(arr.shape)
    truth = read_truth(truth_image, shape, preprocessing) if truth_image else None
    return Case(Path(label_map).name.split(".")[0], np.asarray(img.affine, dtype=np.float64),
                label=torch.from_numpy(np.rint(arr)), truth=truth)


def simulated_cases(latent_datalist: str, split: str, max_cases: int, task: ControlTask, vae_ckpt: str,
                    out_dir: Path) -> list[Case]:
    """The first ``max_cases`` scans of ``split``: clean images preprocessed as the latent cache's
    (``ControlCache.load``); image tasks measured by ``acquisition_for`` (the mask seeded per item as in training,
    ``item_seed``) and the measurement and its acquisition JSON written to ``out_dir`` (``<name>_measurement.npy``,
    ``<name>_acquisition.json``); the clean image is the truth."""
    cache = ControlCache(latent_datalist, task, str(out_dir), vae_ckpt=vae_ckpt)
    items = cache.datalist.items(split)[: int(max_cases)]
    if not items:
        raise MeduetConfigError(f"split '{split}' of {latent_datalist} has no items; set --simulate_from to a split "
                                "with scans (e.g. test)")
    cases = []
    for item in items:
        data = cache.load(item)
        image = torch.as_tensor(data["image"]).float()[:1]
        affine = np.asarray(data["image"].affine, dtype=np.float64) if hasattr(data["image"], "affine") else np.eye(4)
        name = Path(item["latent"]).name.split(".")[0]
        case = Case(name, affine, truth=image[0].clamp(0, 1), domain=item.get("domain"))
        if task.is_image:
            acq = acquisition_for(task, tuple(image.shape[1:]), affine, item_seed(task.seed, Path(item["latent"]).name))
            y = simulate(image[0], acq)
            m = write_measurement(out_dir / f"{name}_measurement.npy", y, acq, out_dir / f"{name}_acquisition.json")
            case.measurement, case.control_image = m, m.classical().clamp(0.0, 1.0)
            case.files = {"measurement": f"{name}_measurement.npy", "acquisition": f"{name}_acquisition.json"}
            case.acquisition_check = {"matches": True, "differences": []}
        else:
            case.label = torch.as_tensor(data["label"])[0].round()
        cases.append(case)
    return cases
