"""One MeDUET (or masked-autoencoder) training step's losses: the student forward, one teacher pass, every active
term of ``meduet.losses.meduet`` and the weighted total, so a trainer only calls ``backward``, the optimiser and
``EMATeacher.update``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.losses.meduet import (aug_content_loss, domain_losses, dual_reconstruction_loss, masked_token_mean,
                                  mftd_loss, patch_targets, siqc_loss)
from meduet.losses.meduet_config import MAELossConfig, MeDUETLossConfig
from meduet.networks.meduet_extras import MeduetExtras

__all__ = ["meduet_step_losses", "mae_step_losses"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _teacher_encode(teacher: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if teacher is None:
        raise MeduetConfigError("MFTD/SiQC are active but no teacher was given (pass an EMATeacher)")
    fn = teacher.encode if hasattr(teacher, "encode") else teacher.module.encode
    with torch.no_grad():
        return fn(x)


def meduet_step_losses(model: nn.Module, teacher: Any, batch_latents: torch.Tensor,
                       domain_index: torch.Tensor, step: int, cfg: MeDUETLossConfig | Mapping | None = None,
                       *, mix_mask: torch.Tensor | None = None, x_aug: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Every MeDUET loss term and the weighted total for one training step.

    Args:
        model: a ``MeDUET`` (or a DDP wrapper of one: the student work happens inside ``model(...)``).
        teacher: ``EMATeacher`` (or any module with ``encode``); only used when MFTD or SiQC is active.
        batch_latents: ``(2K, C, S1, S2, S3)``; sample ``k`` is paired with ``k + K``.
        domain_index: ``(2K,)`` long, each sample's site index.
        step: global step (gates MFTD / SiQC).
        cfg: ``MeDUETLossConfig`` or mapping of its fields (defaults: the paper's).
        mix_mask: optional fixed ``(K, N)`` mix mask (tests); sampled otherwise.
        x_aug: ``(2K, C, S1, S2, S3)`` intensity-augmented copies of ``batch_latents`` (same crops), for
            ``aug_content`` and ``cross_appearance`` (``cfg.needs_augmented_copies``).

    Returns a dict of 0-d tensors: ``loss`` (weighted total, to back-propagate), the active terms ``rec``,
    ``domain_content``, ``domain_style``, ``mftd``, ``siqc`` (+ ``siqc_content``, ``siqc_style``), and the
    detached metrics ``acc_domain_content``, ``acc_domain_style``, ``tau_content``, ``tau_style``.
    """
    cfg = MeDUETLossConfig.from_mapping(cfg)
    net = _unwrap(model)
    x = batch_latents
    domain_index = domain_index.to(device=x.device, dtype=torch.long).view(-1)
    if domain_index.shape[0] != x.shape[0]:
        raise ValueError(f"domain_index has {domain_index.shape[0]} entries for a batch of {x.shape[0]}")
    mftd_on = cfg.use_mftd and step >= cfg.mftd_start_step
    siqc_on = cfg.use_siqc and step >= cfg.siqc_start_step
    k = x.shape[0] // 2
    p = max(1, min(k, round(cfg.aux_pair_fraction * k)))  # pairs that get MFTD / SiQC
    streams = 4 if siqc_on else (2 if (cfg.use_rec or mftd_on) else 0)
    reencode = 4 if siqc_on else (2 if mftd_on else 0)

    aug_on = cfg.w_aug_content > 0 and step >= cfg.aug_start_step
    cross_on = cfg.w_cross_appearance > 0 and step >= cfg.aug_start_step
    if (aug_on or cross_on) and (x_aug is None or x_aug.shape != x.shape):
        raise ValueError("w_aug_content / w_cross_appearance > 0 need x_aug, augmented copies of the batch's crops "
                         "(meduet_vae's encode.yaml with augment_copies > 0); got " +
                         ("none" if x_aug is None else f"shape {tuple(x_aug.shape)} for {tuple(x.shape)}"))
    extras = MeduetExtras(content_adversary=cfg.content_adversary, aux_pairs=p if p < k else None,
                          x_cross=x_aug if cross_on else None)
    out = model(x, mix_mask, mix_ratio=cfg.mix_ratio, streams=streams, reencode=reencode,
                domain_content=cfg.use_domain_content, domain_style=cfg.use_domain_style,
                grl_lambda=cfg.grl_lambda, generator=generator, extras=extras)
    mix_mask = out["mix_mask"]
    losses: dict[str, torch.Tensor] = {}
    total = x.new_zeros(())

    with torch.profiler.record_function("meduet/losses"):
        if cfg.use_rec:
            target = patch_targets(x, net.patch_size, cfg.norm_target)
            losses["rec"] = dual_reconstruction_loss(out["pred"][: 2 * k], target, mix_mask, cfg.rec_on)
            total = total + cfg.w_rec * losses["rec"]

        losses.update(domain_losses(domain_index, out.get("domain_content_logits"), out.get("domain_style_logits"),
                                    out["visible"]))
        if "domain_content_confusion_logits" in out:
            # the encoder's side of the confusion adversary: cross-entropy to the uniform distribution
            conf_logits = out["domain_content_confusion_logits"].float()
            if conf_logits.dim() == 3:  # per token: the tokens of each row's own source
                conf_logits = conf_logits[out["visible"]]
            conf = -F.log_softmax(conf_logits, dim=1).mean()
            losses["domain_content_confusion"] = conf.detach()
            losses["domain_content"] = losses["domain_content"] + cfg.grl_lambda * conf
        if "domain_content" in losses:
            total = total + cfg.w_domain_content * losses["domain_content"]
        if "domain_style" in losses:
            total = total + cfg.w_domain_style * losses["domain_style"]

    teacher_out = teacher_aug = None
    if mftd_on or siqc_on or aug_on:
        with torch.profiler.record_function("meduet/teacher"):
            if aug_on and (mftd_on or siqc_on):  # one teacher call for both
                both = _teacher_encode(teacher, torch.cat([x, x_aug.to(x)]))
                teacher_out = {kk: v[: x.shape[0]] for kk, v in both.items() if v is not None}
                teacher_aug = {kk: v[x.shape[0]:] for kk, v in both.items() if v is not None}
            elif aug_on:
                teacher_aug = _teacher_encode(teacher, x_aug.to(x))
            else:
                teacher_out = _teacher_encode(teacher, x)  # once per step, shared by MFTD and SiQC

    with torch.profiler.record_function("meduet/losses"):
        if cfg.use_mftd:
            if mftd_on:
                rows = torch.cat([torch.arange(p), k + torch.arange(p)]).to(x.device)  # [A[:P]; B[:P]]
                losses["mftd"] = mftd_loss(out["view_content_tokens"][: 2 * p], out["view_style_tokens"][: 2 * p],
                                           teacher_out["content_tokens"][rows], teacher_out["style_tokens"][rows],
                                           ~out["visible"][rows], cfg.mftd_distance, cfg.mftd_content_weight,
                                           cfg.mftd_style_weight)
                total = total + cfg.w_mftd * losses["mftd"]
            else:
                losses["mftd"] = x.new_zeros(())

        if siqc_on:
            losses.update(siqc_loss(out["view_content"], out["view_style"], teacher_out["content"],
                                    teacher_out["style"], domain_index, out["temperature"], p))
            total = total + cfg.w_siqc * losses["siqc"]
        if aug_on:
            losses["aug_content"] = aug_content_loss(out["content_tokens"], teacher_aug["content_tokens"],
                                                     out["visible"], cfg.mftd_distance)
            total = total + cfg.w_aug_content * losses["aug_content"]
        if cross_on:
            target_cross = patch_targets(x_aug.to(x), net.patch_size, cfg.norm_target)
            losses["cross_appearance"] = dual_reconstruction_loss(out["pred_cross"], target_cross, mix_mask,
                                                                  cfg.rec_on)
            total = total + cfg.w_cross_appearance * losses["cross_appearance"]
        if cfg.use_siqc:
            tau = out["temperature"].detach()
            losses["tau_content"], losses["tau_style"] = tau[0], tau[1]

    losses["loss"] = total
    return losses


def mae_step_losses(model: nn.Module, batch_latents: torch.Tensor, cfg: MAELossConfig | Mapping | None = None,
                    *, visible: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Masked-autoencoder baseline step: MSE on the hidden patches. Returns ``{"loss", "rec"}``."""
    cfg = MAELossConfig.from_mapping(cfg)
    net = _unwrap(model)
    out = model(batch_latents, visible, mask_ratio=cfg.mask_ratio, generator=generator)
    target = patch_targets(batch_latents, net.patch_size, cfg.norm_target)
    err = (out["pred"] - target).pow(2).mean(dim=-1)
    rec = masked_token_mean(err, ~out["visible"])
    return {"loss": rec, "rec": rec}
