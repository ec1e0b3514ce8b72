"""The deployable part of a meduet_pretrain checkpoint: the latent ViT with (for MeDUET) its factor heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from meduet.networks.factors import FactorEncoder, style_vector_width
from meduet.networks.latent_vit import LatentViT, tokens_to_map
from meduet.networks.meduet import NON_WEIGHT_ARGS, preset_args
from meduet.records import RecordMixin, register

__all__ = ["PretrainedEncoder", "build_encoder", "objective_of", "ENCODER_KEYS", "ENCODER_KINDS", "PRETRAIN_KINDS"]

#: The kinds of meduet_pretrain's deployable encoder (its ``models/model.pt``), by objective.
ENCODER_KINDS = ("meduet_encoder", "mae_encoder")
#: The kinds of file a meduet_pretrain stage gives: the encoder (``model.pt``) or the whole training network
#: (``training_network.pt``: MeDUET or the masked-autoencoder baseline).
PRETRAIN_KINDS = ("meduet", "mae", *ENCODER_KINDS)


def objective_of(kind: str) -> str:
    """The pretraining objective (``"meduet"`` or ``"mae"``) of a meduet_pretrain record kind."""
    return kind[: -len("_encoder")] if kind.endswith("_encoder") else kind


@register
class PretrainedEncoder(RecordMixin, nn.Module):
    """The deployable part of a meduet_pretrain checkpoint: the latent ViT with (for MeDUET) its content/style
    factor heads, without decoder, recombination or domain heads.

    It is what meduet_pretrain's ``models/model.pt`` holds (kind ``meduet_encoder`` / ``mae_encoder``; the whole
    training network goes to ``models/training_network.pt``). Its parameter names are those of the training
    network (``backbone.*`` for MeDUET, ``encoder.*`` for the masked-autoencoder baseline), so it can also be
    filled by name from a training-network file (``meduet.records.load_part``).

    ``forward(x (B, C, S1, S2, S3))`` -> factor map ``(B, D + Ds, g1, g2, g3)``: content channels first, then the
    (smoothed) style channels; for the baseline ``(B, D, g1, g2, g3)`` token features. ``encode(x)`` returns the
    dict of ``FactorEncoder.encode``. Inputs are *scaled* latents (cached latent x ``latent_scale_factor``) with
    every spatial size divisible by ``patch_size``.
    """

    kind = "meduet_encoder"  # per instance: "meduet_encoder" or "mae_encoder"
    kinds = ENCODER_KINDS  # the kinds meduet.records.load builds with this class
    non_weight_args = NON_WEIGHT_ARGS
    optional_weights = (".eraser.",)  # files written before the site eraser existed load it as the identity
    accepts = PRETRAIN_KINDS  # the kinds of file it takes its weights from (meduet.records.load_part)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **runtime: Any) -> PretrainedEncoder:
        """The encoder of a meduet_pretrain record: its own, or the encoder part of a training network's (decoder
        and domain-head arguments dropped)."""
        objective = objective_of(str(record["kind"]))
        arch = {k: v for k, v in record["architecture"].items() if k in ENCODER_KEYS}
        if objective != "meduet":
            arch = {k: v for k, v in arch.items() if k not in STYLE_KEYS}
        return cls(objective, **arch)

    def __init__(self, objective: str = "meduet", in_channels: int = 4, input_size: int | Sequence[int] = 24,
                 patch_size: int = 4, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 style_dim: int | None = None, smooth_kernel: int = 3, qkv_bias: bool = True,
                 dropout_rate: float = 0.0, style_pool: str = "mean") -> None:
        super().__init__()
        if objective not in ("meduet", "mae"):
            raise ValueError(f"objective must be 'meduet' or 'mae', got {objective!r}")
        self.objective = objective
        self.kind = f"{objective}_encoder"
        self.accepts = (objective,)  # this instance takes records of its own training network only
        self.patch_size, self.in_channels, self.dim = patch_size, in_channels, dim
        self.arch = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size, dim=dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         dropout_rate=dropout_rate)
        self.meta: dict[str, Any] = {}
        if objective == "meduet":
            self.arch.update(style_dim=style_dim or dim // 4, smooth_kernel=smooth_kernel, style_pool=style_pool)
            self.backbone = FactorEncoder(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio,
                                          style_dim, smooth_kernel, qkv_bias, dropout_rate, style_pool)
            self.style_dim = self.backbone.style_dim
            self.style_pool = style_pool
        else:
            self.encoder = LatentViT(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio,
                                     qkv_bias, dropout_rate)
            self.style_dim = 0
            self.style_pool = "mean"

    @property
    def out_channels(self) -> int:
        return self.dim + self.style_dim

    @property
    def style_vector_dim(self) -> int:
        """Width of a case's pooled style vector (0 for the baseline)."""
        return style_vector_width(self.style_dim, self.style_pool)

    @property
    def vit(self) -> LatentViT:
        """The latent ViT (``backbone.encoder`` for MeDUET, ``encoder`` for the baseline)."""
        return self.backbone.encoder if self.objective == "meduet" else self.encoder

    def encode(self, x: torch.Tensor, erase: bool = True) -> dict[str, torch.Tensor | None]:
        """``FactorEncoder.encode`` (``erase=False``: content before a fitted site eraser, the raw MeDUET content)."""
        if self.objective == "meduet":
            return self.backbone.encode(x, erase=erase)
        tokens, grid = self.encoder.embed(x)
        tokens = self.encoder.forward_tokens(tokens)
        return {"tokens": tokens, "content_tokens": tokens, "style_tokens": None, "content": tokens.mean(dim=1),
                "style": None, "content_map": tokens_to_map(tokens, grid)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encode(x)
        if out["style_tokens"] is None:
            return out["content_map"]
        grid = out["content_map"].shape[2:]
        return torch.cat([out["content_map"], tokens_to_map(out["style_tokens"], grid)], dim=1)


ENCODER_KEYS = ("in_channels", "input_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio", "style_dim",
                 "smooth_kernel", "qkv_bias", "dropout_rate", "style_pool")
STYLE_KEYS = ("style_dim", "smooth_kernel", "style_pool")  # MeDUET-only encoder arguments


def build_encoder(preset: str | Mapping[str, Any] | None = "tiny", objective: str = "meduet",
                  **overrides: Any) -> PretrainedEncoder:
    """``PretrainedEncoder`` with the backbone of a MeDUET preset (decoder/domain keys are dropped)."""
    kw = {k: v for k, v in preset_args(preset, overrides).items() if k in ENCODER_KEYS}
    if objective != "meduet":
        kw = {k: v for k, v in kw.items() if k not in STYLE_KEYS}
    return PretrainedEncoder(objective, **kw)
