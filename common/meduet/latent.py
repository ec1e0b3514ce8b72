"""The latent space the whole chain shares: the one owner of the latent scale factor and of latent datalists.

meduet_vae caches *unscaled* latents (the VAE's posterior means) as 4D NIfTI files and lists them in a *latent
datalist*; every later stage works on *scaled* latents, ``z * latent_scale_factor`` (the VAE's ``1 / std``), and
divides by the factor again before the VAE decodes. Both conversions happen here, in ``LatentSpace``, and nowhere
else.

A latent datalist (``<latent_dir>/datalist.json``, written by ``meduet_vae``'s ``encode.yaml``) is a decathlon-style
JSON with the VAE's facts at the top::

    {"name": ..., "source_datalist": ..., "modality": "CT", "domains": ["site0", ...], "heldout_domains": [...],
     "labels": {...}, "vae_ckpt": ..., "vae_config_hash": ..., "latent_channels": 4, "downsample_factor": 4,
     "latent_scale_factor": 0.87, "latent_std": 1.15, "latent_mean": 0.01, "preprocessing": {...},
     "augmentation": {...} (optional),
     "training": [{"latent": "latents/<case>.nii.gz", "image": ..., "label": ..., "domain": "site0",
                   "latent_shape": [c, h, w, d], "image_shape": [...], "spacing": [...],
                   "latent_aug": ["latents/<case>_aug0.nii.gz", ...] (optional), ...}, ...],
     "validation": [...], "test": [...], "pretraining": [...] (optional)}

``LatentDatalist`` reads, checks and writes it; it is the only reader of its ``domains`` (every item's ``domain``
must be one of them: one-line error otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.io import atomic_path, jsonable, write_json

__all__ = [
    "ENCODE_HINT",
    "LATENT_KEYS",
    "LatentSpace",
    "LatentDatalist",
    "read_datalist",
    "read_items",
    "latent_record",
    "load_latent",
    "save_latent",
    "latent_affine",
]

ENCODE_HINT = (
    "make it with meduet_vae's encode workflow (python -m monai.bundle run --config_file "
    "\"['<meduet_vae>/configs/encode.yaml','<meduet_vae>/configs/presets/demo.yaml']\")"
)

#: The latent datalist's facts that a downstream checkpoint record copies (``latent_record``).
LATENT_KEYS = ("latent_channels", "downsample_factor", "latent_scale_factor", "latent_std", "latent_mean",
               "domains", "heldout_domains", "labels", "modality", "preprocessing", "vae_config_hash",
               "augmentation")


# ----------------------------------------------------------------------------------------------------------------
# the latent space
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentSpace:
    """Scaled latents = cached latents x ``scale_factor``.

    Build it from what carries the facts: ``from_vae(vae)`` (meduet_vae's network), ``from_record(mapping)`` (a
    latent datalist, or the record of a downstream checkpoint, which copies them).

    Attributes:
        scale_factor: ``latent_scale_factor`` (``1 / std`` of the VAE's training latents).
        channels: latent channels (None if unknown).
        downsample_factor: image voxels per latent voxel along each axis (None if unknown).
        vae_config_hash: which VAE made the latents (None if unknown).
    """

    scale_factor: float
    channels: int | None = None
    downsample_factor: int | None = None
    vae_config_hash: str | None = None

    @classmethod
    def from_vae(cls, vae: Any) -> LatentSpace:
        """The latent space of a ``MeduetVAE`` (its record's scale factor, channels, downsampling and hash)."""
        meta = getattr(vae, "meta", {}) or {}
        return cls(float(meta.get("latent_scale_factor", 1.0)), int(vae.architecture["latent_channels"]),
                   int(vae.downsample_factor), meta.get("config_hash"))

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "the record") -> LatentSpace:
        """The latent space a latent datalist or a downstream checkpoint record describes."""
        if record.get("latent_scale_factor") is None:
            raise MeduetConfigError(f"{where} has no latent_scale_factor; it does not describe meduet_vae latents "
                                    f"({ENCODE_HINT})")
        ch, f = record.get("latent_channels"), record.get("downsample_factor")
        return cls(float(record["latent_scale_factor"]), None if ch is None else int(ch),
                   None if f is None else int(f), record.get("vae_config_hash"))

    @staticmethod
    def measured(std: float) -> dict[str, float]:
        """The record entries of a VAE whose training latents have standard deviation ``std``: the scale factor
        ``1 / std`` that gives the downstream stages unit-variance latents, and ``std`` itself."""
        return {"latent_scale_factor": 1.0 / std, "latent_std": std}

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Cached latents (any shape, any float dtype; a MONAI ``MetaTensor`` stays one) -> scaled float32 latents,
        what every network here sees."""
        return z.float() * self.scale_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> what the VAE decoder takes."""
        return z / self.scale_factor

    def facts(self) -> dict[str, Any]:
        """The keys a checkpoint record stores about this space."""
        out: dict[str, Any] = {"latent_scale_factor": self.scale_factor}
        if self.channels is not None:
            out["latent_channels"] = self.channels
        if self.downsample_factor is not None:
            out["downsample_factor"] = self.downsample_factor
        if self.vae_config_hash is not None:
            out["vae_config_hash"] = self.vae_config_hash
        return out

    def check_same(self, other: LatentSpace, this: str, that: str) -> None:
        """One-line error when two things that must share a latent space come from different VAEs (config hash,
        channels); unknown facts on either side are not compared."""
        for key, a, b in (("vae_config_hash", self.vae_config_hash, other.vae_config_hash),
                          ("latent_channels", self.channels, other.channels)):
            if a is not None and b is not None and a != b:
                raise MeduetConfigError(
                    f"'{this}' has {key}={a!r} but '{that}' has {key}={b!r}: they come from different VAEs; use "
                    "the checkpoints and latents of one chain (encode the data with the VAE the next stage was "
                    "trained on, or retrain it on this cache)")


def latent_record(latents: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """What a downstream checkpoint records about the latent cache it was trained on (``LATENT_KEYS``), plus
    ``extra`` (e.g. ``crop_size``)."""
    rec = {k: jsonable(latents[k]) for k in LATENT_KEYS if k in latents}
    rec.update({k: jsonable(v) for k, v in extra.items()})
    return rec


# ----------------------------------------------------------------------------------------------------------------
# latent files
# ----------------------------------------------------------------------------------------------------------------
def load_latent(path: str | Path) -> torch.Tensor:
    """A cached latent (4D NIfTI, channels last) as ``(C, X, Y, Z)`` float32, unscaled."""
    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if arr.ndim != 4:
        raise MeduetConfigError(f"latent '{path}' is not 4D (channels last); {ENCODE_HINT}")
    return torch.from_numpy(np.moveaxis(arr, -1, 0).copy())


def latent_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a latent grid ``factor`` times coarser than the image grid it was encoded from: latent voxel ``i``
    covers image voxels ``f*i .. f*i+f-1``, so its centre sits at image index ``f*i + (f-1)/2``."""
    a = np.asarray(affine, dtype=np.float64).copy()
    out = a.copy()
    out[:3, :3] = a[:3, :3] * factor
    out[:3, 3] = a[:3, :3] @ np.full(3, (factor - 1) / 2.0) + a[:3, 3]
    return out


def save_latent(path: str | Path, latent: np.ndarray, image_affine: np.ndarray, factor: int) -> None:
    """Write an unscaled latent ``(C, X, Y, Z)`` as a channels-last 4D NIfTI on the latent grid of an image with
    ``image_affine`` (atomically)."""
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(np.moveaxis(np.asarray(latent), 0, -1).astype(np.float32),
                                 latent_affine(image_affine, factor)), tmp)


# ----------------------------------------------------------------------------------------------------------------
# latent datalists
# ----------------------------------------------------------------------------------------------------------------
class LatentDatalist:
    """A latent datalist: ``LatentDatalist(path)`` reads and checks it (one-line errors naming the file and the fix).

    ``data`` is the JSON as written; ``domains`` its site order (the index of ``domain_index``); ``space`` its
    ``LatentSpace``; ``items(split, optional_splits=())`` a split's items with absolute ``latent`` (and
    ``latent_aug``) paths and a ``domain_index``, followed by the items of those ``optional_splits`` it has
    (e.g. the sample data's unlabeled ``pretraining`` pool).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise MeduetConfigError(f"latent datalist '{self.path}' does not exist; {ENCODE_HINT}")
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MeduetInputError(f"{self.path}: not readable JSON ({type(e).__name__}); {ENCODE_HINT}") from None
        if not isinstance(data, dict) or "latent_channels" not in data or "domains" not in data:
            raise MeduetInputError(f"{self.path}: not a latent datalist written by meduet_vae's encode.yaml; "
                                   f"{ENCODE_HINT}")
        domains = data["domains"]
        if not isinstance(domains, list) or not domains or not all(isinstance(d, str) and d for d in domains):
            raise MeduetInputError(f"{self.path}: 'domains' must be a non-empty list of site names, got {domains!r}; "
                                   f"{ENCODE_HINT}")
        self.data: dict[str, Any] = data
        self.domains: list[str] = list(domains)
        self.base = os.path.dirname(os.path.abspath(self.path))

    @property
    def space(self) -> LatentSpace:
        return LatentSpace.from_record(self.data, self.path)

    def __contains__(self, split: str) -> bool:
        return split in self.data

    def items(self, split: str, optional_splits: Sequence[str] = ()) -> list[dict[str, Any]]:
        if split not in self.data:
            raise MeduetInputError(f"{self.path}: has no split '{split}'")
        items = self._items(split)
        for extra in optional_splits:
            if extra in self.data and extra != split:
                items += self._items(extra)
        return items

    def _items(self, split: str) -> list[dict[str, Any]]:
        rows = []
        for i, item in enumerate(self.data[split]):
            where = f"{self.path}: item {i} of '{split}'"
            latent = os.path.join(self.base, item["latent"])
            if not os.path.isfile(latent):
                raise MeduetInputError(f"{where}: latent file '{latent}' does not exist; {ENCODE_HINT}")
            if item.get("domain") not in self.domains:
                raise MeduetInputError(f"{where}: domain {item.get('domain')!r} not in {self.domains}")
            row = {**item, "latent": latent, "domain_index": self.domains.index(item["domain"])}
            if item.get("latent_aug"):
                row["latent_aug"] = [os.path.join(self.base, p) for p in item["latent_aug"]]
                for p in row["latent_aug"]:
                    if not os.path.isfile(p):
                        raise MeduetInputError(f"{where}: augmented latent '{p}' does not exist; {ENCODE_HINT}")
            rows.append(row)
        return rows

    @staticmethod
    def write(path: str | Path, data: Mapping[str, Any]) -> str:
        """Write a latent datalist (atomically) after checking it has the facts readers need."""
        needed = ("latent_channels", "downsample_factor", "latent_scale_factor", "domains")
        missing = [k for k in needed if k not in data]
        if missing:
            raise MeduetConfigError(f"latent datalist for '{path}' lacks {missing}")
        return write_json(path, dict(data))


def read_datalist(path: str | Path) -> dict[str, Any]:
    """The latent datalist's JSON (checked; see ``LatentDatalist``)."""
    return LatentDatalist(path).data


def read_items(path: str | Path, split: str, optional_splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A split's items of a latent datalist (see ``LatentDatalist.items``)."""
    return LatentDatalist(path).items(split, optional_splits)
