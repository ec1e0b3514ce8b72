"""The configs of MeDUET's step losses (``meduet.losses.meduet_step``): what a bundle's ``loss`` section may set, with
the paper's weights as defaults and every option that is not in the paper named as such."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from meduet.errors import MeduetConfigError

__all__ = ["MeDUETLossConfig", "MAELossConfig"]


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
        mftd_reduction: how MFTD combines its two sources: ``"mean"`` (this project's default: the mean of the two
            per-source distances) or ``"sum"`` (the public code's ``loss_c1 + loss_c2``, ``loss_s1 + loss_s2``).

    Where the paper's text is silent, the public MeDUET code (JK-Liu7/MeDUET, ``pretrain/``) decides for the
    ``paper`` preset; these options name each form (default = this project's, second = the public code's):

        pairing: ``"one_way"`` (a batch of ``2K`` gives ``K`` mixed sequences: sample ``k`` with ``k + K``) or
            ``"both_ways"`` (the public code mixes ``x`` with ``x.flip(0)``: every pair is mixed both ways, each
            way with its own independent mask, so ``2K`` samples give ``2K`` mixed sequences; here sequence ``j``
            has source A = sample ``j`` and source B = sample ``(j + K) mod 2K``). Every term then runs on the
            ``2K`` sequences (twice the student work of ``one_way`` at the same batch).
        siqc_keys: ``"unmixed"`` (one teacher pass over the unmixed samples, shared with MFTD: keys = their pooled
            factors, ``2K`` keys) or ``"swapped"`` (the public code: the teacher mixes each pair with the
            *complementary* mask, demixes, decodes the style-swapped streams and re-encodes them: keys in the
            same four-view layout as the queries, each query compared with every key but its own counterpart).
            Needs a teacher of the whole student (``EMATeacher(scope="student")``) for the decoder.
        siqc_queries: ``"reencoded"`` (the four re-encoded views ``[x_hat_A, x_hat_B, x_hat_A<-sB, x_hat_B<-sA]``)
            or ``"mixed"`` (the public code: the first two views are the sources' factors from the mixed forward,
            the swapped two are re-encoded).
        siqc_pool: ``"factor"`` (the model's pooled factors: mean content, ``pool_style`` style) or
            ``"layer_norm_mean"`` (the public code's ``token_pool``: layer norm without affine per token, then
            the mean over the view's tokens).
        siqc_style_labels: ``"domain"`` (style positives = every view with the same site's style) or
            ``"sample"`` (the public code: the same sample's style).
        style_swap: ``"pooled"`` (a swapped stream gets the other source's pooled style vector on every token;
            any ``mix_ratio``) or ``"tokens"`` (the public code: the other source's style *tokens*, paired by
            rank: A's ``r``-th own position gets B's ``r``-th style token; needs equal shares, ``mix_ratio`` 0.5).
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
    mftd_reduction: str = "mean"
    pairing: str = "one_way"
    siqc_keys: str = "unmixed"
    siqc_queries: str = "reencoded"
    siqc_pool: str = "factor"
    siqc_style_labels: str = "domain"
    style_swap: str = "pooled"

    #: the values of the public code's forms (``paper`` preset), by option
    PAPER_CODE_FORMS = {"pairing": "both_ways", "mftd_distance": "mse", "mftd_content_weight": 0.5,
                        "mftd_reduction": "sum", "siqc_keys": "swapped", "siqc_queries": "mixed",
                        "siqc_pool": "layer_norm_mean", "siqc_style_labels": "sample", "style_swap": "tokens"}

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
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise MeduetConfigError(f"loss#{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.style_swap == "tokens" and self.mix_ratio != 0.5:
            raise MeduetConfigError(f"loss#style_swap 'tokens' pairs the two sources' tokens by rank and needs "
                                    f"loss#mix_ratio 0.5, got {self.mix_ratio}; use style_swap 'pooled' for other "
                                    "ratios")


#: the allowed values of the string options of ``MeDUETLossConfig`` (first = default)
CHOICES = {"mftd_reduction": ("mean", "sum"), "pairing": ("one_way", "both_ways"),
           "siqc_keys": ("unmixed", "swapped"), "siqc_queries": ("reencoded", "mixed"),
           "siqc_pool": ("factor", "layer_norm_mean"), "siqc_style_labels": ("domain", "sample"),
           "style_swap": ("pooled", "tokens")}


@dataclasses.dataclass
class MAELossConfig(_FromMapping):
    """Masked-autoencoder baseline: ``mask_ratio`` (None = the model's), ``norm_target``."""

    mask_ratio: float | None = None
    norm_target: bool = False
