"""meduet_diffusion sample.yaml: volumes per site (metadata / factors conditions) or in total (no condition), decoded by
meduet_vae, as NIfTI (HU for CT, training spacing) with a PNG montage and ``samples.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from meduet import records
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.common import (check_vae, conditioner_for, decode, generate, generator_parts,
                                               load_generator, load_prior, save_volume)

__all__ = ["Config", "run"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """sample.yaml: the generator and the checkpoints it chains (VAE, pretrained encoder, factor prior), how many
    volumes of which sites, where from (``source``: prior | reference) and how (sampler, steps, guidance)."""

    model_ckpt: str
    vae_ckpt: str
    output_dir: str
    pretrain_ckpt: str | None = None
    prior_ckpt: str | None = None
    num_per_site: int = 2
    sites: Sequence[str] | None = None
    source: str = "prior"
    latent_datalist: str | None = None
    reference_split: str = "test"
    sampler: str | None = None
    num_steps: int | None = None
    guidance_scale: float = 1.5
    seed: int = 0
    batch_size: int = 8
    #: latent grid to sample (one integer or three); None: the generator's training crop. A paper-sized volume:
    #: 64 (4x64^3 -> 256^3 with a 4x VAE), with ``decode_window`` so that decoding stays within bounded memory
    latent_size: int | Sequence[int] | None = None
    #: decode through meduet_vae's latent windows no larger than this (``meduet.networks.patchwise.PatchEncoding``,
    #: memory bounded by one window); None: the VAE record's setting (one decoder call when it has none)
    decode_window: int | Sequence[int] | None = None
    device: str | torch.device = "cpu"
    #: the generator already built from an inference config's ``network_def`` with ``model_ckpt`` loaded into it
    #: (``meduet.records.load_into``); None: rebuilt from ``model_ckpt``
    network: Any = None
    #: the sampling settings as a component (``meduet.engines.sampling.LatentSampler``); None: ``sampler``,
    #: ``num_steps`` and ``guidance_scale`` above
    inferer: Any = None


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Generate volumes and write ``<output_dir>/<group>_<k>.nii.gz``, ``samples.json`` and ``samples.png``.

    Groups: ``condition none`` -> one group ``all`` of ``num_per_site`` volumes; ``metadata`` -> one group per site
    (the site's index as condition); ``factors`` -> one group per site whose (content, style) come from the factor
    prior (``source="prior"``, per-site prior) or from the site's reference scans (``source="reference"``:
    ``reference_split`` of ``latent_datalist``, first ``num_per_site`` of each site).
    """
    cfg = config
    model_ckpt, vae_ckpt, pretrain_ckpt = cfg.model_ckpt, cfg.vae_ckpt, cfg.pretrain_ckpt
    source, sites = cfg.source, cfg.sites
    sampler, num_steps, guidance_scale = cfg.sampler, cfg.num_steps, cfg.guidance_scale
    if cfg.inferer is not None:
        sampler, num_steps, guidance_scale = cfg.inferer.sampler, cfg.inferer.num_steps, cfg.inferer.guidance_scale
    device = torch.device(cfg.device)
    if cfg.network is not None:
        net, objective, rec = generator_parts(cfg.network.to(device).eval(), model_ckpt)
    else:
        net, objective, rec = load_generator(model_ckpt, device)
    vae = records.load(vae_ckpt, device, expect="vae")
    check_vae(vae, rec, vae_ckpt, model_ckpt)
    domains = list(rec.get("domains") or [])
    condition = rec.get("condition", "none")
    groups = ["all"] if condition == "none" else list(sites or domains)
    for g in groups:
        if g != "all" and g not in domains:
            raise MeduetConfigError(f"unknown site {g!r}; the generator knows {domains}")
    conditioner = conditioner_for(rec, pretrain_ckpt, device) if condition == "factors" else None
    prior = None
    if condition == "factors" and source == "prior":
        if rec.get("content_map"):
            raise MeduetConfigError("this generator also needs the content token map, which the factor prior does "
                                    "not give: sample with source 'reference'")
        prior = load_prior(cfg.prior_ckpt, device, " or use source 'reference'")
    elif condition == "factors" and source != "reference":
        raise MeduetConfigError(f"source must be 'prior' or 'reference', got {source!r}")

    reference_items = None
    if condition == "factors" and source == "reference":
        if not cfg.latent_datalist:
            raise MeduetConfigError("source 'reference' needs latent_datalist (meduet_vae's latent cache)")
        reference_items = LatentDatalist(cfg.latent_datalist).items(cfg.reference_split)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    rows, listing = [], []
    for group in groups:
        z = generate(net, objective, rec, group, int(cfg.num_per_site), conditioner,
                     prior if condition == "factors" and source == "prior" else None, reference_items, sampler,
                     num_steps, guidance_scale, gen, cfg.batch_size, device, latent_size=cfg.latent_size)
        images = decode(vae, z, LatentSpace.from_record(rec, model_ckpt), cfg.decode_window)
        row = []
        for k, img in enumerate(images):
            path = save_volume(out / f"{group}_{k}.nii.gz", img, rec)
            listing.append({"group": group, "index": k, "path": path.name, "mean": float(img.mean()),
                            "std": float(img.std())})
            row.append((f"{group} #{k}", img[:, :, img.shape[2] // 2]))
        rows.append(row)
    picture = save_pair_grid(out / "samples.png", rows,
                             title=f"meduet_diffusion samples ({objective.objective}, condition {condition}"
                                   + (f", {source}" if condition == "factors" else "") + ")")
    summary = {"objective": objective.objective, "condition": condition, "source": source if condition == "factors"
               else None, "sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale,
               "latent_shape": list(z.shape[1:]), "decode_window": cfg.decode_window,
               "samples": listing, "picture": picture.name}
    write_json(out / "samples.json", summary)
    return summary
