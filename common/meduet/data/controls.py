"""Task inputs of a ControlNet (3D MedDiffusion's conditional tasks), made from a clean preprocessed image in image
space; the VAE encoding that puts an image input on the latent grid lives in ``meduet.engines.controlnet``.

* ``mri``: the zero-filled reconstruction ``|A^H A x|`` of a Cartesian undersampled single-coil k-space
  (``meduet.data.forward.cartesian_mask``, 1d phase-encode lines along ``S2``; acceleration 4 by default, 8 the other
  usual setting; fully sampled centre fraction 0.08);
* ``ct``: the filtered back-projection of a parallel-beam sinogram with few views (60 by default, 30 the sparser
  setting), axial slice by axial slice (``ParallelBeamCT`` over ``S3``);
* ``label``: the label map one-hot, average-pooled by the VAE's downsample factor (class fractions per latent voxel,
  summing to 1).

The image inputs are clipped to ``[0, 1]``, the range of the preprocessed images the VAE was trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from meduet.data.forward import MRIForward, ParallelBeamCT, cartesian_mask, fbp
from meduet.errors import MeduetConfigError, MeduetInputError

__all__ = ["CONTROL_TASKS", "ControlTask", "label_control", "num_label_classes", "item_seed"]

CONTROL_TASKS = ("mri", "ct", "label")
_INPUTS = {"mri": "zero-filled reconstruction of Cartesian undersampled k-space",
           "ct": "filtered back-projection of a sparse-view parallel-beam sinogram",
           "label": "label map one-hot, average-pooled to the latent grid"}


def _number(value: Any, key: str, low: float, integer: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value and value >= low
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise MeduetConfigError(f"'{key}' must be {kind} >= {low:g}, got {value!r}; set --{key}")
    return float(value)


@dataclass(frozen=True)
class ControlTask:
    """What a ControlNet is conditioned on and its measurement settings (checked: one-line errors).

    Args:
        task: ``"mri"``, ``"ct"`` or ``"label"``.
        acceleration: ``mri``: undersampling factor ``R`` (>= 1; 4 default, 8 harder).
        center_fraction: ``mri``: fully sampled centre fraction of the phase-encode axis (in (0, 1); 0.08).
        views: ``ct``: projection angles over ``[0, pi)`` (>= 1; 60 default, 30 sparser).
        seed: seeds each item's k-space mask (with the item's name, ``item_seed``).
    """

    task: str
    acceleration: float = 4.0
    center_fraction: float = 0.08
    views: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in CONTROL_TASKS:
            raise MeduetConfigError(f"control_task must be one of {list(CONTROL_TASKS)}, got {self.task!r}; set "
                                    "--control_task mri, ct or label")
        _number(self.acceleration, "acceleration", 1.0)
        if not 0 < _number(self.center_fraction, "center_fraction", 0.0) < 1:
            raise MeduetConfigError(f"'center_fraction' must be in (0, 1), got {self.center_fraction!r}; set "
                                    "--center_fraction")
        _number(self.views, "views", 1.0, integer=True)
        _number(self.seed, "seed", 0.0, integer=True)

    @property
    def is_image(self) -> bool:
        """True for the tasks whose input is an image (encoded by the VAE); False for ``label``."""
        return self.task != "label"

    @property
    def input(self) -> str:
        """What the control is, in words (kept in the ControlNet's record)."""
        return _INPUTS[self.task]

    def settings(self) -> dict[str, Any]:
        """The task and the settings that apply to it (for records and cache manifests)."""
        if self.task == "mri":
            return {"task": "mri", "acceleration": float(self.acceleration),
                    "center_fraction": float(self.center_fraction), "pattern": "1d", "seed": int(self.seed)}
        if self.task == "ct":
            return {"task": "ct", "views": int(self.views), "filter": "ramp"}
        return {"task": "label"}

    def tag(self) -> str:
        """A folder name for this task's settings, e.g. ``acc4_cf0.08``, ``views60``, ``onehot``."""
        if self.task == "mri":
            return f"acc{self.acceleration:g}_cf{self.center_fraction:g}_seed{int(self.seed)}"
        return f"views{int(self.views)}" if self.task == "ct" else "onehot"

    @torch.no_grad()
    def degrade(self, image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The task input of a clean image ``(B, C, S1, S2, S3)`` in ``[0, 1]``: same shape, float32, in ``[0, 1]``
        (``mri``: the mask drawn from ``seed``; ``ct``: per axial slice). Not for ``label``."""
        if not self.is_image:
            raise MeduetConfigError("control_task 'label' has no image input; use label_control")
        x = torch.as_tensor(image).float()
        if x.ndim != 5:
            raise MeduetInputError(f"image for the {self.task} control has shape {tuple(x.shape)}; expected "
                                   "(B, C, S1, S2, S3)")
        if self.task == "mri":
            mask = cartesian_mask(x.shape[2:], float(self.acceleration), float(self.center_fraction), seed=seed)
            op = MRIForward(mask).to(x.device)
            out = op.zero_filled(op(x))
        else:
            # on the CPU: ParallelBeamCT's static ``_apply`` (its sparse product) shadows ``nn.Module._apply``, so
            # the operator cannot be moved with ``.to()``; the controls are made once per run
            op = ParallelBeamCT(tuple(x.shape[2:4]), int(self.views))
            out = fbp(op(x.cpu()), op).to(x.device)
        return out.float().clamp(0.0, 1.0)


def item_seed(seed: int, name: str) -> int:
    """A per-item seed from the run's ``seed`` and the item's name (the same item always gets the same mask)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def num_label_classes(labels: Mapping[str, Any] | Sequence[Any] | None) -> int:
    """Classes of a datalist's ``labels`` (``{"0": "background", "1": ...}`` or a list of names): max index + 1."""
    if not labels:
        raise MeduetConfigError("control_task 'label' needs the latent datalist's 'labels' (class index -> name); "
                                "encode a datalist that has labels")
    if isinstance(labels, Mapping):
        try:
            return max(int(k) for k in labels) + 1
        except ValueError:
            raise MeduetConfigError(f"the datalist's 'labels' keys must be class indices, got {list(labels)}") from None
    return len(labels)


def label_control(label: torch.Tensor, num_classes: int, factor: int) -> torch.Tensor:
    """A label map ``(1, S1, S2, S3)`` or ``(S1, S2, S3)`` of class indices -> class fractions per ``factor^3``
    block ``(num_classes, S1/f, S2/f, S3/f)`` (one-hot, average-pooled; sums to 1 per voxel). Sizes that are not
    multiples of ``factor`` are edge-padded first (the latent of such an image covers the padded grid)."""
    lab = torch.as_tensor(label)
    lab = lab[0] if lab.ndim == 4 else lab
    if lab.ndim != 3:
        raise MeduetInputError(f"label map has shape {tuple(torch.as_tensor(label).shape)}; expected (1, S1, S2, S3)")
    idx = lab.round().long()
    if int(idx.min()) < 0 or int(idx.max()) >= num_classes:
        raise MeduetInputError(f"label map has classes {int(idx.min())}..{int(idx.max())} outside the datalist's "
                               f"{num_classes} labels; fix the label map or the datalist's 'labels'")
    onehot = F.one_hot(idx, num_classes).permute(3, 0, 1, 2).float()[None]
    f = int(factor)
    pad = [p for s in reversed(onehot.shape[2:]) for p in (0, (-s) % f)]
    if any(pad):
        onehot = F.pad(onehot, pad, mode="replicate")
    return F.avg_pool3d(onehot, kernel_size=f, stride=f)[0]
