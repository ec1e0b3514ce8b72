"""The masked-autoencoder baseline with MeDUET's backbone (no mixing, no factors), for like-with-like comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from meduet.networks.latent_vit import LatentDecoder, LatentViT, tokens_to_map
from meduet.networks.masks import sample_visible_mask
from meduet.networks.meduet import NON_WEIGHT_ARGS, preset_args
from meduet.records import RecordMixin, register

__all__ = ["MaskedAutoencoder", "build_mae"]


@register
class MaskedAutoencoder(RecordMixin, nn.Module):
    """Masked-autoencoder baseline with MeDUET's backbone (no mixing, no factors).

    ``forward(x (B, C, S1, S2, S3), visible=None)``: a random ``visible (B, N)`` mask keeps exactly
    ``N - round(mask_ratio * N)`` tokens per sample; the encoder runs on the visible tokens only (MAE-style),
    its outputs are put back on the grid and the decoder fills the rest with the mask token and predicts every
    patch. Returns ``{"pred": (B, N, C p^3), "visible": (B, N)}``; the loss (MSE on hidden patches) is
    ``meduet.losses.meduet_step.mae_step_losses``.

    ``encode(x)`` has the same keys as ``FactorEncoder.encode`` with ``content_tokens = tokens``,
    ``content`` = mean token, ``content_map`` = the token map, and ``style_tokens = style = None`` (the
    baseline has no style factor).
    """

    kind = "mae"
    non_weight_args = NON_WEIGHT_ARGS

    def __init__(self, in_channels: int = 4, input_size: int | Sequence[int] = 24, patch_size: int = 4,
                 dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 dec_dim: int = 384, dec_depth: int = 8, dec_heads: int | None = None, mask_ratio: float = 0.5,
                 qkv_bias: bool = True, dropout_rate: float = 0.0) -> None:
        super().__init__()
        if dec_heads is None:
            dec_heads = num_heads if dec_dim % num_heads == 0 else 1
        self.arch = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size, dim=dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dec_dim=dec_dim,
                         dec_depth=dec_depth, dec_heads=dec_heads, mask_ratio=mask_ratio, qkv_bias=qkv_bias,
                         dropout_rate=dropout_rate)
        self.meta: dict[str, Any] = {}
        self.in_channels, self.patch_size, self.dim, self.mask_ratio = in_channels, patch_size, dim, mask_ratio
        self.encoder = LatentViT(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio, qkv_bias,
                                 dropout_rate)
        self.decoder = LatentDecoder(dim, in_channels, input_size, patch_size, dec_dim, dec_depth, dec_heads,
                                     mlp_ratio, qkv_bias, dropout_rate)

    def ema_source(self) -> nn.Module:
        return self

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens, grid = self.encoder.embed(x)
        tokens = self.encoder.forward_tokens(tokens)
        return {
            "tokens": tokens,
            "content_tokens": tokens,
            "style_tokens": None,
            "content": tokens.mean(dim=1),
            "style": None,
            "content_map": tokens_to_map(tokens, grid),
        }

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None, *, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        tokens, grid = self.encoder.embed(x)
        b, n, d = tokens.shape
        if visible is None:
            visible = sample_visible_mask(b, n, self.mask_ratio if mask_ratio is None else mask_ratio, x.device,
                                          generator)
        counts = visible.sum(dim=1)
        if visible.shape != (b, n) or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError("visible must be (B, N) bool with the same positive number of visible tokens per row")
        # indices of the visible tokens, ascending, same count per row
        ids = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
        idx = ids.unsqueeze(-1).expand(-1, -1, d)
        z = self.encoder.forward_tokens(torch.gather(tokens, 1, idx))
        full = torch.zeros_like(tokens).scatter(1, idx, z)
        return {"pred": self.decoder(full, visible, grid), "visible": visible}


def build_mae(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> MaskedAutoencoder:
    """``MaskedAutoencoder`` with the backbone of a MeDUET preset (MeDUET-only keys are dropped)."""
    kw = preset_args(preset, overrides)
    for key in ("style_dim", "num_domains", "domain_hidden", "siqc_temperature", "learn_temperature",
                "smooth_kernel", "style_pool"):
        kw.pop(key, None)
    return MaskedAutoencoder(**kw)
