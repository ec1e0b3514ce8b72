"""The blocks of the latent DiT (``meduet.networks.dit``): timestep and condition embedders, adaLN-Zero transformer
blocks and the final layer. Shapes: tokens ``(B, N, D)``, conditioning vector ``c (B, D)``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.networks.latent_vit import to_3tuple

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "MetadataEmbedder",
    "FactorEmbedder",
    "ContentMapEmbedder",
    "modulate",
    "Attention",
    "Mlp",
    "DiTBlock",
    "FinalLayer",
]


# ----------------------------------------------------------------------------------------------------------------
# embedders
# ----------------------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)``: ``[cos(t w_k), sin(t w_k)]`` with
    ``w_k = max_period ** (-k / (dim // 2))``; a zero column is appended when ``dim`` is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t (B,)`` in ``[0, num_train_timesteps]`` -> ``(B, dim)``: sinusoid of ``t * 1000 / num_train_timesteps``
    (``freq_dim`` channels) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, 1000.0 / float(num_train_timesteps)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t.float() * self.t_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MetadataEmbedder(nn.Module):
    """Site (and optional scalar metadata) embedding with a null class for classifier-free guidance.

    ``forward(domain (B,) long, scalars (B, k) | None, drop (B,) bool) -> (B, dim)``: row ``domain`` of a
    ``(num_domains + 1, dim)`` table (row ``num_domains`` = null, used where ``drop``) plus ``Linear(k, dim,
    bias=False)(scalars)`` with dropped rows' scalars set to zero (so a dropped sample is exactly the null row).
    """

    def __init__(self, num_domains: int, num_scalars: int, dim: int) -> None:
        super().__init__()
        self.num_domains, self.num_scalars = num_domains, num_scalars
        self.table = nn.Embedding(num_domains + 1, dim)
        self.scalars = nn.Linear(num_scalars, dim, bias=False) if num_scalars else None

    def null(self, batch: int) -> torch.Tensor:
        return self.table.weight[self.num_domains].expand(batch, -1)

    def forward(self, domain: torch.Tensor, scalars: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor:
        y = self.table(torch.where(drop, torch.full_like(domain, self.num_domains), domain))
        if self.scalars is not None and scalars is not None:
            y = y + self.scalars(scalars.to(y.dtype) * (~drop).to(y.dtype).unsqueeze(-1))
        return y


class FactorEmbedder(nn.Module):
    """Pooled MeDUET factors -> ``(B, dim)``: ``MLP([content, style])`` (Linear -> SiLU -> Linear); a learned null
    vector replaces it where ``drop``. ``forward(content (B, Dc) | None, style (B, Ds) | None, drop (B,))``."""

    def __init__(self, content_dim: int, style_dim: int, dim: int) -> None:
        super().__init__()
        self.content_dim, self.style_dim = content_dim, style_dim
        self.mlp = nn.Sequential(nn.Linear(content_dim + style_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null_embedding = nn.Parameter(torch.zeros(1, dim))

    def null(self, batch: int) -> torch.Tensor:
        return self.null_embedding.expand(batch, -1)

    def forward(self, content: torch.Tensor | None, style: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor:
        parts = [v for v in (content, style) if v is not None]
        y = self.mlp(torch.cat(parts, dim=1).to(self.null_embedding.dtype))
        return torch.where(drop.unsqueeze(-1), self.null_embedding.to(y.dtype), y)


class ContentMapEmbedder(nn.Module):
    """Content token map ``(B, Dc, h1, h2, h3)`` -> per-token addition ``(B, N, dim)`` on grid ``g``: trilinear
    resampling when ``h != g`` (``align_corners=False``), then a zero-initialised ``Linear(Dc, dim)``; rows with
    ``drop`` add nothing."""

    def __init__(self, content_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(content_dim, dim)

    def forward(self, content_map: torch.Tensor, grid: Sequence[int], drop: torch.Tensor) -> torch.Tensor:
        grid = to_3tuple(grid)
        m = content_map.to(self.proj.weight.dtype)
        if tuple(m.shape[2:]) != grid:
            m = F.interpolate(m, size=grid, mode="trilinear", align_corners=False)
        out = self.proj(m.flatten(2).transpose(1, 2))
        return out * (~drop).to(out.dtype)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; ``(B, N, D) -> (B, N, D)``.

    Parameter names and the qkv layout (``(3, heads, head_dim)`` along the output features) are those of MONAI's
    ``SABlock``, so pretrained latent-ViT weights copy over unchanged."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise MeduetConfigError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Linear(hidden, dim)`` (names of MONAI's ``MLPBlock``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.fn = nn.GELU()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.fn(self.linear1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``forward(x (B, N, D), c (B, D)) -> (B, N, D)``.

    ``SiLU(c) -> Linear(D, 6D)`` gives (shift, scale, gate) for the attention branch then for the MLP branch;
    ``x += gate * branch(LayerNorm(x) * (1 + scale) + shift)`` with affine-free LayerNorms."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """``(B, N, D), c (B, D) -> (B, N, C p^3)``: adaLN-modulated LayerNorm then ``Linear(D, C p^3)`` (both the
    modulation and the linear are zero-initialised)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_channels * patch_size**3)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
