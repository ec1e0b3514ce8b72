"""MeDUET objectives and one training step's losses.

Terms (paper weights as defaults, see ``MeDUETLossConfig``)::

    total = w_rec * rec + w_domain_content * domain_content + w_domain_style * domain_style
            + w_mftd * mftd + w_siqc * siqc          (1, 0.2, 0.2, 0.5, 0.3)

* ``rec`` - dual reconstruction (``dual_reconstruction_loss``): MSE between each source's predicted latent
  patches and its own patches at the positions *hidden* from that source (``rec_on="all"``: every position),
  one mean per source, averaged over the two sources (so unequal mixing ratios weigh A and B equally).
* ``domain_content`` / ``domain_style`` - cross-entropy of the domain heads on each source's pooled content
  (through gradient reversal, ``meduet.networks.layers.grad_reverse``: the head learns to find the site, the
  encoder learns to hide it) and pooled style
  (plain: style must predict the site). Accuracies are returned for logging.
* ``mftd`` - masked factor-token distillation (``mftd_loss``): the EMA teacher encodes the unmixed inputs;
  the student re-encodes its reconstructions ``x_hat_A``, ``x_hat_B`` (full sequences, gradients kept through
  the reconstruction: the paper distils *through* the decoder); per source, the distance between student and
  teacher content tokens and style tokens is averaged over the positions that source did not see; the two
  sources are averaged. Distance ``1 - cos`` by default (scale-free, robust early in training), or
  ``smooth_l1`` / ``mse`` on the raw tokens. Zero (and no compute) before ``mftd_start_step``.
* ``siqc`` - style-swapped supervised contrast (``siqc_loss``): queries = student pooled content and style of
  the four re-encoded views ``[x_hat_A, x_hat_B, x_hat_A<-sB, x_hat_B<-sA]`` of every pair; keys = the
  teacher's pooled content and style of every original sample (the same teacher pass MFTD uses, computed
  once per step). Content positives = the key of the same source sample; style positives = every key of the
  same domain (labels ``[dom A, dom B, dom B, dom A]``: a swapped view carries the other source's style).
  Queries and keys are L2-normalised; temperature from ``model.temperature()`` (fixed 0.07 or learnable).

A switched-off term (``use_* = False``) is absent from the returned dict and its modules are not run; before
``mftd_start_step`` the ``mftd`` entry is an exact 0.

``meduet_step_losses`` does everything for one step (student forward, one teacher pass, losses, weighted
total), so a trainer only calls ``backward``, the optimiser and ``EMATeacher.update``.
``mae_step_losses`` does the same for the ``MaskedAutoencoder`` baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.networks.latent_vit import patchify
from meduet.networks.meduet_extras import MeduetExtras

__all__ = [
    "MeDUETLossConfig",
    "MAELossConfig",
    "patch_targets",
    "dual_reconstruction_loss",
    "domain_losses",
    "token_distance",
    "mftd_loss",
    "supcon_loss",
    "siqc_labels",
    "siqc_loss",
    "aug_content_loss",
    "meduet_step_losses",
    "mae_step_losses",
]


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
class _FromMapping:
    @classmethod
    def from_mapping(cls, cfg: Any = None):
        """A config from ``None`` (defaults), an instance, or a mapping (e.g. a bundle's YAML section)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, Mapping):
            raise MeduetConfigError(f"{cls.__name__}: expected a mapping, got {type(cfg).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise MeduetConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(cfg))


@dataclasses.dataclass
class MeDUETLossConfig(_FromMapping):
    """Everything ``meduet_step_losses`` needs besides the networks and the batch.

    Attributes:
        mix_ratio: share of positions given to source A (any value leaving each source >= 1 token).
        rec_on: ``"hidden"`` (MSE where the source was hidden, the paper's MAE-like target) or ``"all"``.
        norm_target: normalise each target patch to zero mean / unit variance (off: latents are standardised).
        grl_lambda: gradient-reversal coefficient of the content domain loss.
        content_adversary: ``"grl"`` (the paper's gradient reversal) or ``"confusion"`` (the content domain head
            learns on detached content; the encoder minimises the cross-entropy of the frozen head's prediction
            to the uniform distribution, scaled by ``grl_lambda``) or ``"confusion_tokens"`` (the same game on
            every content token instead of the pooled content). See ``MeDUET.forward``.
        mftd_start_step: MFTD is active for ``step >= mftd_start_step`` (warm-up before the teacher is
            meaningful; 10k of the paper's ~200k steps by default - presets for short runs set it lower).
        siqc_start_step: same for SiQC (on from the start, as in the public code).
        mftd_distance: ``"cosine"`` (1 - cos), ``"smooth_l1"`` or ``"mse"``.
        mftd_content_weight, mftd_style_weight: weights of the content and style token terms inside MFTD.
        w_*: weights of the terms in the total.
        use_*: ablation switches; a switched-off term is not computed at all.
        aux_pair_fraction: share of each batch's pairs that get MFTD and SiQC (not in the paper, which uses all:
            1.0). The first ``round(f K)`` (at least 1) of the ``K`` random pairs get the style-swapped decoder
            streams and the re-encoded views; the reconstruction, domain terms and the teacher keys (all ``2K``
            samples) are unchanged. These two terms are most of a step's arithmetic (BENCHMARKS.md), so e.g.
            1/3 of the pairs brings the full step to about 3x the masked-autoencoder step.
        w_aug_content: weight of ``aug_content`` (not in the paper; 0 = off): the student's content tokens of
            each source, at its own positions of the mixed forward, against the teacher's content tokens of an
            intensity-augmented copy of the same crop (``x_aug``: same anatomy, other appearance), distance
            ``mftd_distance``. It asks for content that does not change with appearance, beyond the few sites a
            small pretraining set shows the domain adversary (at demo size it did not move the site probes: see
            meduet_pretrain's docs). Needs ``x_aug`` batches (meduet_vae ``encode.yaml`` with
            ``augment_copies``); active from ``aug_start_step``.
        w_cross_appearance: weight of ``cross_appearance`` (not in the paper; 0 = off): each source's content
            tokens of the mixed forward (its own positions), recombined with the pooled style of the student's
            encoding of ``x_aug``, must decode to ``x_aug`` (MSE, positions as ``rec_on``). The decoder can only
            render the copy's appearance *through the style*, so appearance that the pooled style carries is
            trained to be applied to the content's anatomy - the style swap. With ``synthetic_site`` copies
            (meduet_vae ``encode.yaml --augment_kind synthetic_site``: every intensity class repainted on its own)
            it is what moved the demo's style swap (meduet_pretrain's docs). Active from ``aug_start_step``.
    """

    mix_ratio: float = 0.5
    rec_on: str = "hidden"
    norm_target: bool = False
    grl_lambda: float = 1.0
    content_adversary: str = "grl"
    mftd_start_step: int = 10_000
    siqc_start_step: int = 0
    mftd_distance: str = "cosine"
    mftd_content_weight: float = 1.0
    mftd_style_weight: float = 1.0
    w_rec: float = 1.0
    w_domain_content: float = 0.2
    w_domain_style: float = 0.2
    w_mftd: float = 0.5
    w_siqc: float = 0.3
    use_rec: bool = True
    use_domain_content: bool = True
    use_domain_style: bool = True
    use_mftd: bool = True
    use_siqc: bool = True
    aux_pair_fraction: float = 1.0
    w_aug_content: float = 0.0
    w_cross_appearance: float = 0.0
    aug_start_step: int = 0

    @property
    def needs_augmented_copies(self) -> bool:
        """Whether a step needs ``x_aug`` (``aug_content`` or ``cross_appearance`` is weighted)."""
        return self.w_aug_content > 0 or self.w_cross_appearance > 0

    def __post_init__(self) -> None:
        for name in ("w_aug_content", "w_cross_appearance"):
            if getattr(self, name) < 0:
                raise MeduetConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rec_on not in ("hidden", "all"):
            raise MeduetConfigError(f"rec_on must be 'hidden' or 'all', got {self.rec_on!r}")
        if self.content_adversary not in ("grl", "confusion", "confusion_tokens"):
            raise MeduetConfigError("content_adversary must be 'grl', 'confusion' or 'confusion_tokens', "
                                    f"got {self.content_adversary!r}")
        if self.mftd_distance not in ("cosine", "smooth_l1", "mse"):
            raise MeduetConfigError(f"mftd_distance must be cosine/smooth_l1/mse, got {self.mftd_distance!r}")
        if not 0.0 < self.aux_pair_fraction <= 1.0:
            raise MeduetConfigError(f"aux_pair_fraction must be in (0, 1], got {self.aux_pair_fraction}")
        if not 0.0 < self.mix_ratio < 1.0:
            raise MeduetConfigError(f"mix_ratio must be in (0, 1), got {self.mix_ratio}")


@dataclasses.dataclass
class MAELossConfig(_FromMapping):
    """Masked-autoencoder baseline: ``mask_ratio`` (None = the model's), ``norm_target``."""

    mask_ratio: float | None = None
    norm_target: bool = False


# ----------------------------------------------------------------------------------------------------------------
# reconstruction
# ----------------------------------------------------------------------------------------------------------------
def patch_targets(x: torch.Tensor, patch_size: int, norm_target: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """``patchify(x)``; with ``norm_target`` each patch is standardised (MAE's ``norm_pix_loss``)."""
    target = patchify(x, patch_size)
    if norm_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def _masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``values (B, N)`` over ``mask (B, N)`` (all rows pooled together)."""
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def dual_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mix_mask: torch.Tensor,
                             on: str = "hidden") -> torch.Tensor:
    """Dual reconstruction MSE.

    Args:
        pred: ``(2K, N, P)`` predictions of the streams [A (K rows); B (K rows)].
        target: ``(2K, N, P)`` patches of the input batch (A rows then B rows, i.e. the batch order).
        mix_mask: ``(K, N)`` bool, True = A's position.
        on: ``"hidden"``: A is scored where ``~mix_mask`` and B where ``mix_mask``; ``"all"``: everywhere.

    Returns the mean over the two sources of each source's mean squared error per value.
    """
    k = mix_mask.shape[0]
    err = (pred - target).pow(2).mean(dim=-1)  # (2K, N)
    if on == "all":
        return 0.5 * (err[:k].mean() + err[k:].mean())
    return 0.5 * (_masked_token_mean(err[:k], ~mix_mask) + _masked_token_mean(err[k:], mix_mask))


# ----------------------------------------------------------------------------------------------------------------
# domain adversarial
# ----------------------------------------------------------------------------------------------------------------
def domain_losses(domain_index: torch.Tensor, content_logits: torch.Tensor | None = None,
                  style_logits: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cross-entropy and accuracy of the domain heads.

    ``content_logits``/``style_logits``: ``(2K, num_domains)`` from ``MeDUET.forward`` (content already through
    gradient reversal there), or per token ``(2K, N, num_domains)`` with ``token_mask (2K, N)`` marking the
    tokens that belong to each row's source (averaged over those); ``domain_index (2K,)`` = each source's site.
    Returns ``domain_content``, ``domain_style`` (losses) and ``acc_domain_content``, ``acc_domain_style``
    (detached) for the logits given.
    """
    out: dict[str, torch.Tensor] = {}
    for name, logits in (("domain_content", content_logits), ("domain_style", style_logits)):
        if logits is None:
            continue
        if logits.dim() == 3:
            if token_mask is None:
                raise ValueError(f"per-token {name} logits need token_mask")
            labels = domain_index[:, None].expand(logits.shape[:2])[token_mask]
            logits = logits[token_mask]
        else:
            labels = domain_index
        out[name] = F.cross_entropy(logits, labels)
        out[f"acc_{name}"] = (logits.detach().argmax(dim=1) == labels).float().mean()
    return out


# ----------------------------------------------------------------------------------------------------------------
# MFTD
# ----------------------------------------------------------------------------------------------------------------
def token_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-token distance ``(B, N, F), (B, N, F) -> (B, N)``: ``1 - cos``, smooth-L1 or MSE (mean over F)."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-6)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none").mean(dim=-1)
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    raise ValueError(f"unknown distance {kind!r}")


def mftd_loss(student_content: torch.Tensor, student_style: torch.Tensor, teacher_content: torch.Tensor,
              teacher_style: torch.Tensor, hidden: torch.Tensor, distance: str = "cosine",
              content_weight: float = 1.0, style_weight: float = 1.0) -> torch.Tensor:
    """Masked factor-token distillation.

    Args:
        student_content, student_style: ``(2K, N, D)``, ``(2K, N, Ds)`` - student tokens of the re-encoded
            reconstructions [x_hat_A; x_hat_B].
        teacher_content, teacher_style: the teacher's tokens of the unmixed inputs [A; B] (no gradient).
        hidden: ``(2K, N)`` bool, positions each source did not see (``cat([~M, M])``).

    Returns ``content_weight * d_content + style_weight * d_style``, each the mean over the two sources of the
    per-source mean distance on hidden positions.
    """
    k = hidden.shape[0] // 2
    total = student_content.new_zeros(())
    pairs = ((content_weight, student_content, teacher_content), (style_weight, student_style, teacher_style))
    for weight, s, t in pairs:
        if weight == 0:
            continue
        d = token_distance(s, t.detach(), distance)
        total = total + weight * 0.5 * (_masked_token_mean(d[:k], hidden[:k]) + _masked_token_mean(d[k:], hidden[k:]))
    return total


# ----------------------------------------------------------------------------------------------------------------
# SiQC
# ----------------------------------------------------------------------------------------------------------------
def supcon_loss(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
                temperature: torch.Tensor | float) -> torch.Tensor:
    """Supervised contrastive loss of queries against keys.

    ``queries (Q, F)`` and ``keys (R, F)`` are L2-normalised; logits = ``q @ k.T / temperature``; for each query
    the loss is minus the mean log-softmax (over all keys) of its positive keys (same label); queries without a
    positive key are skipped. Keys get no gradient.
    """
    q = F.normalize(queries, dim=-1)
    k = F.normalize(keys.detach(), dim=-1)
    logits = q @ k.t() / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (query_labels.view(-1, 1) == key_labels.view(1, -1)).to(log_prob.dtype)
    count = pos.sum(dim=1)
    per_query = -(log_prob * pos).sum(dim=1) / count.clamp_min(1.0)
    valid = count > 0
    return per_query[valid].mean() if bool(valid.any()) else per_query.sum() * 0.0


def siqc_labels(domain_index: torch.Tensor, pairs: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels for the four views ``[x_hat_A, x_hat_B, x_hat_A<-sB, x_hat_B<-sA]`` of the first ``pairs`` (default
    all ``K``) of ``K`` pairs.

    Returns ``(content_query, content_key, style_query, style_key)``: content labels are sample indices
    (``[A, B, A, B]`` against keys ``[A; B]`` = ``arange(2K)``); style labels are domains
    (``[dom A, dom B, dom B, dom A]`` against keys ``domain_index``). The keys are always all ``2K`` samples.
    """
    n = domain_index.shape[0]
    k = n // 2
    p = k if pairs is None else int(pairs)
    sample = torch.arange(n, device=domain_index.device)
    a, b = sample[:p], sample[k: k + p]
    content_q = torch.cat([a, b, a, b])
    style_q = domain_index[torch.cat([a, b, b, a])]
    return content_q, sample, style_q, domain_index


def siqc_loss(view_content: torch.Tensor, view_style: torch.Tensor, key_content: torch.Tensor,
              key_style: torch.Tensor, domain_index: torch.Tensor,
              temperature: torch.Tensor | tuple[float, float] | float = 0.07,
              pairs: int | None = None) -> dict[str, torch.Tensor]:
    """SiQC on pooled features (of the first ``pairs`` pairs' views, default all; see ``siqc_labels``).

    Args:
        view_content, view_style: ``(4P, D)``, ``(4P, Ds)`` student pooled factors of the views
            ``[x_hat_A, x_hat_B, x_hat_A<-sB, x_hat_B<-sA]`` of the first ``P = pairs`` pairs (each block P rows;
            ``P = K`` by default).
        key_content, key_style: ``(2K, D)``, ``(2K, Ds)`` teacher pooled factors of the inputs [A; B].
        domain_index: ``(2K,)``.
        temperature: scalar or ``(content, style)`` (``MeDUET.temperature()``).
        pairs: ``P`` (default all ``K``).

    Returns ``siqc`` (content + style), ``siqc_content``, ``siqc_style``.
    """
    if isinstance(temperature, (int, float)):
        tau_c = tau_s = float(temperature)
    else:
        tau_c, tau_s = temperature[0], temperature[1]
    cq, ck, sq, sk = siqc_labels(domain_index, pairs)
    lc = supcon_loss(view_content, key_content, cq, ck, tau_c)
    ls = supcon_loss(view_style, key_style, sq, sk, tau_s)
    return {"siqc": lc + ls, "siqc_content": lc, "siqc_style": ls}


# ----------------------------------------------------------------------------------------------------------------
# appearance-augmented content consistency (an addition to the paper, off by default)
# ----------------------------------------------------------------------------------------------------------------
def aug_content_loss(student_content: torch.Tensor, teacher_aug_content: torch.Tensor, visible: torch.Tensor,
                     distance: str = "cosine") -> torch.Tensor:
    """Content of the mixed forward against the teacher's content of the augmented copies.

    Args:
        student_content: ``(K, N, D)`` student content tokens of the mixed sequence (position ``n`` holds the
            factor of the source that owns it).
        teacher_aug_content: ``(2K, N, D)`` teacher content tokens of the augmented copies ``[A'; B']``.
        visible: ``(2K, N)`` bool, each source's own positions (``cat([M, ~M])``).

    Returns the mean over the two sources of the per-source mean distance over own positions.
    """
    k = student_content.shape[0]
    per_source = student_content.repeat(2, 1, 1)
    d = token_distance(per_source, teacher_aug_content.to(per_source.dtype), distance)
    return 0.5 * (_masked_token_mean(d[:k], visible[:k]) + _masked_token_mean(d[k:], visible[k:]))


# ----------------------------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------------------------
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
    rec = _masked_token_mean(err, ~out["visible"])
    return {"loss": rec, "rec": rec}
