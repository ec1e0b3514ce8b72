"""meduet_vae encode.yaml: the latent cache of a datalist (posterior means of whole volumes encoded patch-wise) and
its latent datalist (``meduet.latent``), which every later stage reads."""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meduet import records
from meduet.data import SyntheticSiteAugment, case_name, get_appearance_augment, get_load_transforms, load_datalist
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs
from meduet.latent import LatentDatalist, LatentSpace, save_latent
from meduet.networks.vae import PatchEncoding
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.vae.common import load_case, preprocessing_for

logger = logging.getLogger(__name__)

#: The patch-wise encoding of a VAE whose record has none (its decoder was not fine-tuned on patch-wise latents,
#: e.g. stage 1 or MAISI's weights): large windows, blended where they overlap.
UNTUNED_ENCODING = PatchEncoding(64, 0.25, "gaussian")

__all__ = ["Config", "run"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """encode.yaml: the VAE checkpoint, the image datalist, where the latent cache goes and how it is made.
    ``patch_size`` / ``overlap``: None (the default) takes the VAE's own ``PatchEncoding`` (the scheme its decoder
    was fine-tuned with, from its record), so the cache holds the latents the decoder learned to decode."""

    vae_ckpt: str
    datalist: str
    output_dir: str
    splits: Sequence[str] = ("training", "validation", "test")
    patch_size: Sequence[int] | int | None = None
    overlap: float | None = None
    device: str | torch.device = "cpu"
    augment_copies: int = 0
    augment_splits: Sequence[str] = ("training",)
    augment_strength: float = 1.0
    augment_seed: int = 0
    augment_kind: str = "appearance"


@torch.no_grad()
@removes_partial_outputs
def run(config: Config) -> str:
    """Cache the latent mean of every item (whole volumes of any size, encoded patch-wise) as 4D NIfTI.

    With ``augment_copies > 0``, items of ``augment_splits`` also get that many appearance-augmented copies of
    the preprocessed image, of ``augment_kind`` ``"appearance"`` (:func:`meduet.data.get_appearance_augment`,
    ``augment_strength``: monotone curves, bias field, blur, noise) or ``"synthetic_site"``
    (:class:`meduet.data.SyntheticSiteAugment`: each intensity class repainted with its own random value;
    ``augment_strength`` unused), seeded by ``augment_seed``, the case name and the copy number, written as
    ``latents/<case>_aug<k>.nii.gz`` and listed in the item's ``latent_aug``; meduet_pretrain's content eraser and
    its ``aug_content`` / ``cross_appearance`` terms use them. ``latent_std`` is measured on
    the unaugmented latents only.

    Each latent ``(c, h, w, d)`` is written as ``<output_dir>/latents/<case>.nii.gz`` (channels last, an affine
    whose voxels are ``downsample_factor`` times larger), and ``<output_dir>/datalist.json`` lists them with
    the source image/label, domain, original spacing, and the VAE facts the next stage needs
    (``latent_scale_factor`` from the checkpoint and ``latent_std`` measured over this cache).
    Files are written atomically; the datalist last, so a partial run leaves no datalist that lies.
    Returns the latent datalist path.
    """
    cfg = config
    vae_ckpt, datalist, output_dir = cfg.vae_ckpt, cfg.datalist, cfg.output_dir
    augment_copies, augment_splits, augment_strength = cfg.augment_copies, cfg.augment_splits, cfg.augment_strength
    augment_seed, augment_kind = cfg.augment_seed, cfg.augment_kind
    device = torch.device(cfg.device)
    vae = records.load(vae_ckpt, device, expect="vae")
    scheme = PatchEncoding.of(vae, cfg.patch_size, cfg.overlap, default=UNTUNED_ENCODING)
    if not vae.meta.get("patch_encoding"):
        logger.info(f"'{vae_ckpt}' records no patch encoding (decoder not fine-tuned): encoding with {scheme.record()}")
    dl = load_datalist(datalist)
    splits = [s for s in cfg.splits if s in dl]
    if not any(dl[s] for s in splits):
        present = sorted(k for k, v in dl.items() if isinstance(v, list) and v and isinstance(v[0], dict))
        raise MeduetConfigError(f"'{datalist}' has no items in the splits to encode {list(cfg.splits)} (it has "
                                f"{present}); fix the datalist or the `splits` key")
    prep = preprocessing_for(vae, dl)
    transform = get_load_transforms(**prep, keys=("image", "label"),  # a 4-D image: one line, not a conv error
                                    expected_channels=int(vae.architecture.get("in_channels", 1)))
    out = Path(output_dir)
    f = vae.downsample_factor
    total, total_sq, count = 0.0, 0.0, 0
    result: dict[str, Any] = {
        "name": f"{dl.get('name', 'dataset')}_latents",
        "source_datalist": os.path.abspath(datalist),
        "modality": prep.get("modality"),
        "domains": dl["domains"],
        "heldout_domains": dl.get("heldout_domains", []),
        "labels": dl.get("labels", {}),
        "vae_ckpt": os.path.abspath(vae_ckpt),
        "vae_config_hash": vae.meta.get("config_hash"),
        "latent_channels": int(vae.architecture["latent_channels"]),
        "downsample_factor": f,
        "latent_scale_factor": LatentSpace.from_vae(vae).scale_factor,
        "preprocessing": prep,
        "patch_encoding": scheme.record(),
    }
    if augment_copies < 0:
        raise MeduetConfigError(f"augment_copies must be >= 0, got {augment_copies}")
    kinds = {"appearance": lambda: get_appearance_augment(augment_strength), "synthetic_site": SyntheticSiteAugment}
    if augment_kind not in kinds:
        raise MeduetConfigError(f"augment_kind must be one of {sorted(kinds)}, got {augment_kind!r}")
    augment = kinds[augment_kind]() if augment_copies else None
    if augment_copies:
        result["augmentation"] = {"copies": int(augment_copies), "splits": list(augment_splits),
                                  "kind": augment_kind, "strength": float(augment_strength),
                                  "seed": int(augment_seed)}
    seen: set[str] = set()
    for split in splits:
        rows = []
        for item in tqdm(dl[split], desc=f"encode {split}", disable=os.environ.get("MEDUET_PROGRESS") == "0"):
            x, affine, _ = load_case(transform, item, device)
            z = scheme.encode(vae, x)
            z_np = z[0].float().cpu().numpy()
            name = case_name(item)
            if name in seen:  # the same image listed in two splits is encoded once
                name = f"{name}_{split}"
            seen.add(name)
            rel = f"latents/{name}.nii.gz"
            save_latent(out / rel, z_np, affine, f)
            total += float(z_np.sum())
            total_sq += float((z_np.astype(np.float64) ** 2).sum())
            count += z_np.size
            row = {k: v for k, v in item.items() if k not in ("domain_index",)}
            row.update(
                {
                    "latent": rel,
                    "domain": item.get("domain"),
                    "latent_shape": list(z_np.shape),
                    "image_shape": list(x.shape[2:]),
                    "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
                }
            )
            if augment is not None and split in augment_splits:
                row["latent_aug"] = []
                for k in range(int(augment_copies)):
                    augment.set_random_state(seed=(zlib.crc32(f"{name}:{k}".encode()) + int(augment_seed)) % 2**32)
                    xa = torch.as_tensor(augment(x[0].cpu())).float().unsqueeze(0).to(device)
                    za = scheme.encode(vae, xa)[0].float().cpu().numpy()
                    rel_aug = f"latents/{name}_aug{k}.nii.gz"
                    save_latent(out / rel_aug, za, affine, f)
                    row["latent_aug"].append(rel_aug)
            rows.append(row)
        result[split] = rows
    if count:
        mean = total / count
        result["latent_std"] = float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))
        result["latent_mean"] = float(mean)
    path = LatentDatalist.write(out / "datalist.json", result)
    print(f"meduet_vae encode: {sum(len(result[s]) for s in splits)} latents -> {path}")
    return path
