"""Dual-flow latent denoiser (3D MedDiffusion's BiFlowNet idea, not MeDUET's): a global 3D U-Net over the whole
latent plus a local transformer over latent sub-volumes whose features join the U-Net at matching levels.

A selectable backbone of meduet_diffusion (train.yaml ``backbone: dualflow``) beside the DiT/SiT network
(``meduet.networks.dit.LatentDiT``): the same ``forward(x, t, cond)``, ``forward_with_cfg``, conditions (none,
metadata, factors), condition dropout and records, so the objectives, trainers and samplers run unchanged. Shapes
(``L`` U-Net levels, ``p`` latent patch side, ``v`` sub-volume side, ``m = lcm(v, 2^(L-1))``):

* ``x (B, C, S1, S2, S3)``: noisy scaled latents, any size: padded by edge replication to multiples of ``m``
  (``S'``) and the output cropped back, so odd whole-latent sizes (e.g. 14 x 10 x 15) work; training crops that
  are multiples of ``m`` are not padded. ``t (B,)`` as for ``LatentDiT``.
* conditioning vector ``emb (B, E)``, ``E = 4 channels[0]``: the U-Net's own timestep MLP (``time_embed``) on the
  sinusoid of ``t * 1000 / num_train_timesteps`` (``channels[0]`` wide) plus the condition embedding (the DiT's
  ``MetadataEmbedder`` / ``FactorEmbedder`` at width ``E``, null row / vector for dropped samples). The U-Net's
  residual blocks take ``emb`` as MONAI's take their timestep embedding.
* global flow: MONAI ``DiffusionModelUNet`` (``spatial_dims=3``, no cross-attention, no class embedding), held as
  ``self.unet``. Its ``forward`` has no hook for features at every level, so ``LatentDualFlow`` runs the U-Net's
  public blocks itself in MONAI's order (``conv_in``, ``down_blocks``, ``middle_block``, ``up_blocks``, ``out``,
  the same skip bookkeeping) and adds the local features to the hidden state ``(B, channels[l], S'/2^l)`` at the
  entrance of every encoder level ``l`` (after ``conv_in`` for level 0, after the previous level's downsampler
  otherwise; the skip saved for that state carries the addition) and of every decoder level (before the up block
  of level ``l``; the middle block's output for the deepest one).
* local flow (``LocalFlow``): ``Conv3d`` patch embedding (kernel = stride = ``p``) -> tokens grouped by sub-volume,
  ``(B n, (v/p)^3, D)`` with ``n`` sub-volumes and fixed sin-cos positions *inside* a sub-volume, ``local_depth``
  adaLN-Zero ``DiTBlock``s conditioned on ``Linear(E, D)(emb)`` (attention never crosses a sub-volume: local
  detail; the U-Net carries the global structure), an affine-free LayerNorm, back to a map ``(B, D, S'/p)``.
* injections (``LevelProjection``, one per level and path): the map at ``S'/p`` brought to the level's
  ``S'/2^l``: ``r = p / 2^l >= 1``: ``Linear(D, channels[l] r^3)`` per token, unpatchified (each token fills its
  ``r^3`` voxels, as the DiT's final layer does); ``r < 1``: average pooling by ``1/r`` then ``Linear(D,
  channels[l])``. Every projection is zero-initialised, so at init the network computes the U-Net alone
  (``global_flow``); MONAI zero-initialises the U-Net's last convolution, so like the DiT the network outputs zeros
  at init; gradients reach the projections after the first optimiser step, the local flow's patch embedding and
  adaLN-Zero modulations after the second and the rest of it after the third.
* output ``(B, C, S1, S2, S3)`` (noise for DDPM, velocity for RFlow, by ``meduet.losses.diffusion``).

How it differs from the public BiFlowNet: MONAI's U-Net instead of BiFlowNet's own; one stack of local blocks
instead of a U-shaped one with skips; the local features reach *every* level (pooled or unpatchified to the level's
resolution) instead of the full-resolution levels only; the conditions are this project's (site metadata, MeDUET
factors) with classifier-free guidance, not BiFlowNet's class and resolution embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from meduet.errors import MeduetConfigError
from meduet.networks.dit import LatentDiT, _check_args, build_dit
from meduet.networks.dit_blocks import DiTBlock, FactorEmbedder, MetadataEmbedder, timestep_embedding
from meduet.networks.latent_vit import sincos_position_embedding_3d, unpatchify
from meduet.records import RecordMixin, register

__all__ = ["DUALFLOW_PRESETS", "LatentDualFlow", "LocalFlow", "LevelProjection", "build_dualflow", "build_backbone",
           "BACKBONES"]

#: Network sizes (3D MedDiffusion's layout: sub-volumes of 8^3 latent voxels, latent patch 2; the seed states no
#: widths). ``tiny``: tests (seconds on CPU, 4x8^3 crops, sub-volumes of 4^3); ``demo``: the demo chain on 2 CPU
#: cores, sized to the demo DiT's parameter count (1.318 M vs 1.313 M with the demo factors 96 + 48, 1.305 M vs
#: 1.278 M unconditional; ``bench/diffusion_convergence.py`` prints both); ``paper``: MAISI's 4x24^3 crops, sized
#: to DiT-B/2's count (129.0 M vs 130.9 M with the paper factors 768 + 192).
DUALFLOW_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(in_channels=4, input_size=8, channels=(8, 16), num_res_blocks=1, attention_levels=(False, True),
                 norm_num_groups=4, num_head_channels=8, local_dim=24, local_depth=1, local_heads=2, sub_volume=4,
                 patch_size=2),
    "demo": dict(in_channels=4, input_size=16, channels=(16, 32, 48), num_res_blocks=1,
                 attention_levels=(False, False, True), norm_num_groups=8, num_head_channels=16, local_dim=48,
                 local_depth=2, local_heads=4, sub_volume=8, patch_size=2),
    "paper": dict(in_channels=4, input_size=24, channels=(128, 256, 384), num_res_blocks=2,
                  attention_levels=(False, True, True), norm_num_groups=32, num_head_channels=64, local_dim=384,
                  local_depth=6, local_heads=8, sub_volume=8, patch_size=2),
}

#: The backbones meduet_diffusion can train (train.yaml ``backbone``).
BACKBONES = ("dit", "dualflow")

_NON_WEIGHT_ARGS = ("input_size", "cond_dropout")


class LevelProjection(nn.Module):
    """Local feature map ``(B, D, g1, g2, g3)`` (one token per ``p^3`` latent voxels) -> a U-Net level's addition
    ``(B, C_l, g1 r, g2 r, g3 r)`` with ``r = p / 2^l`` (see the module docstring); zero-initialised."""

    def __init__(self, dim: int, channels: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.channels = channels
        self.up = max(1, patch_size // stride)      # voxels per token side at this level
        self.pool = max(1, stride // patch_size)    # tokens per voxel side at this level
        self.linear = nn.Linear(dim, channels * self.up**3)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            fmap = F.avg_pool3d(fmap, self.pool)
        grid = tuple(fmap.shape[2:])
        out = self.linear(fmap.flatten(2).transpose(1, 2))
        return unpatchify(out, self.up, grid, self.channels)


class LocalFlow(nn.Module):
    """Transformer inside latent sub-volumes: ``forward(x (B, C, S'), emb (B, E)) -> (B, D, S'/p)`` with every
    ``S'`` a multiple of the sub-volume side ``v`` (see the module docstring)."""

    def __init__(self, in_channels: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, sub_volume: int,
                 patch_size: int, cond_dim: int) -> None:
        super().__init__()
        self.dim, self.patch_size, self.side = dim, patch_size, sub_volume // patch_size
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding_3d((self.side,) * 3, dim)[None], persistent=False)
        self.cond = nn.Linear(cond_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        fmap = self.patch_embed(x)
        b, d, g1, g2, g3 = fmap.shape
        k = self.side
        n1, n2, n3 = g1 // k, g2 // k, g3 // k
        tokens = fmap.reshape(b, d, n1, k, n2, k, n3, k).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, k**3, d)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.cond(emb).to(tokens.dtype).repeat_interleave(n1 * n2 * n3, dim=0)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.norm(tokens)
        return tokens.reshape(b, n1, n2, n3, k, k, k, d).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, d, g1, g2, g3)


@register
class LatentDualFlow(RecordMixin, nn.Module):
    """Dual-flow denoiser over VAE latents (global MONAI U-Net + local sub-volume transformer), see the module
    docstring for shapes.

    Args:
        in_channels: latent channels ``C`` (the output has the same).
        input_size: default latent crop size (recorded only; any size works, see padding).
        channels, num_res_blocks, attention_levels, norm_num_groups, num_head_channels: the U-Net's
            (``DiffusionModelUNet``'s arguments of the same names; self-attention where ``attention_levels``).
        local_dim, local_depth, local_heads, mlp_ratio: the local transformer's width, blocks, heads, MLP ratio.
        sub_volume: side ``v`` of the latent sub-volumes attention stays inside (a multiple of ``patch_size``).
        patch_size: latent patch side ``p`` of the local tokens (a power of two).
        condition, num_domains, num_metadata_scalars, content_dim, style_dim, cond_dropout, num_train_timesteps:
            as ``LatentDiT`` (condition ``none``, ``metadata`` or ``factors``).
        content_map: must be False (the content token map is a DiT option; accepted so configs can pass it).

    ``arch`` holds these arguments and ``meta`` what the trainer records, like ``LatentDiT``'s; kind
    ``"dualflow"``.
    """

    kind = "dualflow"
    non_weight_args = _NON_WEIGHT_ARGS

    # classifier-free guidance and the condition path are LatentDiT's own functions (same semantics by
    # construction); they read the attributes set in __init__ and ``t_embedder`` below
    drop_mask = LatentDiT.drop_mask
    _cond_tensor = LatentDiT._cond_tensor
    embed_condition = LatentDiT.embed_condition
    _timesteps = staticmethod(LatentDiT._timesteps)
    forward_with_cfg = LatentDiT.forward_with_cfg
    cond_keys = LatentDiT.cond_keys

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int | Sequence[int] = 24,
        channels: Sequence[int] = (96, 192, 384),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[bool] = (False, True, True),
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 64,
        local_dim: int = 384,
        local_depth: int = 6,
        local_heads: int = 8,
        mlp_ratio: float = 4.0,
        sub_volume: int = 8,
        patch_size: int = 2,
        condition: str = "none",
        num_domains: int = 0,
        num_metadata_scalars: int = 0,
        content_dim: int = 0,
        style_dim: int = 0,
        content_map: bool = False,
        cond_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if condition == "semantic" or content_map:
            raise MeduetConfigError("the dualflow backbone takes conditions none, metadata and factors without the "
                                    "content map; use backbone dit for condition semantic or content_map")
        if local_dim < 6 or local_heads < 1 or local_dim % local_heads:
            raise MeduetConfigError(f"dualflow: local_dim {local_dim} must be >= 6 and divisible by num_heads "
                                    f"{local_heads}; fix local_dim / local_heads")
        _check_args(condition, num_domains, num_metadata_scalars, content_dim, style_dim, content_map, cond_dropout,
                    local_dim, local_heads)
        channels = [int(c) for c in channels]
        levels = len(channels)
        if patch_size < 1 or patch_size & (patch_size - 1) or sub_volume < patch_size or sub_volume % patch_size:
            raise MeduetConfigError(f"dualflow: patch_size {patch_size} must be a power of two and sub_volume "
                                    f"{sub_volume} a multiple of it; e.g. patch_size 2 with sub_volume 8")
        if levels < 1 or len(attention_levels) != levels or any(c % norm_num_groups for c in channels):
            raise MeduetConfigError(f"dualflow: channels {channels} must be multiples of norm_num_groups "
                                    f"{norm_num_groups} with one attention flag per level (got "
                                    f"{list(attention_levels)}); fix the preset's U-Net sizes")
        self.arch = dict(in_channels=in_channels, input_size=input_size, channels=channels,
                         num_res_blocks=num_res_blocks, attention_levels=[bool(a) for a in attention_levels],
                         norm_num_groups=norm_num_groups, num_head_channels=num_head_channels, local_dim=local_dim,
                         local_depth=local_depth, local_heads=local_heads, mlp_ratio=mlp_ratio,
                         sub_volume=sub_volume, patch_size=patch_size, condition=condition, num_domains=num_domains,
                         num_metadata_scalars=num_metadata_scalars, content_dim=content_dim, style_dim=style_dim,
                         content_map=False, cond_dropout=cond_dropout, num_train_timesteps=num_train_timesteps)
        self.meta: dict[str, Any] = {}
        self.in_channels, self.patch_size = in_channels, patch_size
        self.condition, self.cond_dropout = condition, float(cond_dropout)
        self.num_domains, self.num_metadata_scalars = num_domains, num_metadata_scalars
        self.content_dim, self.style_dim, self.use_content_map = content_dim, style_dim, False
        self.t_scale = 1000.0 / float(num_train_timesteps)
        self.multiple = math.lcm(sub_volume, 2 ** (levels - 1))
        try:
            self.unet = DiffusionModelUNet(
                spatial_dims=3, in_channels=in_channels, out_channels=in_channels, num_res_blocks=num_res_blocks,
                channels=channels, attention_levels=list(attention_levels), norm_num_groups=norm_num_groups,
                num_head_channels=num_head_channels)
        except ValueError as e:
            raise MeduetConfigError(f"dualflow U-Net: {str(e).strip().splitlines()[0]}; fix the preset's U-Net "
                                    "sizes") from None
        emb_dim = 4 * channels[0]
        self.y_embedder: nn.Module | None = None
        if condition == "metadata":
            self.y_embedder = MetadataEmbedder(num_domains, num_metadata_scalars, emb_dim)
        elif condition == "factors":
            self.y_embedder = FactorEmbedder(content_dim, style_dim, emb_dim)
        self.local_flow = LocalFlow(in_channels, local_dim, local_depth, local_heads, mlp_ratio, sub_volume,
                                    patch_size, emb_dim)
        # the hidden state's width at each level's entrance: the previous level's on the way down (MONAI changes
        # the width in a level's first residual block), the next deeper level's on the way up
        down = [channels[max(i - 1, 0)] for i in range(levels)]
        up = [channels[min(i + 1, levels - 1)] for i in range(levels)]
        self.inject_down = nn.ModuleList(LevelProjection(local_dim, c, patch_size, 2**i) for i, c in enumerate(down))
        self.inject_up = nn.ModuleList(LevelProjection(local_dim, c, patch_size, 2**i) for i, c in enumerate(up))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Local flow and condition path as the DiT's (xavier linears, N(0, 0.02) condition tables / null vector,
        zero adaLN modulations); zero injections; the U-Net keeps MONAI's initialisation."""
        modules = [*self.local_flow.modules(), *(self.y_embedder.modules() if self.y_embedder is not None else ())]
        for m in modules:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        pe = self.local_flow.patch_embed
        nn.init.xavier_uniform_(pe.weight.view(pe.weight.shape[0], -1))
        nn.init.zeros_(pe.bias)
        for block in self.local_flow.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if isinstance(self.y_embedder, MetadataEmbedder):
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        elif isinstance(self.y_embedder, FactorEmbedder):
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)
        for proj in (*self.inject_down, *self.inject_up):
            nn.init.zeros_(proj.linear.weight)
            nn.init.zeros_(proj.linear.bias)

    # ------------------------------------------------------------------ pieces
    @property
    def t_embedder(self):
        """``t (B,) -> (B, E)``: the U-Net's timestep MLP on the sinusoid of the rescaled ``t`` (what
        ``LatentDiT.embed_condition`` calls)."""
        return self._time_embedding

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        mlp = self.unet.time_embed
        emb = timestep_embedding(t.float() * self.t_scale, int(self.unet.block_out_channels[0]))
        return mlp(emb.to(mlp[0].weight.dtype))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 1:
            raise MeduetConfigError(f"dualflow input must be latents (B, {self.in_channels}, S1, S2, S3), got "
                                    f"{tuple(x.shape)}; check the latent channels of the VAE")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded by edge replication at the far end of each axis to multiples of ``self.multiple``."""
        pad = [(-int(s)) % self.multiple for s in x.shape[2:]]
        if not any(pad):
            return x
        return F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")

    def _embedding(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Mapping[str, torch.Tensor] | None,
                   force_drop: torch.Tensor | bool | None) -> torch.Tensor:
        b = x.shape[0]
        t = self._timesteps(t, b, x.device)
        if self.condition == "none":  # cond and force_drop are ignored
            return self.t_embedder(t)
        return self.embed_condition(t, cond, self.drop_mask(b, cond, force_drop, x.device))[0]

    def _unet(self, x: torch.Tensor, emb: torch.Tensor, fmap: torch.Tensor | None) -> torch.Tensor:
        """MONAI's ``DiffusionModelUNet.forward`` order on padded ``x (B, C, S')`` with the local additions."""
        u = self.unet
        h = u.conv_in(x)
        if fmap is not None:
            h = h + self.inject_down[0](fmap).to(h.dtype)
        skips = [h]
        levels = len(u.down_blocks)
        for i, block in enumerate(u.down_blocks):
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
            if fmap is not None and i + 1 < levels:  # the next level's entrance (its skip carries it too)
                h = h + self.inject_down[i + 1](fmap).to(h.dtype)
                skips[-1] = h
        h = u.middle_block(hidden_states=h, temb=emb, context=None)
        for j, block in enumerate(u.up_blocks):
            if fmap is not None:
                h = h + self.inject_up[levels - 1 - j](fmap).to(h.dtype)
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            h = block(hidden_states=h, res_hidden_states_list=res, temb=emb, context=None)
        return u.out(h)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int,
                cond: Mapping[str, torch.Tensor] | None = None,
                force_drop: torch.Tensor | bool | None = None) -> torch.Tensor:
        """Prediction ``(B, C, S1, S2, S3)`` for noisy latents ``x (B, C, S1, S2, S3)`` at timesteps ``t (B,)``;
        ``cond`` and ``force_drop`` as ``LatentDiT.forward`` (None = the null condition)."""
        self._check(x)
        emb = self._embedding(x, t, cond, force_drop)
        xp = self._pad(x)
        out = self._unet(xp, emb, self.local_flow(xp, emb))
        return out[:, :, : x.shape[2], : x.shape[3], : x.shape[4]]

    def global_flow(self, x: torch.Tensor, t: torch.Tensor | float | int,
                    cond: Mapping[str, torch.Tensor] | None = None,
                    force_drop: torch.Tensor | bool | None = None) -> torch.Tensor:
        """The U-Net branch alone (no local features), ``(B, C, S1, S2, S3)``: what ``forward`` computes at init."""
        self._check(x)
        emb = self._embedding(x, t, cond, force_drop)
        out = self._unet(self._pad(x), emb, None)
        return out[:, :, : x.shape[2], : x.shape[3], : x.shape[4]]


# ----------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------
def build_dualflow(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> LatentDualFlow:
    """``LatentDualFlow(**DUALFLOW_PRESETS[preset] | overrides)`` (``preset`` may also be a dict or None)."""
    if preset is None:
        kw: dict[str, Any] = {}
    elif isinstance(preset, str):
        if preset not in DUALFLOW_PRESETS:
            raise MeduetConfigError(f"unknown dualflow preset {preset!r}; choose one of {sorted(DUALFLOW_PRESETS)}")
        kw = dict(DUALFLOW_PRESETS[preset])
    else:
        kw = dict(preset)
    kw.update(overrides)
    return LatentDualFlow(**kw)


def build_backbone(backbone: str = "dit", preset: str | Mapping[str, Any] | None = "tiny",
                   **overrides: Any) -> nn.Module:
    """meduet_diffusion's denoiser: ``build_dit`` (``backbone="dit"``) or ``build_dualflow`` (``"dualflow"``) with
    the preset's sizes and ``overrides`` (what train.yaml's and inference.json's ``network_def`` build)."""
    if backbone == "dit":
        return build_dit(preset, **overrides)
    if backbone == "dualflow":
        return build_dualflow(preset, **overrides)
    raise MeduetConfigError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}; dit is meduet_diffusion's "
                            "DiT/SiT network, dualflow 3D MedDiffusion's dual-flow denoiser")
