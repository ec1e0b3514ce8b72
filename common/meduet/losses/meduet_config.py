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
