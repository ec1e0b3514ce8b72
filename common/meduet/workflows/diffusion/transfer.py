"""meduet_diffusion transfer.yaml: style transfer / harmonisation: scan A re-rendered with B's style (or B's site's
mean style) keeping A's content, measured against A's subject scanned at B's site (``meduet.metrics.transfer``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data import get_load_transforms
from meduet.engines.diffusion import center_crop_or_pad, metadata_vector
from meduet.engines.sampling import invert_latents, predict, sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.losses.diffusion import DiffusionObjective
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.transfer import eta_squared, region_means, swap_gaps, swap_pairs
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.common import (check_vae, conditioner_for, decode, factors_of, fit_slices,
                                               load_generator, save_volume)

__all__ = ["Config", "run", "sdedit"]


def sdedit(model, x0: torch.Tensor, cond, objective: DiffusionObjective, strength: float = 0.6, num_steps: int = 50,
           guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from ``x0`` noised to ``strength`` of the schedule (SDEdit), for DDPM-trained generators (which have no
    exact inversion here): keeps the layout of ``x0``, re-renders it under ``cond``."""
    sched = objective.make_scheduler("ddim")
    sched.set_timesteps(num_steps)
    ts = list(sched.timesteps)
    start = min(len(ts) - 1, max(0, int(round((1.0 - float(strength)) * len(ts)))))
    noise = (torch.randn(x0.shape, generator=generator, device=x0.device) if generator is not None
             else torch.randn_like(x0))
    x = sched.add_noise(x0, noise, torch.full((x0.shape[0],), int(ts[start]), device=x0.device, dtype=torch.long))
    for t in ts[start:]:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = predict(model, x, tt, cond, guidance_scale)
        x, _ = sched.step(eps, int(t), x)
    return x


def center_slice(vol: np.ndarray, like: Sequence[int]) -> np.ndarray:
    """The middle axial slice of ``vol`` cropped/padded to ``like``'s in-plane size (for side-by-side pictures)."""
    sl = vol[:, :, vol.shape[2] // 2]
    out = np.zeros(like[:2], dtype=np.float32)
    h, w = min(sl.shape[0], like[0]), min(sl.shape[1], like[1])
    out[:h, :w] = sl[:h, :w]
    return out


@dataclasses.dataclass
class Config(WorkflowConfig):
    """transfer.yaml: the generator and the checkpoints it chains, the latent datalist split whose scans are
    re-rendered (``data_split``) and whose scans give a site's mean style (``style_split``), how many pairs and
    how (steps, guidance, SDEdit strength for DDPM generators)."""

    model_ckpt: str
    vae_ckpt: str
    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    data_split: str = "test"
    style_split: str = "training"
    pairs: int | None = None
    style_from: str = "scan"
    num_steps: int = 30
    guidance_scale: float = 1.5
    strength: float = 0.6
    seed: int = 0
    device: str | torch.device = "cpu"


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Re-render scan A with the style of scan B (``style_from="scan"``) or of B's site (``"site"``: the mean
    pooled style of ``style_items`` of that site; the site index for the metadata condition) and keep A's content.

    RFlow generators invert A to noise under A's own condition and integrate back under the target condition
    (exact ODE inversion); DDPM generators use SDEdit at ``strength``. ``rec`` = the same round trip with A's own
    condition (what the generator does without a change).

    Measured against T, A's subject scanned at B's site (phantom data have it; pairs need items with a ``subject``
    key rendered at several sites; ``meduet.metrics.transfer.swap_pairs``: ``pairs=None`` takes every site
    once as A and once as B), on A's preprocessed grid and A's label regions, by
    ``meduet.metrics.transfer.swap_gaps`` (as ``meduet_pretrain``'s style-swap study): ``gap_closed = 1 -
    d(transfer)/d(rec)`` with ``d(x)`` the mean over label regions of ``|mean_r(x) - mean_r(T)|`` and T as the VAE
    renders it (T's latent decoded; 1 = T's intensities as far as the VAE renders them, 0 = unchanged);
    ``gap_closed_vs_scan`` against the real scan and ``vae_ceiling`` (what T's own latent closes of that gap);
    ``d_source`` = the gap of A's real scan to the real T; ``anatomy_kept = eta2(transfer) / eta2(T)`` (variance
    inside the body explained by A's label regions, relative to a real scan of that site).
    Writes ``transfer.json``, ``transfer.png`` and ``<A>_to_<site>.nii.gz``.
    """
    cfg = config
    model_ckpt, vae_ckpt, pretrain_ckpt = cfg.model_ckpt, cfg.vae_ckpt, cfg.pretrain_ckpt
    pairs, style_from = cfg.pairs, cfg.style_from
    num_steps, guidance_scale, strength = cfg.num_steps, cfg.guidance_scale, cfg.strength
    cache = LatentDatalist(cfg.latent_datalist)
    items, style_items = cache.items(cfg.data_split), cache.items(cfg.style_split)
    device = torch.device(cfg.device)
    net, objective, rec = load_generator(model_ckpt, device)
    condition = rec.get("condition", "none")
    if condition == "none":
        raise MeduetConfigError("an unconditional generator cannot transfer style: train meduet_diffusion with "
                                "condition factors or metadata")
    if style_from not in ("scan", "site"):
        raise MeduetConfigError(f"style_from must be 'scan' or 'site', got {style_from!r}")
    vae = records.load(vae_ckpt, device, expect="vae")
    check_vae(vae, rec, vae_ckpt, model_ckpt)
    conditioner = conditioner_for(rec, pretrain_ckpt, device) if condition == "factors" else None
    domains = list(rec["domains"])
    space = LatentSpace.from_record(rec, model_ckpt)
    crop = [int(c) for c in rec["crop_size"]]
    f = int(rec.get("downsample_factor") or 4)

    chosen = swap_pairs(items, pairs)
    if not chosen:
        raise MeduetConfigError("style transfer needs items with 'subject' keys rendered at several sites (the "
                                "phantom sample data); none of the given items pair up")
    site_style: dict[str, torch.Tensor] = {}
    if condition == "factors" and style_from == "site":
        pool = list(style_items or [])
        for a_it, b_it, _ in chosen:
            site = b_it["domain"]
            if site in site_style:
                continue
            # the style split's scans of that site; for a site it lacks (e.g. held out of training) the given
            # items' scans of the site, leaving out A's subject (its real scan there is the target T)
            refs = [it for it in pool if it["domain"] == site] or [
                it for it in items if it["domain"] == site and it.get("subject") != a_it.get("subject")]
            if not refs:
                raise MeduetConfigError(f"no scans of site {site!r} to take its mean style from")
            site_style[site] = factors_of(conditioner, refs, rec, device)["style"].mean(0, keepdim=True)

    transform = get_load_transforms(**dict(rec.get("preprocessing") or {}), keys=("image", "label"))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for a_item, b_item, t_item in chosen:
        za = load_latent(a_item["latent"])
        fit, src = fit_slices(za.shape[1:], crop)
        xa = space.scale(center_crop_or_pad(za, crop)[None].to(device))
        if condition == "factors":
            cond_a = conditioner.factors(xa)
            cond_b = dict(cond_a)
            if style_from == "site":
                cond_b["style"] = site_style[b_item["domain"]].to(device)
            else:
                xb = space.scale(center_crop_or_pad(load_latent(b_item["latent"]), crop)[None].to(device))
                cond_b["style"] = conditioner.factors(xb)["style"]
        else:
            cond_a = {"domain": torch.tensor([domains.index(a_item["domain"])], device=device)}
            cond_b = {"domain": torch.tensor([domains.index(b_item["domain"])], device=device)}
            keys = rec.get("metadata_keys") or []
            if keys:  # A's own facts; B's for the target (the scanner/protocol facts go with the style)
                cond_a["metadata"] = torch.tensor([metadata_vector(a_item, keys)], device=device)
                cond_b["metadata"] = torch.tensor([metadata_vector(b_item, keys)], device=device)
        if objective.objective == "rflow":
            noise = invert_latents(net, xa, cond_a, objective, num_steps=num_steps, guidance_scale=1.0)
            z_rec = sample_latents(net, list(xa.shape), cond_a, objective, num_steps=num_steps,
                                   guidance_scale=1.0, noise=noise)
            z_tr = sample_latents(net, list(xa.shape), cond_b, objective, num_steps=num_steps,
                                  guidance_scale=guidance_scale, noise=noise)
        else:
            g_state = gen.get_state()
            z_rec = sdedit(net, xa, cond_a, objective, strength, num_steps, 1.0, gen)
            gen.set_state(g_state)  # same noise for both, so only the condition differs
            z_tr = sdedit(net, xa, cond_b, objective, strength, num_steps, guidance_scale, gen)
        img_fit = [slice(s.start * f, s.stop * f) for s in fit]
        dec = decode(vae, torch.cat([z_rec, z_tr]), space)
        rec_img, tr_img = (d[tuple(img_fit)] for d in dec)
        a_data = transform({"image": a_item["image"], "label": a_item["label"]})
        t_data = transform({"image": t_item["image"], "label": t_item["label"]})
        b_data = transform({"image": b_item["image"]})
        img_src = tuple(slice(s.start * f, s.stop * f) for s in src)
        a_img = np.asarray(a_data["image"])[0][img_src]
        a_lab = np.rint(np.asarray(a_data["label"])[0][img_src]).astype(np.int64)
        t_img = np.asarray(t_data["image"])[0].astype(np.float32)
        t_lab = np.rint(np.asarray(t_data["label"])[0]).astype(np.int64)
        regions = sorted(set(np.unique(a_lab)) & set(np.unique(t_lab)) - {0})
        if not regions:
            continue
        z_t = load_latent(t_item["latent"])
        t_vae = decode(vae, space.scale(z_t[None].to(device)), space)[0]
        t_vae = t_vae[tuple(slice(0, n) for n in t_img.shape)]
        try:
            g = swap_gaps(rec_img, tr_img, a_lab, t_vae, t_img, t_lab)
        except MeduetConfigError:  # no region of >= 8 voxels in both
            continue
        d_a = float(np.mean(np.abs(region_means(a_img, a_lab, regions) - region_means(t_img, t_lab, regions))))
        eta_t = eta_squared(t_img, t_lab)
        row = {"A": Path(a_item["latent"]).name, "B": Path(b_item["latent"]).name,
               "target": Path(t_item["latent"]).name,
               "site_from": a_item["domain"], "site_to": b_item["domain"], "d_source": d_a,
               "d_rec": g["intensity_gap_rec"], "d_transfer": g["intensity_gap_swap"], "gap_closed": g["gap_closed"],
               "gap_closed_vs_scan": g["gap_closed_vs_scan"], "vae_ceiling": g["vae_ceiling"],
               "anatomy_kept": eta_squared(tr_img, a_lab) / eta_t if eta_t > 0 else float("nan"),
               "anatomy_rec": eta_squared(rec_img, a_lab) / eta_t if eta_t > 0 else float("nan")}
        results.append(row)
        name = Path(a_item["latent"]).name.replace(".nii.gz", "")
        save_volume(out / f"{name}_to_{b_item['domain']}.nii.gz", tr_img, rec)
        z = a_img.shape[2] // 2
        rows.append([(f"A {a_item['domain']}", a_img[:, :, z]), ("rec (A's cond)", rec_img[:, :, z]),
                     (f"A -> {b_item['domain']}", tr_img[:, :, z]),
                     (f"real {b_item['domain']} (T)", center_slice(t_img, a_img.shape)),
                     (f"B {b_item['domain']}", center_slice(np.asarray(b_data["image"])[0], a_img.shape))])
    if not results:
        raise MeduetConfigError("no transfer pair shares a labelled region between A and its target scan")
    picture = save_pair_grid(out / "transfer.png", rows,
                             title=f"style transfer ({objective.objective}, condition {condition}, style from "
                                   f"{style_from})")
    summary = {
        "objective": objective.objective, "condition": condition, "style_from": style_from,
        "method": "rflow inversion" if objective.objective == "rflow" else f"sdedit strength {strength}",
        "num_steps": num_steps, "guidance_scale": guidance_scale, "pairs": results,
        "gap_closed": float(np.nanmean([r["gap_closed"] for r in results])),
        # how far that mean could move with another draw of as many pairs (pairs resampled)
        "gap_closed_ci95": list(bootstrap_mean_interval([r["gap_closed"] for r in results])),
        "gap_closed_vs_scan": float(np.nanmean([r["gap_closed_vs_scan"] for r in results])),
        "vae_ceiling": float(np.nanmean([r["vae_ceiling"] for r in results])),
        "anatomy_kept": float(np.nanmean([r["anatomy_kept"] for r in results])),
        "anatomy_rec": float(np.nanmean([r["anatomy_rec"] for r in results])),
        "picture": picture.name,
    }
    write_json(out / "transfer.json", summary)
    return summary
