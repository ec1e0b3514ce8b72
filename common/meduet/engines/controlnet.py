"""Training pieces of meduet_diffusion's ControlNet (configs/controlnet_train.yaml): the base generator, the network,
the controls on the latent grid (made once, cached), the condition with the control, and the validation loss.

* ``load_base``: the trained generator (``models/model.pt``); a missing one is a one-line error.
* ``build_controlnet``: ``LatentControlNet.from_base`` for a ``ControlTask`` (``meduet.data.controls``): control
  channels = latent channels for image tasks, label classes for ``label``; the record's ``meta["control"]`` holds the
  task and its settings (acceleration / centre fraction / views) beside channels, blocks and input.
* ``ControlCache``: each latent-datalist item's control, made from the item's clean image preprocessed as the VAE's
  record says (``preprocessing``): image tasks degrade it (``ControlTask.degrade``), encode it with the frozen
  meduet_vae (the latent cache's patch encoding) and scale it by ``LatentSpace``; ``label`` pools the one-hot label
  map. Written once as channels-last NIfTI (``<cache_dir>/<task>/<settings>_<hash>/<latent file name>``, ready to
  use: scaled) and listed as the item's ``control``; later runs reuse them.
* ``ControlConditioner``: the base's ``Conditioner`` plus ``cond["control"]`` from the batch (``DiffusionTrainer``
  works unchanged).
* ``ControlValidationLoss``: ``ValidationLoss`` whose fixed crops carry their controls (the same centre crop).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from meduet import records
from meduet.data import get_load_transforms
from meduet.data.controls import ControlTask, item_seed, label_control, num_label_classes
from meduet.engines.diffusion import (Conditioner, ValidationLoss, build_conditioner, center_crop_or_pad,
                                      diffusion_items)
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.io import write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent, save_latent
from meduet.networks.controlnet import LatentControlNet
from meduet.networks.dit import LatentDiT
from meduet.networks.patchwise import PatchEncoding

__all__ = ["load_base", "build_controlnet", "control_conditioner", "control_encoding", "encode_image_control",
           "ControlCache", "ControlConditioner", "ControlValidationLoss"]


def load_base(base_ckpt: str, device: str | torch.device = "cpu") -> LatentDiT:
    """The trained base generator (meduet_diffusion's ``models/model.pt``), frozen by ``LatentControlNet``."""
    records.require(base_ckpt, "meduet_diffusion")
    return records.load(base_ckpt, device, expect="dit")


def control_channels(task: ControlTask, latents: Mapping[str, Any]) -> int:
    """Channels of the control: the latent channels (image tasks) or the datalist's label classes (``label``)."""
    return int(latents["latent_channels"]) if task.is_image else num_label_classes(latents.get("labels"))


def build_controlnet(base: LatentDiT, task: ControlTask, latents: Mapping[str, Any], base_ckpt: str,
                     control_blocks: int | None = None) -> LatentControlNet:
    """A ``LatentControlNet`` on ``base`` for ``task``, checked against the latent cache (same VAE)."""
    LatentSpace.from_record(base.meta, base_ckpt).check_same(LatentSpace.from_record(latents, "the latent datalist"),
                                                             base_ckpt, "the latent datalist")
    net = LatentControlNet.from_base(base, control_channels(task, latents), control_blocks, task.input)
    net.meta["control"].update({**task.settings(), "base_ckpt": os.path.abspath(base_ckpt)})
    return net


def control_encoding(vae: nn.Module, latents: Mapping[str, Any] | None = None) -> PatchEncoding:
    """The patch encoding of image controls: the latent cache's (``latents["patch_encoding"]``, what its latents were
    encoded with), else the VAE record's."""
    stored = (latents or {}).get("patch_encoding")
    return PatchEncoding(**stored) if stored else PatchEncoding.of(vae)


def encode_image_control(vae: nn.Module, scheme: PatchEncoding, space: LatentSpace, image: torch.Tensor
                         ) -> torch.Tensor:
    """An image control ``(B, 1, *S)`` -> the scaled latent control ``(B, C, *(S / f))``: clipped to ``[0, 1]`` (the
    preprocessed range), encoded window by window with the latent cache's ``scheme`` by the frozen VAE, scaled by
    ``space``. ``ControlCache`` makes the training controls with it, ControlNet inference its input and data
    consistency its re-encodings."""
    return space.scale(scheme.encode(vae, image.float().clamp(0.0, 1.0)))


class ControlConditioner(nn.Module):
    """``cond`` of a ``LatentControlNet``: the base's ``Conditioner`` output plus ``"control"`` (the batch's
    ``control``, ``(B, Cc, S1, S2, S3)`` at the latents' size)."""

    def __init__(self, conditioner: Conditioner) -> None:
        super().__init__()
        self.base = conditioner
        self.condition = conditioner.condition
        self.metadata_keys = conditioner.metadata_keys

    def forward(self, x: torch.Tensor, batch: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not batch or batch.get("control") is None:
            raise MeduetConfigError("a ControlNet batch needs each item's 'control' (ControlCache.items)")
        control = batch["control"]
        control = control.as_tensor() if hasattr(control, "as_tensor") else torch.as_tensor(control)
        return {**(self.base(x, batch) or {}), "control": control.to(x.device).float()}


def control_conditioner(base: LatentDiT, pretrain_ckpt: str | None, latents: Mapping[str, Any] | None = None,
                        device: str | torch.device = "cpu") -> ControlConditioner:
    """The base generator's condition (its record's ``condition`` / ``metadata_keys``, its ``content_map``; the
    factors from ``pretrain_ckpt``) plus the control."""
    meta = base.meta
    cond = build_conditioner(str(meta.get("condition", "none")), pretrain_ckpt, latents,
                             content_map=bool(base.arch.get("content_map", False)),
                             metadata_keys=meta.get("metadata_keys") or (), device=device)
    return ControlConditioner(cond)


class ControlCache:
    """The controls of a latent datalist's items for one ``ControlTask`` (see the module docstring).

    Args:
        latent_datalist: meduet_vae's latent datalist (its ``preprocessing``, ``patch_encoding`` and items' images /
            label maps).
        task: the ``ControlTask``.
        cache_dir: where the controls go (the bundle's ``latents_control``).
        vae_ckpt: meduet_vae's ``model.pt`` (the VAE of the latent cache), loaded only for image tasks and only if
            a control is missing.
        device: where the VAE and the forward models run.
    """

    def __init__(self, latent_datalist: str, task: ControlTask, cache_dir: str, vae_ckpt: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.datalist = LatentDatalist(latent_datalist)
        self.task, self.vae_ckpt, self.device = task, vae_ckpt, torch.device(device)
        data = self.datalist.data
        self.space = self.datalist.space
        self.factor = int(data.get("downsample_factor") or 4)
        self.channels = control_channels(task, data)
        self.manifest = {**task.settings(), "latent_datalist": os.path.abspath(latent_datalist),
                         "vae_config_hash": data.get("vae_config_hash"), "scaled": task.is_image,
                         "latent_scale_factor": self.space.scale_factor, "channels": self.channels,
                         "preprocessing": data.get("preprocessing") or {}}
        digest = hashlib.sha1(json.dumps(self.manifest, sort_keys=True, default=str).encode()).hexdigest()[:8]
        self.dir = Path(cache_dir) / task.task / f"{task.tag()}_{digest}"
        self._vae: Any = None
        self._transform: Any = None

    def items(self, split: str, metadata_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
        """``diffusion_items`` of ``split`` with each item's ``control`` path (made now if missing)."""
        raw = {it["latent"]: it for it in self.datalist.items(split)}
        out = []
        for row in diffusion_items(self.datalist.path, split, metadata_keys):
            path = self.dir / Path(row["latent"]).name
            if not path.is_file():
                self.make(raw[row["latent"]], path)
            out.append({**row, "control": str(path)})
        if out and not (self.dir / "control.json").is_file():
            write_json(self.dir / "control.json", self.manifest)
        return out

    def _vae_and_scheme(self) -> tuple[nn.Module, PatchEncoding]:
        if self._vae is None:
            if not self.vae_ckpt:
                raise MeduetConfigError(f"control_task '{self.task.task}' encodes its input with meduet_vae; set "
                                        "--vae_ckpt (meduet_vae's models/model.pt)")
            records.require(self.vae_ckpt, "meduet_vae")
            vae = records.load(self.vae_ckpt, self.device, expect="vae").eval()
            LatentSpace.from_vae(vae).check_same(self.space, self.vae_ckpt, self.datalist.path)
            self._vae = (vae, control_encoding(vae, self.datalist.data))
        return self._vae

    def load(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The item's clean image (and label map) preprocessed as the latent cache's images were."""
        if self._transform is None:
            prep = dict(self.datalist.data.get("preprocessing") or {})
            self._transform = get_load_transforms(**prep, keys=("image", "label"))
        keys = ("image", "label") if not self.task.is_image else ("image",)
        missing = [k for k in keys if not item.get(k)]
        if missing:
            raise MeduetInputError(f"{self.datalist.path}: item '{item['latent']}' has no {missing[0]} path; "
                                   f"control_task '{self.task.task}' makes its control from it")
        return self._transform({k: item[k] for k in keys})

    @torch.no_grad()
    def make(self, item: Mapping[str, Any], path: Path) -> torch.Tensor:
        """Make, check (the latent's grid) and write one item's control ``(Cc, h, w, d)``."""
        data = self.load(item)
        image = data["image"]
        affine = np.asarray(image.affine) if hasattr(image, "affine") else np.eye(4)
        if self.task.is_image:
            vae, scheme = self._vae_and_scheme()
            x = torch.as_tensor(image)[None].float().to(self.device)
            y = self.task.degrade(x, seed=item_seed(self.task.seed, Path(item["latent"]).name))
            control = encode_image_control(vae, scheme, self.space, y)[0].cpu()
        else:
            control = label_control(torch.as_tensor(data["label"]), self.channels, self.factor)
        shape = tuple(load_latent(item["latent"]).shape[1:])
        if tuple(control.shape[1:]) != shape:
            raise MeduetInputError(f"the control of '{item['latent']}' has grid {tuple(control.shape[1:])} but the "
                                   f"latent {shape}: the latent cache was not made from this image with this VAE's "
                                   "preprocessing; re-encode it (meduet_vae encode.yaml)")
        save_latent(path, control.numpy(), affine, self.factor)
        return control


class ControlValidationLoss(ValidationLoss):
    """``ValidationLoss`` of a ControlNet: ``items`` carry their ``control`` (``ControlCache.items``), centre-cropped
    like the latents and given to the conditioner in the batch."""

    def __init__(self, network: Any, objective: Any, conditioner: ControlConditioner,
                 items: Sequence[Mapping[str, Any]], latent_space: LatentSpace, crop_size: Sequence[int],
                 **kwargs: Any) -> None:
        super().__init__(network, objective, conditioner, items, latent_space, crop_size, **kwargs)
        kept = list(items)[: len(self.x)]
        self.batch["control"] = torch.stack([center_crop_or_pad(load_latent(it["control"]), crop_size) for it in kept])
