"""meduet_diffusion workflows after training: sampling volumes, style transfer (harmonisation) with its measurement.

Everything starts from ``models/model.pt`` (the EMA generator; its record says the objective, the condition, the
latent crop, the latent scale factor, the domains and the VAE it belongs to), meduet_vae's ``model.pt`` for
decoding and, for the ``factors`` condition, meduet_pretrain's ``model.pt`` (the frozen encoder) and
``models/factor_prior.pt``.

Output volumes are NIfTI on a grid with the training spacing (the latent datalist's preprocessing ``spacing``) and
the origin at the volume centre; CT intensities are mapped back from the [0, 1] window to Hounsfield units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet.engines.diffusion import Conditioner, center_crop_or_pad
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective

__all__ = ["load_generator", "conditioner_for", "decode", "save_volume", "sample_volumes", "style_transfer", "evaluate_generation",
           "sdedit"]


def _progress_enabled() -> bool:
    return os.environ.get("MEDUET_PROGRESS", "1") != "0"


def load_generator(model_ckpt: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DiffusionObjective,
                                                                                   dict[str, Any]]:
    """``(network, objective, record)`` from meduet_diffusion's ``model.pt``."""
    from meduet.networks.dit import load_dit

    net = load_dit(model_ckpt, device)
    rec = dict(net.meta)
    rec["content_map"] = bool(net.arch.get("content_map", False))
    if "objective" not in rec:
        raise MeduetConfigError(f"'{model_ckpt}' has no diffusion record (objective); retrain meduet_diffusion")
    return net.eval(), DiffusionObjective.from_config(rec["objective"]), rec


def conditioner_for(record: Mapping[str, Any], pretrain_ckpt: str | None, device: str | torch.device = "cpu"
                    ) -> Conditioner:
    """The ``Conditioner`` the generator was trained with (the factor encoder from ``pretrain_ckpt``)."""
    from meduet.engines.diffusion import build_conditioner

    condition = record.get("condition", "none")
    cond = build_conditioner(condition, pretrain_ckpt if condition == "factors" else None, record,
                             content_map=False, metadata_keys=record.get("metadata_keys") or (), device=device)
    if condition == "factors":
        cond.content_map = bool(record.get("content_map", False))
        if list(cond.crop) != list(record.get("pretrain_crop", cond.crop)):
            raise MeduetConfigError(f"'{pretrain_ckpt}' was pretrained on crops {list(cond.crop)} but the generator "
                                    f"was conditioned by an encoder with crops {record.get('pretrain_crop')}; pass the "
                                    "same meduet_pretrain model.pt (key pretrain_ckpt)")
    return cond


def decode(vae: torch.nn.Module, z: torch.Tensor, latent_scale_factor: float) -> np.ndarray:
    """Scaled latents ``(B, C, *S)`` -> images ``(B, *(f S))`` in [0, 1] (numpy float32)."""
    with torch.no_grad():
        img = vae.decode(z / float(latent_scale_factor)).clamp(0, 1)
    return img[:, 0].float().cpu().numpy()


def save_volume(path: str | Path, image01: np.ndarray, record: Mapping[str, Any],
                affine: np.ndarray | None = None) -> Path:
    """Atomic NIfTI of a [0, 1] image: HU for CT (inverse of the preprocessing window), [0, 1] otherwise; affine =
    the training spacing with the origin at the volume centre unless given."""
    import nibabel as nib

    from meduet.io import atomic_path

    prep = dict(record.get("preprocessing") or {})
    vol = np.asarray(image01, dtype=np.float32)
    if str(prep.get("modality", "CT")).upper() == "CT":
        lo, hi = (float(v) for v in prep.get("ct_window", (-175.0, 250.0)))
        vol = vol * (hi - lo) + lo
    if affine is None:
        spacing = [float(s) for s in (prep.get("spacing") or (1.0, 1.0, 1.0))]
        affine = np.diag(spacing + [1.0])
        affine[:3, 3] = -np.asarray(spacing) * (np.asarray(vol.shape) - 1) / 2.0
    path = Path(path)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(vol, affine), str(tmp))
    return path


def _shape(record: Mapping[str, Any], n: int) -> list[int]:
    return [n, int(record["latent_channels"]), *[int(c) for c in record["crop_size"]]]


def _factors_of(conditioner: Conditioner, items: Sequence[Mapping[str, Any]], record: Mapping[str, Any],
                device) -> dict[str, torch.Tensor]:
    from meduet.engines.pretrain_tasks import load_latent

    x = torch.stack([center_crop_or_pad(load_latent(it["latent"]), record["crop_size"]) for it in items]).float()
    return conditioner.factors(x.to(device) * float(record["latent_scale_factor"]))


def _generate(net, objective: DiffusionObjective, rec: Mapping[str, Any], group: str, n: int,
              conditioner: Conditioner | None, prior, reference_items, sampler, num_steps, guidance_scale: float,
              gen: torch.Generator, batch_size: int, device) -> torch.Tensor:
    """``n`` scaled latents of ``group`` (a site, or ``"all"`` for an unconditional generator)."""
    from meduet.engines.sampling import sample_latents

    condition = rec.get("condition", "none")
    domains = list(rec.get("domains") or [])
    cond: dict[str, torch.Tensor] | None = None
    if condition == "metadata":
        cond = {"domain": torch.full((n,), domains.index(group), dtype=torch.long, device=device)}
        if rec.get("metadata_keys"):  # the site's mean metadata (e.g. spacing) over the training items
            values = (rec.get("metadata_by_site") or {}).get(group) or rec.get("metadata_mean")
            cond["metadata"] = torch.tensor(values, dtype=torch.float32, device=device).expand(n, -1)
    elif condition == "factors":
        if prior is not None:
            content, style = prior.sample(n, domain=domains.index(group) if prior.arch.get("num_domains") else None,
                                          generator=gen)
            cond = {"content": content.to(device)}
            if style is not None and net.arch.get("style_dim"):
                cond["style"] = style.to(device)
        else:
            refs = [it for it in (reference_items or []) if it.get("domain") == group][:n]
            if not refs:
                raise MeduetConfigError(f"no reference scans of site {group!r} among the reference items")
            n = len(refs)
            cond = _factors_of(conditioner, refs, rec, device)
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        c = None if cond is None else {k: v[start:start + m] for k, v in cond.items()}
        chunks.append(sample_latents(net, _shape(rec, m), c, objective, sampler=sampler, num_steps=num_steps,
                                     guidance_scale=guidance_scale if condition != "none" else 1.0,
                                     generator=gen, progress=_progress_enabled()))
    return torch.cat(chunks)


def sample_volumes(model_ckpt: str, vae_ckpt: str, output_dir: str, pretrain_ckpt: str | None = None,
                   prior_ckpt: str | None = None, num_per_site: int = 2, sites: Sequence[str] | None = None,
                   source: str = "prior", reference_items: Sequence[Mapping[str, Any]] | None = None,
                   sampler: str | None = None, num_steps: int | None = None, guidance_scale: float = 1.5,
                   seed: int = 0, batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Generate volumes and write ``<output_dir>/<group>_<k>.nii.gz``, ``samples.json`` and ``samples.png``.

    Groups: ``condition none`` -> one group ``all`` of ``num_per_site`` volumes; ``metadata`` -> one group per site
    (the site's index as condition); ``factors`` -> one group per site whose (content, style) come from the factor
    prior (``source="prior"``, per-site prior) or from the site's reference scans (``source="reference"``:
    ``reference_items``, e.g. the test split, first ``num_per_site`` of each site).
    """
    from meduet.networks.vae import load_vae
    from meduet.viz import save_pair_grid

    device = torch.device(device)
    net, objective, rec = load_generator(model_ckpt, device)
    vae = load_vae(vae_ckpt, device).eval()
    _check_vae(vae, rec, vae_ckpt, model_ckpt)
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
        from meduet.networks.factor_prior import load_factor_prior

        if not prior_ckpt or not os.path.isfile(prior_ckpt):
            raise MeduetConfigError(f"factor prior '{prior_ckpt}' does not exist; train meduet_diffusion with "
                                    "condition factors (it writes models/factor_prior.pt) or use source 'reference'")
        prior = load_factor_prior(prior_ckpt, device)
    elif condition == "factors" and source != "reference":
        raise MeduetConfigError(f"source must be 'prior' or 'reference', got {source!r}")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    rows, listing = [], []
    for group in groups:
        z = _generate(net, objective, rec, group, int(num_per_site), conditioner,
                      prior if condition == "factors" and source == "prior" else None, reference_items, sampler,
                      num_steps, guidance_scale, gen, batch_size, device)
        images = decode(vae, z, float(rec["latent_scale_factor"]))
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
               "samples": listing, "picture": picture.name}
    _write_json(out / "samples.json", summary)
    return summary


def _check_vae(vae, rec: Mapping[str, Any], vae_ckpt: str, model_ckpt: str) -> None:
    want, have = rec.get("vae_config_hash"), vae.meta.get("config_hash")
    if want and have and want != have:
        raise MeduetConfigError(f"'{model_ckpt}' was trained on latents of another VAE than '{vae_ckpt}' (config "
                                f"hash {want} vs {have}); pass the meduet_vae model.pt it was trained with")


def _write_json(path: Path, data: Any) -> None:
    from meduet.io import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def sdedit(model, x0: torch.Tensor, cond, objective: DiffusionObjective, strength: float = 0.6, num_steps: int = 50,
           guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from ``x0`` noised to ``strength`` of the schedule (SDEdit), for DDPM-trained generators (which have no
    exact inversion here): keeps the layout of ``x0``, re-renders it under ``cond``."""
    from meduet.engines.sampling import predict

    sched = objective.make_scheduler("ddim")
    sched.set_timesteps(num_steps)
    ts = list(sched.timesteps)
    start = min(len(ts) - 1, max(0, int(round((1.0 - float(strength)) * len(ts)))))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device) if generator is not None else torch.randn_like(x0)
    x = sched.add_noise(x0, noise, torch.full((x0.shape[0],), int(ts[start]), device=x0.device, dtype=torch.long))
    for t in ts[start:]:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = predict(model, x, tt, cond, guidance_scale)
        x, _ = sched.step(eps, int(t), x)
    return x


def _fit_slices(shape: Sequence[int], crop: Sequence[int]) -> tuple[list[slice], list[slice]]:
    """Where a volume of ``shape`` lands in ``center_crop_or_pad(.., crop)``: (slices in the crop, slices in the
    source), per axis."""
    in_fit, in_src = [], []
    for s, c in zip(shape, crop):
        s, c = int(s), int(c)
        if s <= c:
            pb = (c - s) // 2
            in_fit.append(slice(pb, pb + s))
            in_src.append(slice(0, s))
        else:
            st = (s - c) // 2
            in_fit.append(slice(0, c))
            in_src.append(slice(st, st + c))
    return in_fit, in_src


def style_transfer(model_ckpt: str, vae_ckpt: str, items: Sequence[Mapping[str, Any]], output_dir: str,
                   pretrain_ckpt: str | None = None, style_items: Sequence[Mapping[str, Any]] | None = None,
                   pairs: int | None = None, style_from: str = "scan", num_steps: int = 30, guidance_scale: float = 1.5,
                   strength: float = 0.6, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Re-render scan A with the style of scan B (``style_from="scan"``) or of B's site (``"site"``: the mean
    pooled style of ``style_items`` of that site; the site index for the metadata condition) and keep A's content.

    RFlow generators invert A to noise under A's own condition and integrate back under the target condition
    (exact ODE inversion); DDPM generators use SDEdit at ``strength``. ``rec`` = the same round trip with A's own
    condition (what the generator does without a change).

    Measured against T, A's subject scanned at B's site (phantom data have it; pairs need items with a ``subject``
    key rendered at several sites; ``meduet.engines.pretrain_tasks.swap_pairs``: ``pairs=None`` takes every site
    once as A and once as B), on A's preprocessed grid and A's label regions, by
    ``meduet.engines.pretrain_tasks.swap_gaps`` (as ``meduet_pretrain``'s style-swap study): ``gap_closed = 1 -
    d(transfer)/d(rec)`` with ``d(x)`` the mean over label regions of ``|mean_r(x) - mean_r(T)|`` and T as the VAE
    renders it (T's latent decoded; 1 = T's intensities as far as the VAE renders them, 0 = unchanged);
    ``gap_closed_vs_scan`` against the real scan and ``vae_ceiling`` (what T's own latent closes of that gap);
    ``d_source`` = the gap of A's real scan to the real T; ``anatomy_kept = eta2(transfer) / eta2(T)`` (variance
    inside the body explained by A's label regions, relative to a real scan of that site).
    Writes ``transfer.json``, ``transfer.png`` and ``<A>_to_<site>.nii.gz``.
    """
    from meduet.data import get_load_transforms
    from meduet.engines.pretrain_tasks import _eta_squared, _region_means, load_latent, swap_gaps, swap_pairs
    from meduet.engines.sampling import invert_latents, sample_latents
    from meduet.networks.vae import load_vae
    from meduet.viz import save_pair_grid

    device = torch.device(device)
    net, objective, rec = load_generator(model_ckpt, device)
    condition = rec.get("condition", "none")
    if condition == "none":
        raise MeduetConfigError("an unconditional generator cannot transfer style: train meduet_diffusion with "
                                "condition factors or metadata")
    if style_from not in ("scan", "site"):
        raise MeduetConfigError(f"style_from must be 'scan' or 'site', got {style_from!r}")
    vae = load_vae(vae_ckpt, device).eval()
    _check_vae(vae, rec, vae_ckpt, model_ckpt)
    conditioner = conditioner_for(rec, pretrain_ckpt, device) if condition == "factors" else None
    domains = list(rec["domains"])
    scale = float(rec["latent_scale_factor"])
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
            site_style[site] = _factors_of(conditioner, refs, rec, device)["style"].mean(0, keepdim=True)

    transform = get_load_transforms(**dict(rec.get("preprocessing") or {}), keys=("image", "label"))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for a_item, b_item, t_item in chosen:
        za = load_latent(a_item["latent"])
        fit, src = _fit_slices(za.shape[1:], crop)
        xa = center_crop_or_pad(za, crop)[None].float().to(device) * scale
        if condition == "factors":
            cond_a = conditioner.factors(xa)
            cond_b = dict(cond_a)
            if style_from == "site":
                cond_b["style"] = site_style[b_item["domain"]].to(device)
            else:
                xb = center_crop_or_pad(load_latent(b_item["latent"]), crop)[None].float().to(device) * scale
                cond_b["style"] = conditioner.factors(xb)["style"]
        else:
            cond_a = {"domain": torch.tensor([domains.index(a_item["domain"])], device=device)}
            cond_b = {"domain": torch.tensor([domains.index(b_item["domain"])], device=device)}
            keys = rec.get("metadata_keys") or []
            if keys:  # A's own facts; B's for the target (the scanner/protocol facts go with the style)
                from meduet.engines.diffusion import metadata_vector

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
        dec = decode(vae, torch.cat([z_rec, z_tr]), scale)
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
        t_vae = decode(vae, z_t[None].float().to(device) * scale, scale)[0]
        t_vae = t_vae[tuple(slice(0, n) for n in t_img.shape)]
        try:
            g = swap_gaps(rec_img, tr_img, a_lab, t_vae, t_img, t_lab)
        except MeduetConfigError:  # no region of >= 8 voxels in both
            continue
        d_a = float(np.mean(np.abs(_region_means(a_img, a_lab, regions) - _region_means(t_img, t_lab, regions))))
        eta_t = _eta_squared(t_img, t_lab)
        row = {"A": Path(a_item["latent"]).name, "B": Path(b_item["latent"]).name, "target": Path(t_item["latent"]).name,
               "site_from": a_item["domain"], "site_to": b_item["domain"], "d_source": d_a,
               "d_rec": g["intensity_gap_rec"], "d_transfer": g["intensity_gap_swap"], "gap_closed": g["gap_closed"],
               "gap_closed_vs_scan": g["gap_closed_vs_scan"], "vae_ceiling": g["vae_ceiling"],
               "anatomy_kept": _eta_squared(tr_img, a_lab) / eta_t if eta_t > 0 else float("nan"),
               "anatomy_rec": _eta_squared(rec_img, a_lab) / eta_t if eta_t > 0 else float("nan")}
        results.append(row)
        name = Path(a_item["latent"]).name.replace(".nii.gz", "")
        save_volume(out / f"{name}_to_{b_item['domain']}.nii.gz", tr_img, rec)
        z = a_img.shape[2] // 2
        rows.append([(f"A {a_item['domain']}", a_img[:, :, z]), ("rec (A's cond)", rec_img[:, :, z]),
                     (f"A -> {b_item['domain']}", tr_img[:, :, z]),
                     (f"real {b_item['domain']} (T)", _center_slice(t_img, a_img.shape)),
                     (f"B {b_item['domain']}", _center_slice(np.asarray(b_data["image"])[0], a_img.shape))])
    if not results:
        raise MeduetConfigError("no transfer pair shares a labelled region between A and its target scan")
    picture = save_pair_grid(out / "transfer.png", rows,
                             title=f"style transfer ({objective.objective}, condition {condition}, style from "
                                   f"{style_from})")
    from meduet.metrics.disentanglement import bootstrap_mean_interval

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
    _write_json(out / "transfer.json", summary)
    return summary


def _center_slice(vol: np.ndarray, like: Sequence[int]) -> np.ndarray:
    """The middle axial slice of ``vol`` cropped/padded to ``like``'s in-plane size (for side-by-side pictures)."""
    sl = vol[:, :, vol.shape[2] // 2]
    out = np.zeros(like[:2], dtype=np.float32)
    h, w = min(sl.shape[0], like[0]), min(sl.shape[1], like[1])
    out[:h, :w] = sl[:h, :w]
    return out


def evaluate_generation(model_ckpt: str, vae_ckpt: str, real_items: Sequence[Mapping[str, Any]],
                        val_items: Sequence[Mapping[str, Any]], output_dir: str, pretrain_ckpt: str | None = None,
                        prior_ckpt: str | None = None, features: str = "auto", medicalnet_weights: str | None = None,
                        medicalnet_depth: int = 10, num_per_site: int = 4, sampler: str | None = None,
                        num_steps: int | None = None, guidance_scale: float = 1.5, seed: int = 0,
                        max_real: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Generation quality of the EMA generator -> ``<output_dir>/metrics.json`` and ``real_vs_generated.png``.

    * FID and MMD between features of real latents (``real_items``, centre crops of the training crop size) and
      generated ones (``num_per_site`` per site, or in total without a condition; factors from the prior). Features:
      MedicalNet on decoded images when ``medicalnet_weights`` is a local file (never downloaded), otherwise the
      pooled factors of meduet_pretrain's encoder, reported as a *proxy* (``fid_features`` names which).
    * MS-SSIM diversity of decoded generated and real volumes (mean over pairs; lower = more diverse).
    * The validation denoising loss on ``val_items`` (fixed crops, noise and timesteps, as in training).
    """
    from meduet.engines.diffusion import ValidationLoss
    from meduet.engines.pretrain_tasks import load_latent
    from meduet.metrics.generation import build_feature_extractor, generation_report
    from meduet.networks.vae import load_vae
    from meduet.viz import save_pair_grid

    device = torch.device(device)
    net, objective, rec = load_generator(model_ckpt, device)
    vae = load_vae(vae_ckpt, device).eval()
    _check_vae(vae, rec, vae_ckpt, model_ckpt)
    condition = rec.get("condition", "none")
    scale = float(rec["latent_scale_factor"])
    crop = [int(c) for c in rec["crop_size"]]
    conditioner = conditioner_for(rec, pretrain_ckpt, device) if condition == "factors" else None
    prior = None
    if condition == "factors":
        from meduet.networks.factor_prior import load_factor_prior

        if not prior_ckpt or not os.path.isfile(prior_ckpt):
            raise MeduetConfigError(f"factor prior '{prior_ckpt}' does not exist; train meduet_diffusion with "
                                    "condition factors (it writes models/factor_prior.pt)")
        prior = load_factor_prior(prior_ckpt, device)
    if not real_items:
        raise MeduetConfigError("evaluate needs real latents (the `real_split` of the latent datalist is empty)")
    if max_real:  # an even spread over the split (items are usually ordered by subject and site)
        idx = np.linspace(0, len(real_items) - 1, min(int(max_real), len(real_items))).round().astype(int)
        real_items = [real_items[i] for i in sorted(set(idx.tolist()))]
    real = torch.stack([center_crop_or_pad(load_latent(it["latent"]), crop) for it in real_items]).float()
    groups = ["all"] if condition == "none" else list(rec["domains"])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    fake = torch.cat([_generate(net, objective, rec, g, int(num_per_site), conditioner, prior, None, sampler,
                                num_steps, guidance_scale, gen, 8, device) for g in groups]).cpu() / scale
    real_img = torch.from_numpy(decode(vae, real.to(device) * scale, scale))[:, None]
    fake_img = torch.from_numpy(decode(vae, fake.to(device) * scale, scale))[:, None]
    if features == "auto":
        features = "medicalnet" if medicalnet_weights else "encoder"
    if features == "encoder" and not pretrain_ckpt:
        raise MeduetConfigError("encoder features need pretrain_ckpt (meduet_pretrain's model.pt)")
    extractor = build_feature_extractor(features, weights_path=medicalnet_weights, depth=medicalnet_depth,
                                        pretrain_ckpt=pretrain_ckpt, latent_scale_factor=scale, inputs="raw",
                                        device=device)
    report = generation_report(real, fake, extractor, real_images=real_img, fake_images=fake_img)
    if features == "encoder":
        report["fid_note"] = "proxy: features of meduet_pretrain's encoder, not an Inception/MedicalNet network"
    val = ValidationLoss(net, objective, conditioner or conditioner_for(rec, None, device),
                         list(val_items) or list(real_items), scale, crop, seed=seed)
    report.update({"val_loss": val.compute(), "objective": objective.objective, "condition": condition,
                   "sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale,
                   "num_per_site": int(num_per_site)})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    z = real_img.shape[-1] // 2
    rows = [[(f"real {i}", real_img[i, 0, :, :, z].numpy()) for i in range(min(6, len(real_img)))],
            [(f"generated {i}", fake_img[i, 0, :, :, z].numpy()) for i in range(min(6, len(fake_img)))]]
    report["picture"] = save_pair_grid(out / "real_vs_generated.png", rows,
                                       title=f"real vs generated ({objective.objective}, {condition})").name
    _write_json(out / "metrics.json", report)
    return report
