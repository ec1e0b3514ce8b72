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
* ``mftd`` - Mixed-Factor Token Distillation (MFTD, ``mftd_loss``): the EMA teacher encodes the unmixed inputs;
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
  The public code's forms (``paper`` preset; ``MeDUETLossConfig``): queries = the sources' factors of the mixed
  forward and the re-encoded swapped views, keys = the same four views from the teacher's own mixed forward with
  the complementary mask (each query's own key excluded: ``supcon_loss(exclude_self=True)``), style positives = the
  same sample (``siqc_view_labels``).

A switched-off term (``use_* = False``) is absent from the returned dict and its modules are not run; before
``mftd_start_step`` the ``mftd`` entry is an exact 0.

``meduet_step_losses`` does everything for one step (student forward, one teacher pass, losses, weighted
total), so a trainer only calls ``backward``, the optimiser and ``EMATeacher.update``.
``mae_step_losses`` does the same for the ``MaskedAutoencoder`` baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meduet.networks.latent_vit import patchify

__all__ = [
    "patch_targets",
    "masked_token_mean",
    "dual_reconstruction_loss",
    "domain_losses",
    "token_distance",
    "mftd_loss",
    "supcon_loss",
    "siqc_labels",
    "siqc_view_labels",
    "siqc_loss",
    "aug_content_loss",
]


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


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
    return 0.5 * (masked_token_mean(err[:k], ~mix_mask) + masked_token_mean(err[k:], mix_mask))


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
              content_weight: float = 1.0, style_weight: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Mixed-Factor Token Distillation (MFTD).

    Args:
        student_content, student_style: ``(2K, N, D)``, ``(2K, N, Ds)`` - student tokens of the re-encoded
            reconstructions [x_hat_A; x_hat_B].
        teacher_content, teacher_style: the teacher's tokens of the unmixed inputs [A; B] (no gradient).
        hidden: ``(2K, N)`` bool, positions each source did not see (``cat([~M, M])``).

    Returns ``content_weight * d_content + style_weight * d_style``, each the mean (``reduction="mean"``) or the
    sum (``"sum"``, the public code's form) over the two sources of the per-source mean distance on hidden
    positions (the mean over every hidden token of the source's rows, all rows pooled).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    per_source = 0.5 if reduction == "mean" else 1.0
    k = hidden.shape[0] // 2
    total = student_content.new_zeros(())
    pairs = ((content_weight, student_content, teacher_content), (style_weight, student_style, teacher_style))
    for weight, s, t in pairs:
        if weight == 0:
            continue
        d = token_distance(s, t.detach(), distance)
        total = total + weight * per_source * (masked_token_mean(d[:k], hidden[:k])
                                               + masked_token_mean(d[k:], hidden[k:]))
    return total


# ----------------------------------------------------------------------------------------------------------------
# SiQC
# ----------------------------------------------------------------------------------------------------------------
def supcon_loss(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
                temperature: torch.Tensor | float, exclude_self: bool = False) -> torch.Tensor:
    """Supervised contrastive loss of queries against keys.

    ``queries (Q, F)`` and ``keys (R, F)`` are L2-normalised; logits = ``q @ k.T / temperature``; for each query
    the loss is minus the mean log-softmax (over all keys) of its positive keys (same label); queries without a
    positive key are skipped. Keys get no gradient. ``exclude_self`` (``Q == R``, keys in the queries' layout, as
    the public code's SiQC has them): key ``i`` is neither a positive of query ``i`` nor in its softmax.
    """
    q = F.normalize(queries, dim=-1)
    k = F.normalize(keys.detach(), dim=-1)
    logits = q @ k.t() / temperature
    if exclude_self:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"exclude_self needs as many keys as queries, got {tuple(logits.shape)}")
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (query_labels.view(-1, 1) == key_labels.view(1, -1))
    if exclude_self:
        pos = pos & ~eye
        log_prob = log_prob.masked_fill(eye, 0.0)  # -inf * 0 would be nan
    pos = pos.to(log_prob.dtype)
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


def siqc_view_labels(source: torch.Tensor, domain_index: torch.Tensor, pairs: int | None = None,
                     style_labels: str = "domain") -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style labels of the four views ``[A, B, A<-sB, B<-sA]`` of the first ``pairs`` of ``K`` pairs.

    ``source (2K,)``: the sample index of each source row (``[A rows; B rows]``; with both-way pairing a sample is
    source A of one sequence and source B of another, so labels are sample indices, not row indices);
    ``domain_index``: the site of each sample (indexed by ``source``). Content label = the sample whose content a
    view shows ``[A, B, A, B]``; style label = the site (``"domain"``) or the sample (``"sample"``) whose style it
    shows ``[A, B, B, A]``.
    """
    k = source.shape[0] // 2
    p = k if pairs is None else int(pairs)
    a, b = source[:p], source[k: k + p]
    style_src = torch.cat([a, b, b, a])
    style = domain_index[style_src] if style_labels == "domain" else style_src
    return torch.cat([a, b, a, b]), style


def siqc_loss(view_content: torch.Tensor, view_style: torch.Tensor, key_content: torch.Tensor,
              key_style: torch.Tensor, domain_index: torch.Tensor,
              temperature: torch.Tensor | tuple[float, float] | float = 0.07,
              pairs: int | None = None, *, source: torch.Tensor | None = None, keys: str = "unmixed",
              style_labels: str = "domain") -> dict[str, torch.Tensor]:
    """SiQC on pooled features (of the first ``pairs`` pairs' views, default all; see ``siqc_labels``).

    Args:
        view_content, view_style: ``(4P, D)``, ``(4P, Ds)`` student pooled factors of the views
            ``[x_hat_A, x_hat_B, x_hat_A<-sB, x_hat_B<-sA]`` of the first ``P = pairs`` pairs (each block P rows;
            ``P = K`` by default).
        key_content, key_style: ``(2K, D)``, ``(2K, Ds)`` teacher pooled factors of the inputs [A; B].
        domain_index: ``(2K,)``.
        temperature: scalar or ``(content, style)`` (``MeDUET.temperature()``).
        pairs: ``P`` (default all ``K``).
        source: ``(2K,)`` sample index of each source row (default ``arange(2K)``: one-way pairing); keys of
            ``keys="unmixed"`` are indexed by sample.
        keys: ``"unmixed"`` (one key per sample, ``(S, F)`` for ``S`` samples) or ``"swapped"`` (the public
            code: ``(4P, F)`` keys in the queries' four-view layout; key ``i`` is excluded for query ``i``).
        style_labels: ``"domain"`` or ``"sample"`` (``siqc_view_labels``).

    Returns ``siqc`` (content + style), ``siqc_content``, ``siqc_style``.
    """
    if isinstance(temperature, (int, float)):
        tau_c = tau_s = float(temperature)
    else:
        tau_c, tau_s = temperature[0], temperature[1]
    if source is None and keys == "unmixed" and style_labels == "domain":
        cq, ck, sq, sk = siqc_labels(domain_index, pairs)  # this project's default form
    else:
        if source is None:
            source = torch.arange(domain_index.shape[0], device=domain_index.device)
        cq, sq = siqc_view_labels(source, domain_index, pairs, style_labels)
        if keys == "swapped":
            ck, sk = cq, sq
        else:
            ck = torch.arange(key_content.shape[0], device=cq.device)
            sk = domain_index[ck] if style_labels == "domain" else ck
    self_out = keys == "swapped"
    lc = supcon_loss(view_content, key_content, cq, ck, tau_c, exclude_self=self_out)
    ls = supcon_loss(view_style, key_style, sq, sk, tau_s, exclude_self=self_out)
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
    return 0.5 * (masked_token_mean(d[:k], visible[:k]) + masked_token_mean(d[k:], visible[k:]))
