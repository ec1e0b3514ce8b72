"""The semantic encoder of a latent diffusion autoencoder (LDAE): a clean scaled latent -> one compact code.

``SemanticEncoder(x (B, C, S1, S2, S3)) -> code (B, code_dim)``: a ``LatentViT`` trunk (Conv3d patch embedding,
fixed 3D sin-cos positions, MONAI transformer blocks, LayerNorm; the same layout as meduet_pretrain's encoder, so
its weights can start the trunk) whose tokens ``(B, N, dim)`` are pooled by attention with one learned query
(``torch.nn.functional.scaled_dot_product_attention``, ``num_heads`` heads) and projected by a linear layer to
``code_dim``. The DiT (``meduet.networks.dit``, ``condition="semantic"``) owns one and trains it jointly with the
denoiser through the diffusion loss only, as LDAE's encoder is trained.

Differences from the LDAE paper's encoder (named in the meduet_diffusion docs): LDAE reads the *image* with a 2D
ConvNeXt-small (ImageNet weights) on slices and pools the slice features by attention; here the encoder reads the
*latent* (every capability stays in the shared latent space, no image loading in the diffusion loop, no weights to
download) with a 3D ViT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.networks.latent_vit import LatentViT

__all__ = ["SEMANTIC_PRESETS", "SemanticEncoder", "semantic_encoder_args"]

#: Encoder sizes by the DiT preset they go with (``code_dim``: LDAE's semantic vector has 768 values).
SEMANTIC_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=2, dim=32, depth=1, num_heads=2, code_dim=16),
    "demo": dict(patch_size=4, dim=128, depth=4, num_heads=4, code_dim=128),
    "paper": dict(patch_size=4, dim=768, depth=12, num_heads=12, code_dim=768),
}

_KEYS = ("patch_size", "dim", "depth", "num_heads", "code_dim", "mlp_ratio")


def semantic_encoder_args(preset: str | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
                          ) -> dict[str, Any]:
    """The encoder's arguments: ``SEMANTIC_PRESETS[preset]`` (or a dict; ``demo`` sizes when ``preset`` is not a
    known name) updated by ``overrides``; unknown keys are a one-line error."""
    if isinstance(preset, Mapping):
        args = dict(preset)
    else:
        args = dict(SEMANTIC_PRESETS.get(str(preset), SEMANTIC_PRESETS["demo"]))
    args.update(dict(overrides or {}))
    bad = sorted(set(args) - set(_KEYS))
    if bad:
        raise MeduetConfigError(f"semantic_encoder has unknown keys {bad}; use {list(_KEYS)}")
    return args


class SemanticEncoder(nn.Module):
    """Latent -> semantic code (see the module docstring).

    Args:
        in_channels: latent channels ``C``.
        input_size: default latent crop (position buffer only; any size divisible by ``patch_size`` works).
        patch_size, dim, depth, num_heads, mlp_ratio: the ViT trunk.
        code_dim: width of the code.
    """

    def __init__(self, in_channels: int = 4, input_size: int | tuple = 24, patch_size: int = 4, dim: int = 128,
                 depth: int = 4, num_heads: int = 4, code_dim: int = 128, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if code_dim < 1 or dim % num_heads:
            raise MeduetConfigError(f"semantic encoder: code_dim must be >= 1 and dim {dim} divisible by num_heads "
                                    f"{num_heads}")
        self.trunk = LatentViT(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio)
        self.num_heads, self.code_dim, self.patch_size = num_heads, code_dim, patch_size
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, code_dim)
        nn.init.normal_(self.query, std=0.02)
        nn.init.xavier_uniform_(self.kv.weight)
        nn.init.zeros_(self.kv.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention pooling ``(B, N, dim) -> (B, dim)`` with the learned query."""
        b, n, d = tokens.shape
        h = self.num_heads
        k, v = self.kv(tokens).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.query.to(tokens.dtype).expand(b, -1, -1).view(b, 1, h, d // h).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, S1, S2, S3)`` scaled latents -> ``(B, code_dim)``."""
        try:
            tokens = self.trunk(x)
        except ValueError as e:
            raise MeduetConfigError(f"semantic encoder: {e}") from None
        return self.out(self.pool(tokens))
