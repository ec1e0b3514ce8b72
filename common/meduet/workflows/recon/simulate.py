"""meduet_recon simulate.yaml: the measurement of a clean volume as a measurement file beside its acquisition JSON,
plus the clean volume itself (the truth reconstruct.yaml can score against), so test-time reconstruction can be run
on held-out sample volumes.

The volume is loaded and scaled as pretraining loads its subjects (``meduet.engines.recon.load_volume``: RAS,
percentiles -> ``[0, 1]``, resampled to ``image_size``; ``null`` keeps the file's grid), the acquisition is the
training one for these keys (``training_acquisition``) on that grid with the grid's affine, and
``meduet.data.measurements.simulate`` measures it (noise-free k-space / sinogram; PET Poisson counts at
``total_counts``). Writes ``<name>.npy``, ``<name>_acquisition.json`` and ``<name>_truth.nii.gz``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from meduet.data import get_split
from meduet.data.measurements import acquisition_from_dict, simulate, write_measurement
from meduet.engines.recon import load_volume, training_acquisition
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, save_nifti
from meduet.workflows.config import WorkflowConfig

__all__ = ["Config", "run"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """simulate.yaml: which volume (``image``, or item ``index`` of ``split`` of ``datalist``), how it is measured,
    where the files go."""

    output_dir: str
    name: str
    modality: str = "mri"
    image: str | None = None
    datalist: str | None = None
    split: str = "test"
    index: int = 0
    image_size: int | Sequence[int] | None = None
    acceleration: float = 4.0
    center_fraction: float = 0.08
    num_angles: int = 60
    total_counts: float = 1e6
    percentiles: Sequence[float] = (0.5, 99.5)
    mask_seed: int = 1
    seed: int = 0


def _source(cfg: Config) -> str:
    if cfg.image:
        return cfg.image
    if not cfg.datalist:
        raise MeduetConfigError("simulate.yaml needs an image or a datalist; set --image or --datalist")
    items = get_split(cfg.datalist, cfg.split)
    if not 0 <= cfg.index < len(items):
        raise MeduetConfigError(f"index {cfg.index} is outside split '{cfg.split}' of {cfg.datalist} ({len(items)} "
                                "items); fix --index")
    return items[cfg.index]["image"]


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Write the measurement, its acquisition JSON and the truth; returns their paths and the acquisition."""
    cfg = config
    path = _source(cfg)
    size = cfg.image_size
    shape = nib.load(path).shape[:3] if size is None else ([int(size)] * 3 if isinstance(size, int) else list(size))
    volume, affine = load_volume(path, shape, cfg.percentiles, with_affine=True)
    base = training_acquisition(cfg.modality, [int(s) for s in shape], cfg.acceleration, cfg.center_fraction,
                                cfg.num_angles, cfg.total_counts, seed=cfg.mask_seed)
    acq = acquisition_from_dict({**base.to_json(), "affine": affine.tolist()} | {"spacing": None}, source="")
    data = simulate(volume, acq, seed=cfg.seed)
    out = {"measurement": os.path.join(cfg.output_dir, f"{cfg.name}.npy"),
           "acquisition": os.path.join(cfg.output_dir, f"{cfg.name}_acquisition.json"),
           "truth": os.path.join(cfg.output_dir, f"{cfg.name}_truth.nii.gz")}
    write_measurement(out["measurement"], data, acq, out["acquisition"])
    save_nifti(out["truth"], volume.numpy().astype(np.float32), affine)
    return {**out, "source": path, "acquisition_json": acq.to_json()}
