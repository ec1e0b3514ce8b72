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
from meduet.networks.masks import masked_mean
from meduet.networks.meduet_extras import MeduetExtras

__all__ = ["meduet_step_losses", "mae_step_losses", "pairing_source"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _teacher_module(teacher: Any) -> Any:
    if teacher is None:
        raise MeduetConfigError("MFTD/SiQC are active but no teacher was given (pass an EMATeacher)")
    return teacher.module if hasattr(teacher, "module") else teacher


def _teacher_encode(teacher: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if teacher is None:
        raise MeduetConfigError("MFTD/SiQC are active but no teacher was given (pass an EMATeacher)")
    fn = teacher.encode if hasattr(teacher, "encode") else teacher.module.encode
    with torch.no_grad():
        return fn(x)


def pairing_source(batch: int, pairing: str = "one_way", device=None) -> torch.Tensor | None:
    """The sample behind each source row ``[A rows; B rows]`` of the mixed sequences of a batch of ``2K``.

    ``"one_way"``: None (the rows are the batch: ``K`` sequences, A = sample ``k``, B = sample ``k + K``).
    ``"both_ways"``: ``(4K,)`` indices for ``2K`` sequences: sequence ``j`` has A = sample ``j`` and B = sample
    ``(j + K) mod 2K``, so each pair is mixed once each way (the public code's ``x`` with ``x.flip(0)``).
    """
    if pairing == "one_way":
        return None
    if pairing != "both_ways":
        raise MeduetConfigError(f"loss#pairing must be 'one_way' or 'both_ways', got {pairing!r}")
    samples = torch.arange(batch, device=device)
    return torch.cat([samples, samples.roll(batch // 2)])


def _siqc_features(content_tokens: torch.Tensor, style_tokens: torch.Tensor, visible: torch.Tensor | None,
                   pooled: tuple[torch.Tensor, torch.Tensor] | None, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled content and style of views for SiQC: the model's pooled factors (``pool="factor"``: ``pooled``) or
    the public code's ``token_pool`` (``"layer_norm_mean"``: layer norm without affine over each token's features,
    then the mean over the view's tokens, its own positions ``visible`` for a source of a mixed sequence)."""
    if pool == "factor":
        return pooled
    c = F.layer_norm(content_tokens, content_tokens.shape[-1:])
    s = F.layer_norm(style_tokens, style_tokens.shape[-1:])
    return masked_mean(c, visible), masked_mean(s, visible)


def _source_views(content_tokens: torch.Tensor, style_tokens: torch.Tensor, visible: torch.Tensor,
                  pooled_content: torch.Tensor, pooled_style: torch.Tensor, k: int, p: int, pool: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SiQC features of the two sources of the first ``p`` of ``k`` mixed sequences (views A, B) from a mixed
    forward: ``content_tokens``/``style_tokens (K, N, .)`` hold each position's own source's factor."""
    rows = torch.cat([torch.arange(p), k + torch.arange(p)]).to(visible.device)
    ct, st = content_tokens[:p].repeat(2, 1, 1), style_tokens[:p].repeat(2, 1, 1)
    return _siqc_features(ct, st, visible[rows], (pooled_content[rows], pooled_style[rows]), pool)


def meduet_step_losses(model: nn.Module, teacher: Any, batch_latents: torch.Tensor,
                       domain_index: torch.Tensor, step: int, cfg: MeDUETLossConfig | Mapping | None = None,
                       *, mix_mask: torch.Tensor | None = None, x_aug: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Every MeDUET loss term and the weighted total for one training step.

    Args:
        model: a ``MeDUET`` (or a DDP wrapper of one: the student work happens inside ``model(...)``).
        teacher: ``EMATeacher`` (or any module with ``encode``); only used when MFTD or SiQC is active
            (``cfg.siqc_keys="swapped"``: a teacher of the whole student, ``EMATeacher(scope="student")``).
        batch_latents: ``(2K, C, S1, S2, S3)``; sample ``k`` is paired with ``k + K`` (``cfg.pairing``
            ``"both_ways"``: also sample ``k + K`` with ``k``, each way with its own mask).
        domain_index: ``(2K,)`` long, each sample's site index.
        step: global step (gates MFTD / SiQC).
        cfg: ``MeDUETLossConfig`` or mapping of its fields (defaults: the paper's).
        mix_mask: optional fixed ``(Q, N)`` mix mask (tests; ``Q`` = mixed sequences: ``K``, or ``2K`` both
            ways); sampled otherwise.
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
    if x.shape[0] < 2 or x.shape[0] % 2:
        raise ValueError(f"MeDUET needs an even batch of at least 2 (pairs k, k+K), got {x.shape[0]}")
    mftd_on = cfg.use_mftd and step >= cfg.mftd_start_step
    siqc_on = cfg.use_siqc and step >= cfg.siqc_start_step
    aug_on = cfg.w_aug_content > 0 and step >= cfg.aug_start_step
    cross_on = cfg.w_cross_appearance > 0 and step >= cfg.aug_start_step
    if (aug_on or cross_on) and (x_aug is None or x_aug.shape != x.shape):
        raise ValueError("w_aug_content / w_cross_appearance > 0 need x_aug, augmented copies of the batch's crops "
                         "(meduet_vae's encode.yaml with augment_copies > 0); got " +
                         ("none" if x_aug is None else f"shape {tuple(x_aug.shape)} for {tuple(x.shape)}"))
    swapped_keys = siqc_on and cfg.siqc_keys == "swapped"
    if swapped_keys and not hasattr(_teacher_module(teacher), "swapped_keys"):
        raise MeduetConfigError("loss#siqc_keys 'swapped' needs a teacher of the whole student (it decodes the "
                                "swapped streams): set ema_scope: student (EMATeacher(..., scope='student'))")

    # the source rows the network sees: [A rows; B rows] of Q mixed sequences, and the sample each row is
    n_real = x.shape[0]
    source = pairing_source(n_real, cfg.pairing, x.device)
    if source is not None:
        x_rows = x[source]
        x_aug_rows = x_aug[source] if x_aug is not None else None
    else:
        source, x_rows, x_aug_rows = None, x, x_aug
    dom_rows = domain_index if source is None else domain_index[source]
    k = x_rows.shape[0] // 2  # mixed sequences
    p = max(1, min(k, round(cfg.aux_pair_fraction * k)))  # sequences that get MFTD / SiQC
    streams = 4 if siqc_on else (2 if (cfg.use_rec or mftd_on) else 0)
    reencode = 4 if siqc_on else (2 if mftd_on else 0)

    extras = MeduetExtras(content_adversary=cfg.content_adversary, aux_pairs=p if p < k else None,
                          x_cross=x_aug_rows if cross_on else None)
    out = model(x_rows, mix_mask, mix_ratio=cfg.mix_ratio, streams=streams, reencode=reencode,
                domain_content=cfg.use_domain_content, domain_style=cfg.use_domain_style,
                grl_lambda=cfg.grl_lambda, generator=generator, extras=extras, style_swap=cfg.style_swap)
    mix_mask = out["mix_mask"]
    losses: dict[str, torch.Tensor] = {}
    total = x.new_zeros(())

    with torch.profiler.record_function("meduet/losses"):
        if cfg.use_rec:
            target = patch_targets(x_rows, net.patch_size, cfg.norm_target)
            losses["rec"] = dual_reconstruction_loss(out["pred"][: 2 * k], target, mix_mask, cfg.rec_on)
            total = total + cfg.w_rec * losses["rec"]

        losses.update(domain_losses(dom_rows, out.get("domain_content_logits"), out.get("domain_style_logits"),
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

    # teacher passes, on the real samples (each sample once); rows are indexed by `source`
    teacher_out = teacher_aug = teacher_swap = None
    need_unmixed = mftd_on or (siqc_on and not swapped_keys)
    if need_unmixed or aug_on or swapped_keys:
        with torch.profiler.record_function("meduet/teacher"):
            unmixed = [t for t, on in ((x, need_unmixed), (x_aug.to(x) if aug_on else None, aug_on)) if on]
            if swapped_keys:  # the teacher's own mixed forward with the complementary mask, swap, re-encode
                rows = torch.cat([torch.arange(p), k + torch.arange(p)]).to(x.device)
                teacher_swap = _teacher_module(teacher).swapped_keys(
                    x_rows[rows], ~mix_mask[:p], cfg.style_swap, torch.cat(unmixed) if unmixed else None)
                both = teacher_swap.pop("extra_encoding", None)
            elif unmixed:
                both = _teacher_encode(teacher, torch.cat(unmixed))
            if need_unmixed:
                teacher_out = {kk: v[:n_real] for kk, v in both.items() if v is not None}
            if aug_on:
                teacher_aug = {kk: v[-n_real:] for kk, v in both.items() if v is not None}
    if source is not None:  # per source row
        teacher_out = teacher_out and {kk: v[source] for kk, v in teacher_out.items()}
        teacher_aug = teacher_aug and {kk: v[source] for kk, v in teacher_aug.items()}

    with torch.profiler.record_function("meduet/losses"):
        if cfg.use_mftd:
            if mftd_on:
                rows = torch.cat([torch.arange(p), k + torch.arange(p)]).to(x.device)  # [A[:P]; B[:P]]
                losses["mftd"] = mftd_loss(out["view_content_tokens"][: 2 * p], out["view_style_tokens"][: 2 * p],
                                           teacher_out["content_tokens"][rows], teacher_out["style_tokens"][rows],
                                           ~out["visible"][rows], cfg.mftd_distance, cfg.mftd_content_weight,
                                           cfg.mftd_style_weight, cfg.mftd_reduction)
                total = total + cfg.w_mftd * losses["mftd"]
            else:
                losses["mftd"] = x.new_zeros(())

        if siqc_on:
            losses.update(_siqc(cfg, out, teacher_out, teacher_swap, domain_index, source, k, p))
            total = total + cfg.w_siqc * losses["siqc"]
        if aug_on:
            losses["aug_content"] = aug_content_loss(out["content_tokens"], teacher_aug["content_tokens"],
                                                     out["visible"], cfg.mftd_distance)
            total = total + cfg.w_aug_content * losses["aug_content"]
        if cross_on:
            target_cross = patch_targets(x_aug_rows.to(x), net.patch_size, cfg.norm_target)
            losses["cross_appearance"] = dual_reconstruction_loss(out["pred_cross"], target_cross, mix_mask,
                                                                  cfg.rec_on)
            total = total + cfg.w_cross_appearance * losses["cross_appearance"]
        if cfg.use_siqc:
            tau = out["temperature"].detach()
            losses["tau_content"], losses["tau_style"] = tau[0], tau[1]

    losses["loss"] = total
    return losses


def _siqc(cfg: MeDUETLossConfig, out: Mapping[str, torch.Tensor], teacher_out: Mapping[str, torch.Tensor] | None,
          teacher_swap: Mapping[str, torch.Tensor] | None, domain_index: torch.Tensor, source: torch.Tensor | None,
          k: int, p: int) -> dict[str, torch.Tensor]:
    """SiQC queries (the student's four views of the first ``p`` sequences) and keys in the configured forms."""
    vc_tok, vs_tok = out["view_content_tokens"], out["view_style_tokens"]
    sw = slice(2 * p, 4 * p)  # the re-encoded swapped views
    q_swap = _siqc_features(vc_tok[sw], vs_tok[sw], None, (out["view_content"][sw], out["view_style"][sw]),
                            cfg.siqc_pool)
    if cfg.siqc_queries == "mixed":
        q_src = _source_views(out["content_tokens"], out["style_tokens"], out["visible"], out["content"],
                              out["style"], k, p, cfg.siqc_pool)
    else:
        q_src = _siqc_features(vc_tok[: 2 * p], vs_tok[: 2 * p], None,
                               (out["view_content"][: 2 * p], out["view_style"][: 2 * p]), cfg.siqc_pool)
    q_content, q_style = torch.cat([q_src[0], q_swap[0]]), torch.cat([q_src[1], q_swap[1]])
    if cfg.siqc_keys == "swapped":  # the teacher's four views of the same p sequences, in the queries' layout
        t = teacher_swap
        k_src = _source_views(t["content_tokens"], t["style_tokens"], t["visible"], t["content"], t["style"], p, p,
                              cfg.siqc_pool)
        k_swap = _siqc_features(t["view_content_tokens"], t["view_style_tokens"], None,
                                (t["view_content"], t["view_style"]), cfg.siqc_pool)
        key_content, key_style = torch.cat([k_src[0], k_swap[0]]), torch.cat([k_src[1], k_swap[1]])
    else:  # one key per sample
        key_content, key_style = _siqc_features(teacher_out["content_tokens"], teacher_out["style_tokens"], None,
                                                (teacher_out["content"], teacher_out["style"]), cfg.siqc_pool)
        if source is not None:  # rows of the real samples: the first 2K source rows are samples 0..2K-1
            key_content, key_style = key_content[: source.shape[0] // 2], key_style[: source.shape[0] // 2]
    return siqc_loss(q_content, q_style, key_content, key_style, domain_index, out["temperature"], p,
                     source=source, keys=cfg.siqc_keys, style_labels=cfg.siqc_style_labels)


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
