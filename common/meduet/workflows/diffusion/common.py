"""What the meduet_diffusion workflows share: loading the generator and its conditioner, generating latents of a
site, decoding them through meduet_vae and writing NIfTI volumes.

Output volumes are NIfTI on a grid with the training spacing (the latent datalist's preprocessing ``spacing``) and
the origin at the volume centre; CT intensities are mapped back from the [0, 1] window to Hounsfield units.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.engines.consistency import decode_image
from meduet.engines.diffusion import Conditioner, build_conditioner, center_crop_or_pad
from meduet.engines.factor_prior import sample_factors
from meduet.engines.sampling import sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import save_nifti
from meduet.latent import LatentSpace, load_latent
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.patchwise import PatchEncoding

__all__ = ["progress_enabled", "load_generator", "generator_parts", "conditioner_for", "load_prior", "decode",
           "save_volume", "latent_shape", "factors_of", "generate", "check_vae", "fit_slices"]


def progress_enabled() -> bool:
    return os.environ.get("MEDUET_PROGRESS", "1") != "0"


def load_generator(model_ckpt: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DiffusionObjective,
                                                                                   dict[str, Any]]:
    """``(network, objective, record)`` from meduet_diffusion's ``model.pt``."""
    return generator_parts(records.load(model_ckpt, device, expect=("dit", "dualflow")), model_ckpt)


def generator_parts(net: torch.nn.Module, where: str = "the generator") -> tuple[torch.nn.Module, DiffusionObjective,
                                                                                dict[str, Any]]:
    """``(network, objective, record)`` of a trained generator (its record says the objective, condition, crop,
    latent facts)."""
    rec = dict(net.meta)
    rec["content_map"] = bool(net.arch.get("content_map", False))
    if "objective" not in rec:
        raise MeduetConfigError(f"'{where}' has no diffusion record (objective); retrain meduet_diffusion")
    return net.eval(), DiffusionObjective.from_config(rec["objective"]), rec


def conditioner_for(record: Mapping[str, Any], pretrain_ckpt: str | None, device: str | torch.device = "cpu"
                    ) -> Conditioner:
    """The ``Conditioner`` the generator was trained with (the factor encoder from ``pretrain_ckpt``)."""
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


def load_prior(prior_ckpt: str | None, device: str | torch.device, hint: str = "") -> torch.nn.Module:
    """meduet_diffusion's factor prior (``models/factor_prior.pt``), with a one-line error when it is missing."""
    if not prior_ckpt or not os.path.isfile(prior_ckpt):
        raise MeduetConfigError(f"factor prior '{prior_ckpt}' does not exist; train meduet_diffusion with "
                                f"condition factors (it writes models/factor_prior.pt){hint}")
    return records.load(prior_ckpt, device, expect="factor_prior", what="factor prior")


def decode(vae: torch.nn.Module, z: torch.Tensor, space: LatentSpace,
           decode_window: int | Sequence[int] | None = None) -> np.ndarray:
    """Scaled latents ``(B, C, *S)`` -> images ``(B, *(f S))`` in [0, 1] (numpy float32).

    ``decode_window`` (latent voxels, not in the papers' sampling): decode through meduet_vae's bounded-memory path,
    the fewest latent windows no larger than it, overlapping and blended as the VAE's record says
    (``PatchEncoding.of(vae, decode_window=...)``), one window at a time, e.g. a 4x64^3 latent (256^3 image) with
    40: 2 x 2 x 2 windows of 33^3. None: the VAE record's own ``decode_window`` (None there too: one decoder call
    on the whole latent, whose memory grows with the volume)."""
    with torch.no_grad():
        img = decode_image(vae, PatchEncoding.of(vae, decode_window=decode_window), space, z)
    return img[:, 0].float().cpu().numpy()


def save_volume(path: str | Path, image01: np.ndarray, record: Mapping[str, Any],
                affine: np.ndarray | None = None) -> Path:
    """Atomic NIfTI of a [0, 1] image: HU for CT (inverse of the preprocessing window), [0, 1] otherwise; affine =
    the training spacing with the origin at the volume centre unless given."""
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
    save_nifti(path, vol, affine)
    return path


def latent_shape(record: Mapping[str, Any], n: int, latent_size: Sequence[int] | int | None = None) -> list[int]:
    """``(n, C, S1, S2, S3)``: the generator's training crop, or ``latent_size`` (e.g. 64 for a 256^3 volume of a
    4x downsampling VAE; the DiT's sin-cos positions are computed for any grid, sizes divisible by its patch)."""
    size = record["crop_size"] if latent_size is None else latent_size
    size = [int(size)] * 3 if isinstance(size, int) else [int(c) for c in size]
    if len(size) != 3 or min(size) < 1:
        raise MeduetConfigError(f"latent_size must be one positive integer or three, got {latent_size!r}")
    return [n, int(record["latent_channels"]), *size]


def factors_of(conditioner: Conditioner, items: Sequence[Mapping[str, Any]], record: Mapping[str, Any],
                device) -> dict[str, torch.Tensor]:
    """Pooled factors of the items' latents (centre crops of the generator's training crop)."""
    x = torch.stack([center_crop_or_pad(load_latent(it["latent"]), record["crop_size"]) for it in items]).float()
    return conditioner.factors(LatentSpace.from_record(record).scale(x.to(device)))


def generate(net, objective: DiffusionObjective, rec: Mapping[str, Any], group: str, n: int,
              conditioner: Conditioner | None, prior, reference_items, sampler, num_steps, guidance_scale: float,
              gen: torch.Generator, batch_size: int, device, cycle_references: bool = False,
              latent_size: Sequence[int] | int | None = None) -> torch.Tensor:
    """``n`` scaled latents of ``group`` (a site, or ``"all"`` for an unconditional generator). Factors from
    reference scans: the first ``n`` of the site (fewer when it has fewer), or with ``cycle_references`` its scans
    cycled to ``n`` (each with its own noise)."""
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
            content, style = sample_factors(prior, n, generator=gen,
                                            domain=domains.index(group) if prior.arch.get("num_domains") else None)
            cond = {"content": content.to(device)}
            if style is not None and net.arch.get("style_dim"):
                cond["style"] = style.to(device)
        else:
            refs = [it for it in (reference_items or []) if it.get("domain") == group]
            if not refs:
                raise MeduetConfigError(f"no reference scans of site {group!r} among the reference items")
            refs = [refs[i % len(refs)] for i in range(n)] if cycle_references else refs[:n]
            n = len(refs)
            cond = factors_of(conditioner, refs, rec, device)
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        c = None if cond is None else {k: v[start:start + m] for k, v in cond.items()}
        chunks.append(sample_latents(net, latent_shape(rec, m, latent_size), c, objective, sampler=sampler,
                                     num_steps=num_steps,
                                     guidance_scale=guidance_scale if condition != "none" else 1.0,
                                     generator=gen, progress=progress_enabled()))
    return torch.cat(chunks)


def check_vae(vae, rec: Mapping[str, Any], vae_ckpt: str, model_ckpt: str) -> None:
    """One-line error when the VAE is not the one whose latents the generator was trained on."""
    want, have = rec.get("vae_config_hash"), vae.meta.get("config_hash")
    if want and have and want != have:
        raise MeduetConfigError(f"'{model_ckpt}' was trained on latents of another VAE than '{vae_ckpt}' (config "
                                f"hash {want} vs {have}); pass the meduet_vae model.pt it was trained with")


def fit_slices(shape: Sequence[int], crop: Sequence[int]) -> tuple[list[slice], list[slice]]:
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
