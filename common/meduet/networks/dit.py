"""Latent diffusion transformer (DiT / SiT network) over VAE latents, conditioned on nothing, on metadata or on
MeDUET's content/style factors.

The network is the same for both objectives of ``meduet_diffusion``; what it predicts (DDPM noise or rectified-flow
velocity) is decided by ``meduet.losses.diffusion.DiffusionObjective`` and sampling lives in
``meduet.engines.sampling``. Shapes (``p`` patch size, ``g = (S1/p, S2/p, S3/p)`` token grid, ``N = g1 g2 g3``):

* ``x (B, C, S1, S2, S3)``: noisy scaled latents; ``t (B,)``: timesteps in ``[0, num_train_timesteps]`` (integers
  for DDPM, integers or floats for MONAI's ``RFlowScheduler``), a Python number or a 0-d tensor is broadcast;
* tokens ``(B, N, dim)`` = ``Conv3d`` patch embedding (kernel = stride = ``p``) + fixed 3D sin-cos positions
  (``meduet.networks.latent_vit.sincos_position_embedding_3d``, computed for whatever grid comes in);
* conditioning vector ``c (B, dim)`` = timestep embedding + condition embedding; every block and the final layer
  are modulated by ``c`` through adaLN-Zero (shift, scale and a residual gate per branch, all produced by a
  zero-initialised linear, so every block starts as the identity and the network outputs zeros at init);
* output ``(B, C, S1, S2, S3)`` (the final linear predicts ``C p^3`` values per token, ``unpatchify``-ed).

Conditions (``condition=``):

* ``"none"``: unconditional; ``cond`` is ignored.
* ``"metadata"``: ``cond["domain"] (B,)`` long site index in ``[0, num_domains)`` through an embedding table with one
  extra row (index ``num_domains``) that is the *null* condition, plus optionally ``cond["metadata"] (B, k)`` float
  scalars (``k = num_metadata_scalars``: voxel spacing, a one-hot body part, ...) through a bias-free linear, zeroed
  for dropped samples.
* ``"factors"``: ``cond["content"] (B, Dc)`` and ``cond["style"] (B, Ds)`` (pooled MeDUET factors of the clean
  latent; ``style_dim=0`` for content only, e.g. the masked-autoencoder baseline) through an MLP; a learned null
  vector replaces it for dropped samples. With ``content_map=True`` also ``cond["content_map"] (B, Dc, h1, h2, h3)``
  (the content token map of the frozen encoder), trilinearly resampled to ``g`` when ``h != g``, projected per
  token by a zero-initialised linear and added to the tokens (nothing is added for dropped samples).

Classifier-free guidance: in training each sample's condition is dropped with probability ``cond_dropout``
(``force_drop (B,)`` bool overrides the draw); ``forward(x, t, cond=None)`` on a conditional network is the
unconditional (null) prediction; ``forward_with_cfg`` runs conditional and unconditional rows in one batch.

Design choices (not fixed by the DiT paper):

* Timestep frequencies are those of DiT for ``t`` in ``[0, 1000]``; ``t`` is rescaled by
  ``1000 / num_train_timesteps`` first, so DDPM's ``0..T-1`` and MONAI RFlow's ``[0, T]`` (float or int) land on
  the same embedding range.
* The attention/MLP layout (``attn.qkv``, ``attn.out_proj``, ``mlp.linear1``, ``mlp.linear2``, exact GELU,
  LayerNorm eps 1e-5) is MONAI ``TransformerBlock``'s, so ``init_from_pretrained`` copies the pretrained latent
  ViT's blocks tensor by tensor, and puts the ViT's LayerNorm affine into the adaLN biases (see there).
* Attention is ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.networks.latent_vit import (
    LatentViT,
    sincos_position_embedding_3d,
    to_3tuple,
    token_grid,
    unpatchify,
)
from meduet.networks.meduet import _arch_diff, _CheckpointRecord, _jsonable
from meduet.networks.vae import decode_record

__all__ = [
    "DIT_PRESETS",
    "CONDITIONS",
    "DIFFUSION_FIX",
    "timestep_embedding",
    "modulate",
    "check_record",
    "TimestepEmbedder",
    "MetadataEmbedder",
    "FactorEmbedder",
    "ContentMapEmbedder",
    "Attention",
    "Mlp",
    "DiTBlock",
    "FinalLayer",
    "LatentDiT",
    "build_dit",
    "load_dit",
]

#: Network sizes. ``tiny``: tests (seconds on CPU, 4x8^3 latents, 64 tokens); ``demo``: the demo chain on 2 CPU
#: cores (4x16^3 latents, 512 tokens); ``paper``: DiT-B/2 on MAISI's 4x24^3 latents (1728 tokens).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(in_channels=4, input_size=8, patch_size=2, dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
    "demo": dict(in_channels=4, input_size=16, patch_size=2, dim=128, depth=4, num_heads=4, mlp_ratio=4.0),
    "paper": dict(in_channels=4, input_size=24, patch_size=2, dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
}

#: Accepted values of ``condition``.
CONDITIONS = ("none", "metadata", "factors")

#: Constructor arguments that do not change which weights the network has (ignored when a checkpoint's
#: architecture is compared with a network's).
_NON_WEIGHT_ARGS = ("input_size", "cond_dropout")

DIFFUSION_FIX = ("train meduet_diffusion first (python -m monai.bundle run training --config_file "
                 "\"['bundles/meduet_diffusion/configs/train.yaml','bundles/meduet_diffusion/configs/presets/demo.yaml']\") "
                 "or download the bundle")


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


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------
class LatentDiT(_CheckpointRecord, nn.Module):
    """3D diffusion transformer over VAE latents (DiT with adaLN-Zero), see the module docstring for shapes.

    Args:
        in_channels: latent channels ``C`` (4 for MAISI); the output has the same channels.
        input_size: default latent crop size (sets the cached position buffer only; any size divisible by
            ``patch_size`` works).
        patch_size: latent patch side ``p``.
        dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio (DiT-B: 768, 12, 12, 4).
        condition: ``"none"``, ``"metadata"`` or ``"factors"``.
        num_domains: metadata: number of sites (``cond["domain"]`` in ``[0, num_domains)``).
        num_metadata_scalars: metadata: width ``k`` of ``cond["metadata"] (B, k)`` (0 = site only).
        content_dim, style_dim: factors: widths of the pooled content/style vectors (``Dc``, ``Ds``; ``Ds=0`` for
            content only).
        content_map: factors: also add the content token map ``cond["content_map"] (B, Dc, h1, h2, h3)``.
        cond_dropout: probability of dropping a sample's condition in training (classifier-free guidance).
        qkv_bias: bias of the qkv projection.
        num_train_timesteps: range of ``t`` (``T``; 1000 for MONAI's DDPM/RFlow schedulers).
        freq_dim: width of the sinusoidal timestep features.

    ``arch`` holds these arguments and ``meta`` (empty; the trainer fills in the latent facts, objective and
    scheduler) — both travel in the state dict's ``_extra_state``, so ``load_dit(path)`` rebuilds the network.
    """

    kind = "dit"

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int | Sequence[int] = 24,
        patch_size: int = 2,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        condition: str = "none",
        num_domains: int = 0,
        num_metadata_scalars: int = 0,
        content_dim: int = 0,
        style_dim: int = 0,
        content_map: bool = False,
        cond_dropout: float = 0.1,
        qkv_bias: bool = True,
        num_train_timesteps: int = 1000,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        _check_args(condition, num_domains, num_metadata_scalars, content_dim, style_dim, content_map, cond_dropout,
                    dim, num_heads)
        self.arch = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size, dim=dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, condition=condition, num_domains=num_domains,
                         num_metadata_scalars=num_metadata_scalars, content_dim=content_dim, style_dim=style_dim,
                         content_map=content_map, cond_dropout=cond_dropout, qkv_bias=qkv_bias,
                         num_train_timesteps=num_train_timesteps, freq_dim=freq_dim)
        self.meta: dict[str, Any] = {}
        self.in_channels, self.patch_size, self.dim, self.depth = in_channels, patch_size, dim, depth
        self.condition, self.cond_dropout = condition, float(cond_dropout)
        self.num_domains, self.num_metadata_scalars = num_domains, num_metadata_scalars
        self.content_dim, self.style_dim, self.use_content_map = content_dim, style_dim, content_map
        self.grid = token_grid(to_3tuple(input_size), patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding_3d(self.grid, dim)[None], persistent=False)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(dim, freq_dim, num_train_timesteps)
        self.y_embedder: nn.Module | None = None
        self.content_map_embedder: ContentMapEmbedder | None = None
        if condition == "metadata":
            self.y_embedder = MetadataEmbedder(num_domains, num_metadata_scalars, dim)
        elif condition == "factors":
            self.y_embedder = FactorEmbedder(content_dim, style_dim, dim)
            if content_map:
                self.content_map_embedder = ContentMapEmbedder(content_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, in_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """The one initialisation routine: xavier-uniform linears (zero bias), the patch convolution as a linear,
        N(0, 0.02) timestep MLP and condition tables / null vectors, and zeros for every adaLN modulation, the
        final linear and the content-map projection (so the network outputs zeros and every block is the identity
        at init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if isinstance(self.y_embedder, MetadataEmbedder):
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        elif isinstance(self.y_embedder, FactorEmbedder):
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)
        zero = [blk.adaLN_modulation[-1] for blk in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.content_map_embedder is not None:
            zero.append(self.content_map_embedder.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ record
    def set_extra_state(self, state: Any) -> None:
        check_record(self, state, _NON_WEIGHT_ARGS, "meduet.networks.dit.load_dit")

    # ------------------------------------------------------------------ helpers
    def positions(self, grid: Sequence[int]) -> torch.Tensor:
        """Fixed sin-cos positions ``(1, N, dim)`` of a token grid (buffer for the default grid, cached otherwise)."""
        grid = to_3tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        key = (grid, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_position_embedding_3d(grid, self.dim)[None].to(
                device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        return self._pos_cache[key]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``x (B, C, S1, S2, S3) -> tokens (B, N, dim)`` with positions, and the token grid."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise MeduetConfigError(f"DiT input must be latents (B, {self.in_channels}, S1, S2, S3), got "
                                    f"{tuple(x.shape)}; check the latent channels of the VAE")
        try:
            grid = token_grid(x.shape[2:], self.patch_size)
        except ValueError as e:
            raise MeduetConfigError(f"DiT: {e}; choose a latent crop size divisible by the patch size") from None
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.positions(grid).to(tokens.dtype), grid

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """Keys ``forward`` reads from ``cond`` for this network's condition."""
        if self.condition == "metadata":
            return ("domain",) + (("metadata",) if self.num_metadata_scalars else ())
        if self.condition == "factors":
            keys = (("content",) if self.content_dim else ()) + (("style",) if self.style_dim else ())
            return keys + (("content_map",) if self.use_content_map else ())
        return ()

    def drop_mask(self, batch: int, cond: Mapping[str, torch.Tensor] | None,
                  force_drop: torch.Tensor | bool | None, device: torch.device) -> torch.Tensor:
        """Which samples get the null condition, ``(B,)`` bool: ``force_drop`` if given, all when ``cond`` is None,
        else a Bernoulli(``cond_dropout``) draw in training mode and none in eval mode."""
        if force_drop is not None:
            if isinstance(force_drop, bool):
                drop = torch.full((batch,), force_drop, dtype=torch.bool, device=device)
            else:
                drop = torch.as_tensor(force_drop, device=device).reshape(-1).bool()
                if drop.numel() != batch:
                    raise MeduetConfigError(f"force_drop must be a bool or (B,) = ({batch},) booleans, got "
                                            f"{tuple(torch.as_tensor(force_drop).shape)}")
            if cond is None and not bool(drop.all()):
                raise MeduetConfigError(f"condition '{self.condition}' needs cond with keys {list(self.cond_keys)} "
                                        "for samples that are not dropped (cond=None means unconditional)")
            return drop
        if cond is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        if self.training and self.cond_dropout > 0:
            return torch.rand(batch, device=device) < self.cond_dropout
        return torch.zeros(batch, dtype=torch.bool, device=device)

    def _cond_tensor(self, cond: Mapping[str, torch.Tensor], key: str, batch: int, shape: tuple) -> torch.Tensor:
        if key not in cond or cond[key] is None:
            raise MeduetConfigError(f"condition '{self.condition}' needs cond keys {list(self.cond_keys)}; '{key}' is "
                                    f"missing (got {sorted(cond)})")
        v = torch.as_tensor(cond[key])
        want = (batch, *shape)
        if key == "domain" and v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        ok = (v.ndim == 5 and tuple(v.shape[:2]) == want) if key == "content_map" else tuple(v.shape) == want
        if not ok:
            if key == "content_map":
                want = (*want, "h1", "h2", "h3")
            raise MeduetConfigError(f"cond['{key}'] must have shape {want} for this DiT, got {tuple(v.shape)}")
        return v

    def embed_condition(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None,
                        drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``c (B, dim)`` = timestep embedding + condition embedding (null where ``drop``), and the validated
        content map ``(B, Dc, h1, h2, h3)`` (None unless ``content_map``; ``forward`` resamples and adds it)."""
        b = t.shape[0]
        c = self.t_embedder(t)
        cmap = None
        if self.condition == "none":
            return c, None
        if cond is None:  # everything dropped (checked by drop_mask)
            return c + self.y_embedder.null(b).to(c.dtype), None  # type: ignore[union-attr]
        if self.condition == "metadata":
            domain = self._cond_tensor(cond, "domain", b, ())
            if domain.is_floating_point() or domain.dtype == torch.bool:
                raise MeduetConfigError(f"cond['domain'] must hold integer site indices, got {domain.dtype}")
            domain = domain.to(device=t.device, dtype=torch.long)
            bad = (domain < 0) | (domain >= self.num_domains)
            if bool(bad.any()):
                raise MeduetConfigError(
                    f"cond['domain'] has site index {int(domain[bad][0])} but this DiT knows num_domains="
                    f"{self.num_domains} sites (0..{self.num_domains - 1}); set num_domains to the datalist's "
                    "number of 'domains'")
            scalars = None
            if self.num_metadata_scalars:
                scalars = self._cond_tensor(cond, "metadata", b, (self.num_metadata_scalars,)).to(t.device)
            y = self.y_embedder(domain, scalars, drop)  # type: ignore[misc]
        else:
            content = (self._cond_tensor(cond, "content", b, (self.content_dim,)).to(t.device)
                       if self.content_dim else None)
            style = self._cond_tensor(cond, "style", b, (self.style_dim,)).to(t.device) if self.style_dim else None
            y = self.y_embedder(content, style, drop)  # type: ignore[misc]
            if self.use_content_map:
                cmap = self._cond_tensor(cond, "content_map", b, (self.content_dim,)).to(t.device)
        return c + y.to(c.dtype), cmap

    @staticmethod
    def _timesteps(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        t = t.reshape(-1)
        if t.numel() != batch:
            raise MeduetConfigError(f"timesteps must be a number or a (B,) = ({batch},) tensor, got {t.numel()} values")
        return t

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int,
                cond: Mapping[str, torch.Tensor] | None = None,
                force_drop: torch.Tensor | bool | None = None) -> torch.Tensor:
        """Prediction ``(B, C, S1, S2, S3)`` (noise for DDPM, velocity for RFlow) for noisy latents ``x`` at
        timesteps ``t (B,)``.

        Args:
            x: ``(B, C, S1, S2, S3)`` with every ``S`` divisible by ``patch_size``.
            t: ``(B,)`` int or float timesteps in ``[0, num_train_timesteps]`` (or one number for all).
            cond: dict with the keys of ``cond_keys`` (extra keys are ignored); None = unconditional (null). A whole
                batch with ``cond=None`` leaves the condition MLP out of the graph (DDP would then need
                ``find_unused_parameters``); dropping via ``cond_dropout``/``force_drop`` keeps every parameter in it.
            force_drop: ``(B,)`` bool (or one bool): True = use the null condition for that sample; None = random
                dropping with ``cond_dropout`` in training mode, none in eval mode.
        """
        b = x.shape[0]
        tokens, grid = self.embed(x)
        t = self._timesteps(t, b, x.device)
        if self.condition == "none":  # cond and force_drop are ignored
            c, cmap = self.t_embedder(t), None
        else:
            drop = self.drop_mask(b, cond, force_drop, x.device)
            c, cmap = self.embed_condition(t, cond, drop)
        if cmap is not None:
            tokens = tokens + self.content_map_embedder(cmap, grid, drop).to(tokens.dtype)  # type: ignore[misc]
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), self.patch_size, grid, self.in_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor | float | int,
                         cond: Mapping[str, torch.Tensor] | None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Classifier-free guided prediction ``uncond + s * (cond - uncond)``, ``(B, C, S1, S2, S3)``.

        The conditional and unconditional rows run as one batch of ``2B``. With ``guidance_scale == 1``, an
        unconditional network (``condition="none"``) or ``cond=None`` this is a single plain pass (conditional,
        nothing dropped, whatever the training mode)."""
        b = x.shape[0]
        if self.condition == "none" or cond is None:
            return self(x, t, cond)
        if float(guidance_scale) == 1.0:
            return self(x, t, cond, force_drop=False)
        t = self._timesteps(t, b, x.device)
        cond2 = {k: _repeat2(v) for k, v in cond.items() if k in self.cond_keys}
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        out = self(torch.cat([x, x]), torch.cat([t, t]), cond2, force_drop=drop)
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    # ------------------------------------------------------------------ pretrained initialisation
    def init_from_pretrained(self, source: Any, gates: str = "open") -> dict[str, Any]:
        """Initialise the DiT from meduet_pretrain's latent ViT; returns a report of what was copied.

        Args:
            source: a ``LatentViT``, a module holding one (``MeDUET``, ``MaskedAutoencoder``, ``PretrainedEncoder``,
                ``FactorEncoder``), a state dict of any of them (keys ``backbone.encoder.*``, ``encoder.*`` or
                bare, ``module.`` prefixes allowed), or a path to meduet_pretrain's ``model.pt``.
            gates: ``"open"`` (default) sets the attention/MLP gates of the copied blocks to 1, so at init the DiT trunk
                computes exactly the pretrained ViT's blocks (with the ViT's LayerNorm affine in the adaLN
                biases); ``"zero"`` keeps adaLN-Zero's zero gates (copied blocks start as identities).

        What is copied, where shapes match: for the first ``min(depth, source depth)`` blocks ``attn.qkv``,
        ``attn.out_proj``, ``mlp.linear1``, ``mlp.linear2`` (weights and biases), and the ViT's ``norm1``/``norm2``
        (gamma, beta) as the adaLN bias (scale = gamma - 1, shift = beta; the modulation weights stay zero so the
        timestep/condition then learn to move them); the ViT's final norm into the final layer's adaLN bias; the
        patch-embedding convolution, trilinearly resampled to this ``patch_size`` (and multiplied by
        ``(p_src / p)^3`` so a smooth input gives the same response) when the patch sizes differ. Positions are not
        copied: both networks use the same fixed sin-cos function, evaluated on the DiT's own token grid. The final
        linear stays zero, so the network still outputs zeros at init. ``dim`` must equal the ViT's width;
        ``num_heads`` should equal the encoder's (a state dict does not record it, so it is not checked: other head
        counts still copy, but split the copied projections differently).
        """
        if gates not in ("open", "zero"):
            raise MeduetConfigError(f"gates must be 'open' or 'zero', got {gates!r}")
        state = _vit_state(source)
        src_dim = state["patch_embed.weight"].shape[0]
        if src_dim != self.dim:
            raise MeduetConfigError(f"init_from_pretrained: the pretrained encoder has width {src_dim} but this DiT "
                                    f"has dim {self.dim}; set the DiT's dim to {src_dim} or switch "
                                    "init_from_pretrained off")
        src_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        copied, skipped = [], []

        def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
            if tuple(dst.shape) == tuple(src.shape):
                dst.copy_(src.to(dst.dtype))
                copied.append(name)
            else:
                skipped.append(f"{name} {tuple(src.shape)}->{tuple(dst.shape)}")

        with torch.no_grad():
            # patch embedding
            w = state["patch_embed.weight"].float()
            p_src = w.shape[-1]
            if p_src != self.patch_size or w.shape[1] != self.in_channels:
                if w.shape[1] != self.in_channels:
                    raise MeduetConfigError(f"init_from_pretrained: the encoder takes {w.shape[1]} latent channels, "
                                            f"the DiT {self.in_channels}; use the same VAE")
                w = F.interpolate(w, size=(self.patch_size,) * 3, mode="trilinear", align_corners=False)
                w = w * (p_src / self.patch_size) ** 3
                patch_note = f"resampled {p_src}^3 -> {self.patch_size}^3"
            else:
                patch_note = "copied"
            put(self.patch_embed.weight, w, "patch_embed.weight")
            put(self.patch_embed.bias, state["patch_embed.bias"], "patch_embed.bias")
            n = min(self.depth, src_depth)
            for i in range(n):
                blk, pre = self.blocks[i], f"blocks.{i}."
                for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.out_proj.weight", "attn.out_proj.bias",
                             "mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"):
                    dst = blk.get_parameter(name) if _has_param(blk, name) else None
                    if pre + name in state and dst is not None:
                        put(dst, state[pre + name], pre + name)
                    elif pre + name in state or dst is not None:
                        skipped.append(pre + name + " (absent on one side)")
                bias = blk.adaLN_modulation[-1].bias
                d = self.dim
                for j, norm in ((0, "norm1"), (3, "norm2")):
                    gamma, beta = state.get(f"{pre}{norm}.weight"), state.get(f"{pre}{norm}.bias")
                    if gamma is not None and beta is not None:
                        bias[j * d:(j + 1) * d].copy_(beta)
                        bias[(j + 1) * d:(j + 2) * d].copy_(gamma - 1)
                        copied.append(f"{pre}{norm} -> adaLN bias")
                    if gates == "open":
                        bias[(j + 2) * d:(j + 3) * d].fill_(1.0)
            if "norm.weight" in state and "norm.bias" in state:
                fb = self.final_layer.adaLN_modulation[-1].bias
                fb[: self.dim].copy_(state["norm.bias"])
                fb[self.dim:].copy_(state["norm.weight"] - 1)
                copied.append("norm -> final_layer adaLN bias")
        return {
            "blocks": n,
            "source_depth": src_depth,
            "depth": self.depth,
            "patch_embed": patch_note,
            "gates": gates,
            "positions": "fixed sin-cos on the DiT's token grid (not copied)",
            "copied": copied,
            "skipped": skipped,
        }


def check_record(net: _CheckpointRecord, state: Any, non_weight: Sequence[str], loader: str) -> None:
    """``set_extra_state`` of the diffusion-stage networks: a checkpoint record of another kind, or of another
    architecture (ignoring ``non_weight`` arguments), is a one-line ``MeduetConfigError``; else ``meta`` is taken
    from the record."""
    record = decode_record(state)
    if not record:
        return
    kind = record.get("kind")
    if kind and kind != net.kind:
        raise MeduetConfigError(f"checkpoint holds a '{kind}' network, not a '{net.kind}'; load the matching file "
                                f"(rebuild from the file with {loader}(path))")
    saved = {k: v for k, v in (record.get("architecture") or {}).items() if k not in non_weight}
    own = {k: v for k, v in _jsonable(net.arch).items() if k not in non_weight}
    diff = _arch_diff(saved, own)
    if diff:
        raise MeduetConfigError(f"checkpoint was trained with another '{net.kind}' architecture {diff} (checkpoint, "
                                f"network); use the same preset and condition, or rebuild the network from the file "
                                f"with {loader}(path)")
    net.meta = {k: v for k, v in record.items() if k not in ("kind", "architecture")}


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _repeat2(v: Any) -> Any:
    return torch.cat([v, v]) if torch.is_tensor(v) else v


def _check_args(condition: str, num_domains: int, num_metadata_scalars: int, content_dim: int, style_dim: int,
                content_map: bool, cond_dropout: float, dim: int, num_heads: int) -> None:
    if condition not in CONDITIONS:
        raise MeduetConfigError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
    if condition == "metadata" and num_domains < 1:
        raise MeduetConfigError("condition 'metadata' needs num_domains >= 1 (the number of sites in the datalist's "
                                "'domains')")
    if num_metadata_scalars < 0 or num_domains < 0 or content_dim < 0 or style_dim < 0:
        raise MeduetConfigError("num_domains, num_metadata_scalars, content_dim and style_dim must be >= 0")
    if condition == "factors" and content_dim + style_dim < 1:
        raise MeduetConfigError("condition 'factors' needs content_dim and/or style_dim > 0 (the pretrained "
                                "encoder's widths, e.g. 768 and 192 for the paper)")
    if content_map and (condition != "factors" or content_dim < 1):
        raise MeduetConfigError("content_map needs condition 'factors' with content_dim > 0")
    if not 0.0 <= cond_dropout < 1.0:
        raise MeduetConfigError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
    if dim % num_heads or dim < 6:
        raise MeduetConfigError(f"dim {dim} must be >= 6 and divisible by num_heads {num_heads}")


def _vit_state(source: Any) -> dict[str, torch.Tensor]:
    """The latent ViT's state dict (keys ``patch_embed.*``, ``blocks.i.*``, ``norm.*``) from a module, a state
    dict or a file."""
    if isinstance(source, (str, Path)):
        from meduet.networks.meduet import PRETRAIN_FIX
        from meduet.networks.vae import _read_state_dict

        source = _read_state_dict(source, "pretraining checkpoint", PRETRAIN_FIX)
    if isinstance(source, nn.Module):
        vit = source
        for attr in ("vit", "encoder"):
            if not isinstance(vit, LatentViT) and isinstance(getattr(vit, attr, None), nn.Module):
                vit = getattr(vit, attr)
        if not isinstance(vit, LatentViT):
            found = [m for m in source.modules() if isinstance(m, LatentViT)]
            if not found:
                raise MeduetConfigError(f"init_from_pretrained: {type(source).__name__} holds no latent ViT; pass "
                                        "meduet_pretrain's network, encoder or model.pt")
            vit = found[0]
        return {k: v.detach() for k, v in vit.state_dict().items() if torch.is_tensor(v) and k != "_extra_state"}
    if not isinstance(source, Mapping):
        raise MeduetConfigError(f"init_from_pretrained: expected a module, a state dict or a path, got "
                                f"{type(source).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}
    for prefix in ("backbone.encoder.", "encoder.", ""):
        if prefix + "patch_embed.weight" in state and prefix + "blocks.0.attn.qkv.weight" in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    raise MeduetConfigError("init_from_pretrained: the state dict has no latent ViT (no '[backbone.]encoder."
                            "patch_embed.weight'); pass meduet_pretrain's model.pt")


# ----------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------
def build_dit(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> LatentDiT:
    """``LatentDiT(**DIT_PRESETS[preset] | overrides)`` (``preset`` may also be a dict or None)."""
    if preset is None:
        kw: dict[str, Any] = {}
    elif isinstance(preset, str):
        if preset not in DIT_PRESETS:
            raise MeduetConfigError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
        kw = dict(DIT_PRESETS[preset])
    else:
        kw = dict(preset)
    kw.update(overrides)
    return LatentDiT(**kw)


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> LatentDiT:
    """Rebuild a trained ``LatentDiT`` from meduet_diffusion's ``model.pt`` alone (architecture and ``meta``
    travel inside as ``_extra_state``). Returned in eval mode."""
    from meduet.networks.vae import _read_state_dict

    state = _read_state_dict(path, "diffusion checkpoint", DIFFUSION_FIX)
    record = decode_record(state.get("_extra_state"))
    if record.get("kind") != LatentDiT.kind or not record.get("architecture"):
        raise MeduetConfigError(f"diffusion checkpoint '{path}' has no latent DiT record (kind "
                                f"{record.get('kind')!r}); {DIFFUSION_FIX}")
    net = LatentDiT(**record["architecture"])
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()

