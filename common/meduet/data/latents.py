"""Transform chains over cached latents (meduet_vae's latent cache): random latent crops for self-supervised
pretraining, optionally paired with the same crop of an appearance-augmented copy of the latent (``latent_aug``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import monai.transforms as mt
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from meduet.data.checks import CheckedLoadImaged
from meduet.data.transforms import InputCheckedCompose, get_train_crop_transforms
from meduet.errors import MeduetInputError

__all__ = ["LoadAugmentedLatentsd", "PickAugmentedLatentd", "pretrain_transforms"]


class LoadAugmentedLatentsd:
    """Deterministic part of the pairing: loads every augmented copy listed in ``item[list_key]`` (absolute
    paths, as ``meduet.latent.LatentDatalist.items`` gives them) into ``item["<key>_copies"]`` ``(n, C, *spatial)``; an
    item without copies gets its own latent as the single copy (``aug_content`` is then 0 for it)."""

    def __init__(self, key: str = "latent", list_key: str = "latent_aug") -> None:
        self.key, self.list_key = key, list_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        ref = torch.as_tensor(d[self.key])
        load = CheckedLoadImaged(["z"], image_only=True, ensure_channel_first=True)
        copies = []
        for p in d.get(self.list_key) or []:
            z = torch.as_tensor(load({"z": p})["z"]).float()
            if z.shape != ref.shape:
                raise MeduetInputError(f"{p}: augmented latent of shape {tuple(z.shape)} for a latent of "
                                       f"{tuple(ref.shape)}; re-run meduet_vae's encode.yaml")
            copies.append(z)
        d[f"{self.key}_copies"] = torch.stack(copies) if copies else ref.float().unsqueeze(0).clone()
        d.pop(self.list_key, None)
        return d


class PickAugmentedLatentd(Randomizable, MapTransform):
    """Random part of the pairing: ``item[out_key]`` = one of ``item["<key>_copies"]``, chosen at random, as a
    MetaTensor on the latent's grid, so the crop/flip/rotation transforms that follow treat both keys alike.
    (Randomizable: CacheDataset caches only what comes before it; ``EpochSeeder`` re-seeds it.)"""

    def __init__(self, key: str = "latent", out_key: str = "latent_aug") -> None:
        MapTransform.__init__(self, [key])
        self.key, self.out_key = key, out_key
        self._pick = 0

    def randomize(self, data: Any = None) -> None:
        self._pick = int(self.R.randint(int(data)))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        copies = d.pop(f"{self.key}_copies")
        self.randomize(len(copies))
        ref = d[self.key]
        pick = copies[self._pick]
        d[self.out_key] = MetaTensor(pick, meta=dict(ref.meta)) if isinstance(ref, MetaTensor) else pick
        return d


def pretrain_transforms(crop_size: Sequence[int], crops_per_latent: int = 1, augmented_pairs: bool = False):
    """The pretraining chain: load the latent, random crop(s), flips, rot90; with ``augmented_pairs`` also an
    intensity-augmented copy of the same latent (``latent_aug``), cropped and turned exactly like ``latent``.
    Items keep only ``latent``, ``domain_index`` (and ``latent_aug``)."""
    steps: list[Any] = [CheckedLoadImaged(["latent"], image_only=True, ensure_channel_first=True),
                        mt.EnsureTyped(["latent"], dtype=torch.float32)]
    keys = ["latent"]
    if augmented_pairs:
        steps += [LoadAugmentedLatentsd(), PickAugmentedLatentd()]
        keys.append("latent_aug")
    steps += list(get_train_crop_transforms(crop_size, keys=keys, num_samples=crops_per_latent).transforms)
    # only what the step uses, so that items with and without e.g. a label (the unlabeled pretraining pool) or
    # other metadata share a batch
    steps.append(mt.SelectItemsd([*keys, "domain_index"], allow_missing_keys=True))
    return InputCheckedCompose(steps)
