"""meduet_vae workflows that are loops over a datalist: evaluation (metrics, seams, pictures) and latent caching.

Both read everything about the VAE (architecture, preprocessing, latent scale factor) from its checkpoint,
and take the modality from the datalist's top-level ``modality`` when it has one (so an MR datalist is
percentile-scaled even through a VAE trained on CT).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from meduet.data import (SyntheticSiteAugment, get_appearance_augment, get_load_transforms, load_datalist,
                         write_datalist)
from meduet.errors import MeduetConfigError
from meduet.io import atomic_path
from meduet.metrics.reconstruction import reconstruction_metrics, seam_error
from meduet.networks.vae import MeduetVAE, encode_patchwise, load_vae
from meduet.viz import save_orthoslices

__all__ = ["preprocessing_for", "evaluate_vae", "encode_datalist", "latent_affine", "case_name"]

logger = logging.getLogger(__name__)

VAE_FIX = (
    "train it first: python -m monai.bundle run training --config_file "
    "\"['bundles/meduet_vae/configs/train.yaml','bundles/meduet_vae/configs/presets/demo.yaml']\""
)


def preprocessing_for(vae: MeduetVAE, datalist: dict[str, Any] | None = None, **override: Any) -> dict[str, Any]:
    """The VAE's stored preprocessing, with the datalist's ``modality`` and explicit overrides applied."""
    prep = dict(vae.meta.get("preprocessing") or {})
    if datalist is not None and datalist.get("modality"):
        prep["modality"] = datalist["modality"]
    prep.update({k: v for k, v in override.items() if v is not None})
    prep.setdefault("pad_multiple", vae.downsample_factor)
    return prep


def case_name(item: dict[str, Any]) -> str:
    """A file-name-safe case id: the image file name without its extension."""
    name = os.path.basename(os.path.normpath(str(item["image"])))
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def latent_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a latent grid that is ``factor`` times coarser than the image grid it was encoded from.

    Latent voxel ``i`` covers image voxels ``f*i .. f*i+f-1``; its centre sits at image index ``f*i + (f-1)/2``.
    """
    a = np.asarray(affine, dtype=np.float64).copy()
    out = a.copy()
    out[:3, :3] = a[:3, :3] * factor
    out[:3, 3] = a[:3, :3] @ np.full(3, (factor - 1) / 2.0) + a[:3, 3]
    return out


def _atomic_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)


def _affine_of(t: torch.Tensor) -> np.ndarray:
    aff = getattr(t, "affine", None)
    return np.eye(4) if aff is None else np.asarray(aff.cpu().numpy() if hasattr(aff, "cpu") else aff, dtype=np.float64)


def _load_case(transform, item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, np.ndarray, dict]:
    data = transform({k: v for k, v in item.items() if k in ("image", "label")})
    image = data["image"]
    affine = _affine_of(image)
    x = (image.as_tensor() if hasattr(image, "as_tensor") else image).unsqueeze(0).float().to(device)
    return x, affine, data


@torch.no_grad()
def evaluate_vae(
    vae_ckpt: str,
    datalist: str,
    split: str = "test",
    output_dir: str = "bundles/meduet_vae/eval",
    patch_size: Sequence[int] | int = 32,
    compare_ckpt: str | None = None,
    max_cases: int | None = None,
    save_images: int = 4,
    save_nifti: int = 2,
    seam_width: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """PSNR / SSIM / MS-SSIM of whole-volume reconstruction, and the seam error of patch-wise encoding
    (``patch_size``, no overlap) followed by whole-volume decoding, per case, per domain and overall.

    ``compare_ckpt`` (e.g. the checkpoint before decoder fine-tuning) gets the same seam measurement, so the
    report shows before/after. Writes ``metrics.json``, ``cases.csv``, a PNG per case (up to ``save_images``:
    input, reconstruction, error, patch-wise reconstruction and its error) and reconstructions as NIfTI (up to
    ``save_nifti``) into ``output_dir``. Returns the metrics dict.
    """
    device = torch.device(device)
    vae = load_vae(vae_ckpt, device=device) if Path(vae_ckpt).is_file() else None
    if vae is None:
        raise MeduetConfigError(f"VAE checkpoint '{vae_ckpt}' does not exist; {VAE_FIX}")
    other = None
    if compare_ckpt and Path(compare_ckpt).is_file() and Path(compare_ckpt).resolve() != Path(vae_ckpt).resolve():
        other = load_vae(compare_ckpt, device=device)
    dl = load_datalist(datalist, split=split)
    items = dl[split][: max_cases or None]
    prep = preprocessing_for(vae, dl)
    transform = get_load_transforms(**prep, keys=("image", "label"))
    heldout = set(dl.get("heldout_domains", []))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    cases: list[dict[str, Any]] = []
    for n, item in enumerate(tqdm(items, desc=f"evaluate {split}", disable=os.environ.get("MEDUET_PROGRESS") == "0")):
        x, affine, _ = _load_case(transform, item, device)
        recon = vae.reconstruct(x).clamp(0, 1)
        z_patch = encode_patchwise(vae, x, patch_size=patch_size, overlap=0.0)
        recon_patch = vae.decode(z_patch).clamp(0, 1)
        rec = {
            "case": case_name(item),
            "domain": item.get("domain", ""),
            "subject": item.get("subject", ""),
            "heldout": item.get("domain") in heldout,
            **reconstruction_metrics(recon, x),
            **{f"patchwise_{k}": v for k, v in reconstruction_metrics(recon_patch, x).items() if k == "psnr"},
            **seam_error(recon_patch, x, patch_size, seam_width),
        }
        if other is not None:
            before = other.decode(encode_patchwise(other, x, patch_size=patch_size, overlap=0.0)).clamp(0, 1)
            rec.update({f"before_{k}": v for k, v in seam_error(before, x, patch_size, seam_width).items()})
            rec["before_patchwise_psnr"] = reconstruction_metrics(before, x)["psnr"]
        cases.append(rec)
        if n < save_images:
            save_orthoslices(
                out / "images" / f"{rec['case']}.png",
                {
                    "input": x,
                    "reconstruction": recon,
                    "|error|": (recon - x).abs(),
                    f"patch-wise {patch_size}": recon_patch,
                    "|patch-wise error|": (recon_patch - x).abs(),
                },
                title=f"{rec['case']} ({rec['domain']}): PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}, "
                f"seam ratio {rec['seam_ratio']:.2f}",
                ranges={"input": (0, 1), "reconstruction": (0, 1), f"patch-wise {patch_size}": (0, 1),
                        "|error|": (0, 0.3), "|patch-wise error|": (0, 0.3)},
                cmaps={"|error|": "magma", "|patch-wise error|": "magma"},
            )
        if n < save_nifti:
            _atomic_nifti(out / "recon" / f"{rec['case']}_recon.nii.gz", recon[0, 0].cpu().numpy(), affine)
            _atomic_nifti(out / "recon" / f"{rec['case']}_input.nii.gz", x[0, 0].cpu().numpy(), affine)

    keys = [k for k, v in cases[0].items() if isinstance(v, float)] if cases else []

    def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {k: float(np.nanmean([r[k] for r in rows])) for k in keys} | {"n": len(rows)}

    by_domain: dict[str, list] = defaultdict(list)
    for r in cases:
        by_domain[r["domain"]].append(r)
    metrics = {
        "vae_ckpt": str(vae_ckpt),
        "compare_ckpt": str(compare_ckpt) if other is not None else None,
        "datalist": str(datalist),
        "split": split,
        "patch_size": patch_size,
        "overall": summary(cases),
        "seen_domains": summary([r for r in cases if not r["heldout"]]) if any(not r["heldout"] for r in cases) else {},
        "heldout_domains": summary([r for r in cases if r["heldout"]]) if any(r["heldout"] for r in cases) else {},
        "per_domain": {d: summary(rows) for d, rows in sorted(by_domain.items())},
        "cases": cases,
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    with open(out / "cases.csv", "w", newline="") as f:
        if cases:
            w = csv.DictWriter(f, fieldnames=list(cases[0].keys()))
            w.writeheader()
            w.writerows(cases)
    o = metrics["overall"]
    logger.info(f"VAE {split}: PSNR {o.get('psnr', float('nan')):.2f} dB, SSIM {o.get('ssim', float('nan')):.3f} "
                f"over {len(cases)} cases -> {out / 'metrics.json'}")
    print(f"meduet_vae evaluate: {len(cases)} cases, PSNR {o.get('psnr', float('nan')):.2f} dB, "
          f"SSIM {o.get('ssim', float('nan')):.3f}, seam ratio {o.get('seam_ratio', float('nan')):.3f} -> {out}")
    return metrics


@torch.no_grad()
def encode_datalist(
    vae_ckpt: str,
    datalist: str,
    output_dir: str = "bundles/meduet_vae/latents",
    splits: Sequence[str] = ("training", "validation", "test"),
    patch_size: Sequence[int] | int = 64,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
    augment_copies: int = 0,
    augment_splits: Sequence[str] = ("training",),
    augment_strength: float = 1.0,
    augment_seed: int = 0,
    augment_kind: str = "appearance",
) -> str:
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
    device = torch.device(device)
    if not Path(vae_ckpt).is_file():
        raise MeduetConfigError(f"VAE checkpoint '{vae_ckpt}' does not exist; {VAE_FIX}")
    vae = load_vae(vae_ckpt, device=device)
    dl = load_datalist(datalist)
    splits = [s for s in splits if s in dl]
    prep = preprocessing_for(vae, dl)
    transform = get_load_transforms(**prep, keys=("image", "label"))
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
        "latent_scale_factor": vae.latent_scale_factor,
        "preprocessing": prep,
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
            x, affine, _ = _load_case(transform, item, device)
            z = encode_patchwise(vae, x, patch_size=patch_size, overlap=overlap, mode="gaussian" if overlap else "constant")
            z_np = z[0].float().cpu().numpy()
            name = case_name(item)
            if name in seen:  # the same image listed in two splits is encoded once
                name = f"{name}_{split}"
            seen.add(name)
            rel = f"latents/{name}.nii.gz"
            _atomic_nifti(out / rel, np.moveaxis(z_np, 0, -1).astype(np.float32), latent_affine(affine, f))
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
                    za = encode_patchwise(vae, xa, patch_size=patch_size, overlap=overlap,
                                          mode="gaussian" if overlap else "constant")[0].float().cpu().numpy()
                    rel_aug = f"latents/{name}_aug{k}.nii.gz"
                    _atomic_nifti(out / rel_aug, np.moveaxis(za, 0, -1).astype(np.float32), latent_affine(affine, f))
                    row["latent_aug"].append(rel_aug)
            rows.append(row)
        result[split] = rows
    if count:
        mean = total / count
        result["latent_std"] = float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))
        result["latent_mean"] = float(mean)
    path = write_datalist(out / "datalist.json", result)
    print(f"meduet_vae encode: {sum(len(result[s]) for s in splits)} latents -> {path}")
    return path
