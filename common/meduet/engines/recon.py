"""meduet_recon pretraining (DisINR): the shared encoder-decoder pair and one subject encoder per training subject,
fitted to the subjects' raw measurements through the acquisition's forward model. No clean image enters the loss:
the training set holds measurements and subject indices only (the clean volumes are dropped once simulated).

Training data: measurements simulated in memory from the datalist split's volumes at the preset's grid (one
acquisition for every subject: the same MRI mask, CT angles or PET geometry; PET counts drawn per subject with its own
seed), rather than cached as measurement files: they take a second to make at the presets' sizes, and the bundle's
``simulate.yaml`` writes measurement files of held-out volumes for test-time reconstruction.

Volumes are loaded through MONAI (``meduet.data.get_load_transforms``: checked, RAS), scaled to ``[0, 1]`` by their
``percentiles`` (MONAI's percentile scaling, clipped) and resampled to ``image_shape`` (area averaging when shrinking,
trilinear otherwise).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import Trainer
from torch.utils.data import DataLoader, Dataset

from meduet.data import get_load_transforms
from meduet.data.measurements import Acquisition, acquisition_from_dict, simulate
from meduet.engines.trainer import MeduetTrainer
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.losses.recon import MODALITIES, measurement_loss
from meduet.networks.inr import DisINR, grid_coordinates

__all__ = ["training_acquisition", "load_volume", "select_subjects", "MeasurementSet", "simulate_training_set",
           "build_inr", "recon_record", "ReconTrainer"]


def training_acquisition(modality: str, image_size: Sequence[int] | int, acceleration: float = 4.0,
                         center_fraction: float = 0.08, num_angles: int = 60, total_counts: float = 1e6,
                         spacing: Sequence[float] | None = None, seed: int = 0) -> Acquisition:
    """The acquisition every training subject is measured with: MRI a 1D Cartesian mask at ``acceleration`` (mask
    seed ``seed``), CT ``num_angles`` parallel-beam views, PET ``num_angles`` views at ``total_counts``."""
    if modality not in MODALITIES:
        raise MeduetConfigError(f"modality {modality!r} is not one of {MODALITIES}; fix the config key 'modality'")
    shape = [int(image_size)] * 3 if isinstance(image_size, int) else [int(s) for s in image_size]
    spec: dict[str, Any] = {"modality": modality, "image_shape": shape}
    if spacing is not None:
        spec["spacing"] = [float(s) for s in spacing]
    if modality == "mri":
        spec.update(mask="cartesian", acceleration=acceleration, center_fraction=center_fraction, seed=int(seed))
    else:
        spec["num_angles"] = num_angles
        if modality == "pet":
            spec["total_counts"] = total_counts
    try:
        return acquisition_from_dict(spec, source="")
    except MeduetInputError as e:  # a config value, not a file: name the config keys
        raise MeduetConfigError(f"train.yaml acquisition keys: {e}") from None


def load_volume(path: str, image_shape: Sequence[int], percentiles: Sequence[float] = (0.5, 99.5),
                with_affine: bool = False) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """One volume ``(S1, S2, S3)`` in ``[0, 1]`` on ``image_shape`` (see the module docstring); with
    ``with_affine`` also the voxel-to-world matrix ``(4, 4)`` of that grid (the RAS-oriented file's, rescaled to the
    new voxel size so the field of view is kept)."""
    load = get_load_transforms(modality="MR", keys=("image",), spacing=None, mr_percentiles=tuple(percentiles),
                               crop_foreground=False, pad_multiple=None, expected_channels=1)
    loaded = load({"image": path})["image"]
    x = torch.as_tensor(loaded).float()[None]  # (1, 1, X, Y, Z)
    old, shape = tuple(x.shape[2:]), tuple(int(s) for s in image_shape)
    shrink = all(a >= b for a, b in zip(old, shape))
    x = F.interpolate(x, size=shape, mode="area") if shrink else F.interpolate(x, size=shape, mode="trilinear",
                                                                              align_corners=True)
    x = x[0, 0].clamp(0, 1)
    if not with_affine:
        return x
    affine = np.asarray(torch.as_tensor(loaded.affine), dtype=np.float64)
    # area averaging: new voxel i covers old voxels [i k, (i + 1) k), centre i k + (k - 1) / 2 with k = old / new;
    # trilinear with aligned corners: new voxel i sits at old index i (old - 1) / (new - 1)
    scale = np.array([a / b if shrink else (a - 1) / max(b - 1, 1) for a, b in zip(old, shape)])
    offset = (scale - 1) / 2 if shrink else np.zeros(3)
    index = np.eye(4)
    index[:3, :3] = np.diag(scale)
    index[:3, 3] = offset
    return x, affine @ index


def select_subjects(items: Sequence[Mapping[str, Any]], fraction: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded random ``fraction`` of the items (at least one), in their datalist order."""
    if not 0.0 < float(fraction) <= 1.0:
        raise MeduetConfigError(f"train_fraction must be in (0, 1], got {fraction!r}; fix --train_fraction")
    if not items:
        raise MeduetInputError("the training split has no items; add volumes to the datalist or pick another split")
    keep = max(1, int(math.ceil(float(fraction) * len(items))))
    chosen = sorted(random.Random(int(seed)).sample(range(len(items)), keep))
    return [dict(items[i]) for i in chosen]


class MeasurementSet(Dataset):
    """Items ``{"subject": index, "measurement": (1, *measurement_shape)}``: what the trainer sees (no image)."""

    def __init__(self, measurements: Sequence[torch.Tensor]) -> None:
        self.measurements = list(measurements)

    def __len__(self) -> int:
        return len(self.measurements)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"subject": i, "measurement": self.measurements[i]}


def simulate_training_set(items: Sequence[Mapping[str, Any]], acquisition: Acquisition,
                          percentiles: Sequence[float] = (0.5, 99.5), seed: int = 0) -> MeasurementSet:
    """The measurements of the items' volumes (``load_volume`` on the acquisition's grid, then
    ``meduet.data.measurements.simulate``; PET counts with seed ``seed + index``); the volumes are not kept."""
    out = []
    for i, item in enumerate(items):
        x = load_volume(item["image"], acquisition.image_shape, percentiles)
        out.append(simulate(x, acquisition, seed=int(seed) + i)[0])
    return MeasurementSet(out)


def build_inr(architecture: Mapping[str, Any], num_subjects: int, modality: str) -> DisINR:
    """A ``DisINR`` of ``architecture`` with ``num_subjects`` subject encoders; PET gets a positive output
    (softplus) unless the architecture says otherwise."""
    arch = dict(architecture)
    if modality == "pet":
        arch.setdefault("output_activation", "softplus")
    return DisINR(**{**arch, "num_subjects": int(num_subjects)})


def recon_record(acquisition: Acquisition, items: Sequence[Mapping[str, Any]], datalist: str, split: str,
                 percentiles: Sequence[float], train_fraction: float, network: DisINR) -> dict[str, Any]:
    """What the trained network carries besides its architecture: the acquisition it was pretrained through, the
    image grid and intensity scaling, the training subjects and the parameter split."""
    return {"modality": acquisition.modality, "acquisition": acquisition.to_json(),
            "image_shape": list(acquisition.image_shape), "intensity": {"percentiles": [float(p) for p in percentiles],
                                                                         "range": [0.0, 1.0]},
            "datalist": str(datalist), "split": split, "train_fraction": float(train_fraction),
            "training_subjects": len(items), "parameter_counts": network.parameter_counts()}


class ReconTrainer(MeduetTrainer):
    """Pretraining on measurements: per batch item, render subject ``subject``'s volume on ``image_shape`` (through
    the network's forward, so DistributedDataParallel synchronises it), apply ``operator``, and compare with the item's
    measurement (``meduet.losses.recon.measurement_loss``); the batch loss is the items' mean.

    Args: as ``MeduetTrainer`` plus ``operator`` (the acquisition's forward model), ``modality`` and
    ``image_shape``. Batches are ``{"subject" (B,), "measurement" (B, 1, ...)}``; any other key (e.g. an image) is
    ignored. The output dict has ``loss`` and ``losses``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: DataLoader,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, operator: torch.nn.Module,
                 modality: str, image_shape: Sequence[int], lr_scheduler: Any = None,
                 grad_clip: float | None = None, epoch_length: int | None = None, amp: bool = False,
                 train_handlers: Sequence | None = None, **workflow_kwargs: Any) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
                         grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
                         **workflow_kwargs)
        if modality not in MODALITIES:
            raise MeduetConfigError(f"modality {modality!r} is not one of {MODALITIES}; fix the config key 'modality'")
        self.operator = operator.to(self.state.device)
        self.modality = modality
        self.image_shape = tuple(int(s) for s in image_shape)
        self.coords = grid_coordinates(self.image_shape, device=self.state.device)

    def batch_loss(self, batchdata: Mapping[str, Any]) -> torch.Tensor:
        """The mean measurement loss of the batch's subjects (only ``subject`` and ``measurement`` are read)."""
        dev = self.state.device
        subjects = torch.as_tensor(batchdata["subject"]).view(-1).tolist()
        measured = batchdata["measurement"].to(dev, non_blocking=self.non_blocking)
        losses = []
        for b, subject in enumerate(subjects):
            with self.autocast():
                image = self.network(self.coords, int(subject)).float().view(1, 1, *self.image_shape)
            losses.append(measurement_loss(self.operator(image), measured[b: b + 1], self.modality))
        return torch.stack(losses).mean()

    def _iteration(self, engine: Trainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.batch_loss(batchdata)
        self.check_finite(engine, measurement=loss)
        lr = self.optimizer_step(loss)
        return {"loss": loss.detach(), "losses": {"loss": float(loss.detach()), "lr": lr}}
