"""meduet_diffusion evaluate.yaml: FID and MMD of generated vs real latents' features (MedicalNet on decoded images
when ``medicalnet_weights`` is a local file, otherwise meduet_pretrain's encoder, a proxy labelled so), MS-SSIM
diversity of decoded volumes, and the validation denoising loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.engines.diffusion import ValidationLoss, center_crop_or_pad
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.features import build_feature_extractor
from meduet.metrics.generation import generation_report, outline_agreement
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.common import check_vae, conditioner_for, decode, generate, load_generator, load_prior

__all__ = ["Config", "run"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """evaluate.yaml: the generator and the checkpoints it chains, the latent datalist's real (``real_split``) and
    validation (``val_split``) latents, the feature extractor and the sampling settings."""

    model_ckpt: str
    vae_ckpt: str
    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    prior_ckpt: str | None = None
    #: factors condition: (content, style) of the generated latents from the factor prior (``prior``) or from the
    #: reference scans of ``reference_split`` (``reference``: each site's scans there, cycled to ``num_per_site``;
    #: use another split than ``real_split``, or the generator is handed the factors of the latents it is scored on)
    source: str = "prior"
    reference_split: str = "training"
    real_split: str = "test"
    val_split: str = "validation"
    features: str = "auto"
    medicalnet_weights: str | None = None
    medicalnet_depth: int = 10
    num_per_site: int = 4
    sampler: str | None = None
    num_steps: int | None = None
    guidance_scale: float = 1.5
    seed: int = 0
    max_real: int | None = None
    device: str | torch.device = "cpu"


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Generation quality of the EMA generator -> ``<output_dir>/metrics.json`` and ``real_vs_generated.png``.

    * FID and MMD between features of real latents (``real_items``, centre crops of the training crop size) and
      generated ones (``num_per_site`` per site, or in total without a condition; factors from the prior or from
      the reference scans of ``reference_split``, see ``source``). Features:
      MedicalNet on decoded images when ``medicalnet_weights`` is a local file (never downloaded), otherwise the
      pooled factors of meduet_pretrain's encoder, reported as a *proxy* (``fid_features`` names which).
    * MS-SSIM diversity of decoded generated and real volumes (mean over pairs; lower = more diverse).
    * Outline agreement (``meduet.metrics.generation.outline_agreement``): IoU of each decoded sample's Otsu
      foreground with the closest real one (``outline_iou_fake``), and of each real volume's with other subjects'
      (``outline_iou_real``).
    * The validation denoising loss on ``val_items`` (fixed crops, noise and timesteps, as in training).
    """
    cfg = config
    model_ckpt, vae_ckpt, pretrain_ckpt, features = cfg.model_ckpt, cfg.vae_ckpt, cfg.pretrain_ckpt, cfg.features
    sampler, num_steps, guidance_scale = cfg.sampler, cfg.num_steps, cfg.guidance_scale
    num_per_site, seed = cfg.num_per_site, cfg.seed
    cache = LatentDatalist(cfg.latent_datalist)
    real_items, val_items = cache.items(cfg.real_split), cache.items(cfg.val_split)
    device = torch.device(cfg.device)
    net, objective, rec = load_generator(model_ckpt, device)
    vae = records.load(vae_ckpt, device, expect="vae")
    check_vae(vae, rec, vae_ckpt, model_ckpt)
    condition = rec.get("condition", "none")
    space = LatentSpace.from_record(rec, model_ckpt)
    crop = [int(c) for c in rec["crop_size"]]
    conditioner = conditioner_for(rec, pretrain_ckpt, device) if condition == "factors" else None
    prior, reference_items = None, None
    if condition == "factors" and cfg.source == "prior":
        prior = load_prior(cfg.prior_ckpt, device, " or use source 'reference'")
    elif condition == "factors" and cfg.source == "reference":
        reference_items = cache.items(cfg.reference_split)
        if not reference_items:
            raise MeduetConfigError(f"source 'reference' needs reference scans: the '{cfg.reference_split}' split of "
                                    f"'{cfg.latent_datalist}' is empty (key reference_split)")
    elif condition == "factors":
        raise MeduetConfigError(f"source must be 'prior' or 'reference', got {cfg.source!r}")
    if not real_items:
        raise MeduetConfigError("evaluate needs real latents (the `real_split` of the latent datalist is empty)")
    if cfg.max_real:  # an even spread over the split (items are usually ordered by subject and site)
        idx = np.linspace(0, len(real_items) - 1, min(int(cfg.max_real), len(real_items))).round().astype(int)
        real_items = [real_items[i] for i in sorted(set(idx.tolist()))]
    real = torch.stack([center_crop_or_pad(load_latent(it["latent"]), crop) for it in real_items]).float()
    groups = ["all"] if condition == "none" else list(rec["domains"])
    if reference_items is not None:  # the sites that have reference scans
        groups = [g for g in groups if any(it.get("domain") == g for it in reference_items)]
        if not groups:
            raise MeduetConfigError(f"no site of the generator ({rec['domains']}) has a scan in the "
                                    f"'{cfg.reference_split}' split (key reference_split)")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    fake = space.unscale(torch.cat([generate(net, objective, rec, g, int(num_per_site), conditioner, prior,
                                             reference_items,
                                             sampler, num_steps, guidance_scale, gen, 8, device, cycle_references=True)
                                    for g in groups]).cpu())
    real_img = torch.from_numpy(decode(vae, space.scale(real.to(device)), space))[:, None]
    fake_img = torch.from_numpy(decode(vae, space.scale(fake.to(device)), space))[:, None]
    if features == "auto":
        features = "medicalnet" if cfg.medicalnet_weights else "encoder"
    if features == "encoder" and not pretrain_ckpt:
        raise MeduetConfigError("encoder features need pretrain_ckpt (meduet_pretrain's model.pt)")
    extractor = build_feature_extractor(features, weights_path=cfg.medicalnet_weights, depth=cfg.medicalnet_depth,
                                        pretrain_ckpt=pretrain_ckpt, latent_space=space, inputs="raw",
                                        device=device)
    report = generation_report(real, fake, extractor, real_images=real_img, fake_images=fake_img)
    report.update(outline_agreement(fake_img, real_img, [it.get("subject", i) for i, it in enumerate(real_items)]))
    if features == "encoder":
        report["fid_note"] = "proxy: features of meduet_pretrain's encoder, not an Inception/MedicalNet network"
    val = ValidationLoss(net, objective, conditioner or conditioner_for(rec, None, device),
                         list(val_items) or list(real_items), space, crop, seed=seed)
    report.update({"val_loss": val.compute(), "objective": objective.objective, "condition": condition,
                   "source": cfg.source if condition == "factors" else None,
                   "sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale,
                   "num_per_site": int(num_per_site)})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    z = real_img.shape[-1] // 2
    rows = [[(f"real {i}", real_img[i, 0, :, :, z].numpy()) for i in range(min(6, len(real_img)))],
            [(f"generated {i}", fake_img[i, 0, :, :, z].numpy()) for i in range(min(6, len(fake_img)))]]
    report["picture"] = save_pair_grid(out / "real_vs_generated.png", rows,
                                       title=f"real vs generated ({objective.objective}, {condition})").name
    write_json(out / "metrics.json", report)
    return report
