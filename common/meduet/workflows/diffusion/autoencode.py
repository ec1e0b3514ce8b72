"""meduet_diffusion autoencode.yaml: diffusion autoencoding with a generator that has a code per scan -- an LDAE
(condition ``semantic``, its encoder trained with it) or one conditioned on MeDUET's frozen pretrained factors
(condition ``factors``; ``meduet.workflows.diffusion.codes``): a latent -> its code + its inverted noise -> the
reconstructed latent -> the VAE decoder, scored against the input scan next to the VAE's own reconstruction of the
same latent (the ceiling: the diffusion decoder cannot do better than the latent it reconstructs)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data import get_load_transforms
from meduet.engines.diffusion import center_crop_or_pad
from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.reconstruction import reconstruction_metrics
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.codes import GeneratorCodes
from meduet.workflows.diffusion.common import check_vae, decode, fit_slices, save_volume

__all__ = ["Config", "run"]

#: the rows of the report: what each reconstruction is
ROWS = {"vae": "the VAE decoding the input latent (ceiling)",
        "ldae": "code + inverted noise -> diffusion decoder -> VAE",
        "ldae_code_only": "code + random noise -> diffusion decoder -> VAE (what the code alone keeps)"}


@dataclasses.dataclass
class Config(WorkflowConfig):
    """autoencode.yaml: the generator (``model_ckpt``: meduet_diffusion's ``models/ldae/model.pt``, or
    ``models/model.pt`` conditioned on factors with the ``pretrain_ckpt`` it was trained with), the VAE it was
    trained on, the latent datalist split to reconstruct, the number of cases and the sampler steps (DDIM for ddpm
    generators, Euler for rflow ones; inversion uses the same grid)."""

    model_ckpt: str
    vae_ckpt: str
    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    split: str = "test"
    max_cases: int = 0
    num_steps: int = 50
    seed: int = 0
    save_volumes: bool = True
    device: str | torch.device = "cpu"


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Reconstruct ``split``'s latents through the generator's code and score them -> ``<output_dir>/
    autoencode.json`` (per case
    and mean PSNR / SSIM / MS-SSIM of each row of ``ROWS`` against the preprocessed input scan, with 95 % bootstrap
    intervals over cases, plus the LDAE reconstruction against the VAE's: how close the diffusion decoder gets to
    its ceiling), ``autoencode.png`` (middle axial slices) and, with ``save_volumes``, ``<case>_ldae.nii.gz``.

    Each latent is centre-cropped / padded to the generator's training crop (as transfer.yaml does); scores are
    taken on the part of the scan inside that crop."""
    cfg = config
    device = torch.device(cfg.device)
    codes = GeneratorCodes(cfg.model_ckpt, cfg.pretrain_ckpt, device)
    net, objective, rec = codes.net, codes.objective, codes.rec
    vae = records.load(cfg.vae_ckpt, device, expect="vae")
    check_vae(vae, rec, cfg.vae_ckpt, cfg.model_ckpt)
    items = LatentDatalist(cfg.latent_datalist).items(cfg.split)
    if cfg.max_cases < 0:
        raise MeduetConfigError(f"max_cases must be >= 0 (0 = all), got {cfg.max_cases}")
    items = items[: cfg.max_cases] if cfg.max_cases else items
    if not items:
        raise MeduetConfigError(f"split '{cfg.split}' of '{cfg.latent_datalist}' has no latents; choose another "
                                "--split")
    space = LatentSpace.from_record(rec, cfg.model_ckpt)
    crop = [int(c) for c in rec["crop_size"]]
    f = int(rec.get("downsample_factor") or 4)
    sampler = "rflow" if objective.objective == "rflow" else "ddim"
    transform = get_load_transforms(**dict(rec.get("preprocessing") or {}), keys=("image",))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases, pictures = [], []
    for item in items:
        z = load_latent(item["latent"])
        fit, src = fit_slices(z.shape[1:], crop)
        x = space.scale(center_crop_or_pad(z, crop)[None].float().to(device))
        cond = codes.cond(codes.encode(x))
        noise = invert_latents(net, x, cond, objective, num_steps=cfg.num_steps)
        z_rec = sample_latents(net, list(x.shape), cond, objective, sampler, cfg.num_steps, noise=noise)
        z_code = sample_latents(net, list(x.shape), cond, objective, sampler, cfg.num_steps, generator=gen)
        img_fit = tuple(slice(s.start * f, s.stop * f) for s in fit)
        vols = dict(zip(ROWS, (d[img_fit] for d in decode(vae, torch.cat([x, z_rec, z_code]), space))))
        image = np.asarray(transform({"image": item["image"]})["image"])[0]
        image = image[tuple(slice(s.start * f, s.stop * f) for s in src)].astype(np.float32)
        target = torch.as_tensor(image)[None, None]
        row = {"case": Path(item["latent"]).name.replace(".nii.gz", ""), "domain": item.get("domain"),
               "latent_rmse_ldae": float((z_rec - x).square().mean().sqrt())}
        for name, vol in vols.items():
            m = reconstruction_metrics(torch.as_tensor(vol)[None, None], target)
            row.update({f"{k}_{name}": v for k, v in m.items() if k != "ms_ssim_scales"})
        m = reconstruction_metrics(torch.as_tensor(vols["ldae"])[None, None], torch.as_tensor(vols["vae"])[None, None])
        row.update({"psnr_ldae_vs_vae": m["psnr"], "ssim_ldae_vs_vae": m["ssim"]})
        cases.append(row)
        if cfg.save_volumes:
            save_volume(out / f"{row['case']}_ldae.nii.gz", vols["ldae"], rec)
        if len(pictures) < 6:
            k = image.shape[2] // 2
            pictures.append([(f"input {row['domain']}", image[:, :, k])]
                            + [(name, v[:, :, k]) for name, v in vols.items()])
    keys = [k for k in cases[0] if k not in ("case", "domain")]
    summary: dict[str, Any] = {
        "model_ckpt": os.path.abspath(cfg.model_ckpt), "condition": codes.condition, "code": codes.what,
        "code_dim": codes.dim, "objective": objective.objective, "sampler": sampler,
        "num_steps": cfg.num_steps, "split": cfg.split, "cases": cases, "rows": ROWS,
        "mean": {k: float(np.mean([c[k] for c in cases])) for k in keys},
        # how far each mean could move with another draw of as many cases (cases resampled)
        "ci95": {k: list(bootstrap_mean_interval([c[k] for c in cases])) for k in keys},
    }
    summary["picture"] = save_pair_grid(out / "autoencode.png", pictures,
                                        title=f"diffusion autoencoding ({codes.condition}, {objective.objective}, "
                                              f"{cfg.num_steps} "
                                              f"{sampler} steps)").name
    write_json(out / "autoencode.json", summary)
    mean = summary["mean"]
    print("| reconstruction | PSNR (dB) | SSIM |\n|---|---|---|")
    for name in ROWS:
        print(f"| {name} | {mean[f'psnr_{name}']:.2f} | {mean[f'ssim_{name}']:.3f} |")
    return summary
