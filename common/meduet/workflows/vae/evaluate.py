"""meduet_vae evaluate.yaml: reconstruction quality (PSNR, SSIM, MS-SSIM) and the seam error of patch-wise encoding,
per case, per site and overall, with pictures and NIfTI reconstructions. The modality comes from the datalist's
top-level ``modality`` when it has one (an MR datalist is percentile-scaled even through a VAE trained on CT)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meduet import records
from meduet.data import case_name, get_load_transforms, load_datalist
from meduet.data.reference import noise_free_phantom
from meduet.io import removes_partial_outputs, save_nifti
from meduet.errors import MeduetInputError
from meduet.metrics.reconstruction import anatomy_fidelity, reconstruction_metrics, seam_error
from meduet.networks.vae import PatchEncoding
from meduet.viz import save_orthoslices
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.vae.common import load_case, preprocessing_for

__all__ = ["Config", "run"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Config(WorkflowConfig):
    """evaluate.yaml: the VAE checkpoint, the datalist split it is measured on, where the report goes."""

    vae_ckpt: str
    datalist: str
    output_dir: str
    split: str = "test"
    patch_size: Sequence[int] | int | None = None
    overlap: float | None = None
    compare_ckpt: str | None = None
    max_cases: int | None = None
    save_images: int = 4
    save_nifti: int = 2
    seam_width: int = 1
    noise_free: bool = True
    device: str | torch.device = "cpu"


def noise_free_on_grid(datalist: str, item: dict[str, Any], prep: dict[str, Any], affine: np.ndarray,
                       shape: Sequence[int]) -> np.ndarray | None:
    """The generated phantom ``item`` without noise, windowed like the input and placed on the evaluated grid
    (``affine``, ``shape``: the preprocessed image's); ``None`` when the datalist is not the generated phantoms,
    the modality is not CT or the grids differ by more than a whole-voxel shift (a resampled input)."""
    if prep.get("modality", "CT") != "CT":
        return None
    try:
        hu, src_affine = noise_free_phantom(datalist, item)
    except MeduetInputError:
        return None
    lo, hi = prep.get("ct_window", (-175.0, 250.0))
    windowed = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    m = np.linalg.inv(src_affine) @ np.asarray(affine, dtype=np.float64)  # evaluated voxel -> phantom voxel
    off = m[:3, 3]
    if not np.allclose(m[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(off, np.round(off), atol=1e-3):
        return None
    off = np.round(off).astype(int)
    out = np.zeros(tuple(int(v) for v in shape), np.float32)
    dst, src = [], []
    for n, o, size in zip(out.shape, off, windowed.shape):
        d0, d1 = max(0, -o), min(n, size - o)
        if d1 <= d0:
            return None
        dst.append(slice(d0, d1))
        src.append(slice(d0 + o, d1 + o))
    out[tuple(dst)] = windowed[tuple(src)]
    return out


@torch.no_grad()
@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """PSNR / SSIM / MS-SSIM of whole-volume reconstruction, and the seam error of patch-wise encoding followed by
    whole-volume decoding (the scheme's decoding windows when its ``decode_window`` is set), per case, per domain
    and overall. The patch-wise encoding is the VAE's own
    (``PatchEncoding.of``: the scheme its decoder was fine-tuned with, which encode.yaml also uses; 32^3 windows
    without overlap for a VAE without one), ``patch_size`` / ``overlap`` override it; seams are measured at the
    borders MONAI's sliding windows really have (``metrics.reconstruction.window_borders``).

    ``compare_ckpt`` (e.g. the checkpoint before decoder fine-tuning) gets the same seam measurement, so the
    report shows before/after. Writes ``metrics.json``, ``cases.csv``, a PNG per case (up to ``save_images``:
    input, reconstruction, error, patch-wise reconstruction and its error) and reconstructions as NIfTI (up to
    ``save_nifti``) into ``output_dir``. Returns the metrics dict.
    """
    cfg = config
    vae_ckpt, datalist, split = cfg.vae_ckpt, cfg.datalist, cfg.split
    output_dir = cfg.output_dir
    compare_ckpt, seam_width = cfg.compare_ckpt, cfg.seam_width
    device = torch.device(cfg.device)
    vae = records.load(vae_ckpt, device, expect="vae")
    scheme = PatchEncoding.of(vae, cfg.patch_size, cfg.overlap, default=PatchEncoding(32))
    patch_size = scheme.patch_size
    other = None
    if compare_ckpt and Path(compare_ckpt).is_file() and Path(compare_ckpt).resolve() != Path(vae_ckpt).resolve():
        other = records.load(compare_ckpt, device, expect="vae")
    dl = load_datalist(datalist, split=split)
    items = dl[split][: cfg.max_cases or None]
    prep = preprocessing_for(vae, dl)
    transform = get_load_transforms(**prep, keys=("image", "label"),  # a 4-D image: one line, not a conv error
                                    expected_channels=int(vae.architecture.get("in_channels", 1)))
    heldout = set(dl.get("heldout_domains", []))
    # organs whose contrast the anatomy check follows: every labelled class but background (0) and body (1)
    organs = {str(v): int(k) for k, v in (dl.get("labels") or {}).items() if str(k).isdigit() and int(k) > 1}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    cases: list[dict[str, Any]] = []
    for n, item in enumerate(tqdm(items, desc=f"evaluate {split}", disable=os.environ.get("MEDUET_PROGRESS") == "0")):
        x, affine, data = load_case(transform, item, device)
        recon = vae.reconstruct(x).clamp(0, 1)
        z_patch = scheme.encode(vae, x)
        recon_patch = scheme.decode(vae, z_patch).clamp(0, 1)  # one decoder call unless decode_window is set
        borders = scheme.borders(x.shape[2:], vae.downsample_factor)
        rec = {
            "case": case_name(item),
            "domain": item.get("domain", ""),
            "subject": item.get("subject", ""),
            "heldout": item.get("domain") in heldout,
            **reconstruction_metrics(recon, x),
            **{f"patchwise_{k}": v for k, v in reconstruction_metrics(recon_patch, x).items() if k == "psnr"},
            **seam_error(recon_patch, x, width=seam_width, borders=borders),
        }
        nf = (noise_free_on_grid(datalist, item, prep, affine, x.shape[2:])
              if cfg.noise_free and data.get("label") is not None else None)
        if nf is not None:  # generated phantoms: anatomy kept vs noise not copied
            fid = anatomy_fidelity(recon, x, torch.from_numpy(nf), torch.as_tensor(data["label"]), organs)
            rec.update({k: v for k, v in fid.items() if k != "psnr"})
        if other is not None:
            before = scheme.decode(other, scheme.encode(other, x)).clamp(0, 1)
            rec.update({f"before_{k}": v for k, v in seam_error(before, x, width=seam_width, borders=borders).items()})
            rec["before_patchwise_psnr"] = reconstruction_metrics(before, x)["psnr"]
        cases.append(rec)
        if n < cfg.save_images:
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
        if n < cfg.save_nifti:
            save_nifti(out / "recon" / f"{rec['case']}_recon.nii.gz", recon[0, 0].cpu().numpy(), affine)
            save_nifti(out / "recon" / f"{rec['case']}_input.nii.gz", x[0, 0].cpu().numpy(), affine)

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
        "patch_encoding": scheme.record(),
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
