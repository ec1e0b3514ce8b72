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
* ``"semantic"`` (LDAE): the network owns a ``SemanticEncoder`` (``meduet.networks.semantic``) trained with it by the
  diffusion loss; ``cond["x0"]`` (the clean scaled latent) is encoded to a code ``(B, code_dim)`` in the same graph, or
  ``cond["semantic"]`` gives the code (``encode_semantic`` once, then edit it); the factors' MLP and null vector.

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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from meduet.errors import MeduetConfigError
from meduet.networks.dit_blocks import (
    ContentMapEmbedder,
    DiTBlock,
    FactorEmbedder,
    FinalLayer,
    MetadataEmbedder,
    TimestepEmbedder,
)
from meduet.networks.dit_init import init_from_vit
from meduet.networks.latent_vit import sincos_position_embedding_3d, to_3tuple, token_grid, unpatchify
from meduet.networks.semantic import SemanticEncoder, semantic_encoder_args
from meduet.records import RecordMixin, register

__all__ = ["DIT_PRESETS", "CONDITIONS", "LatentDiT", "build_dit"]

#: Network sizes. ``tiny``: tests (seconds on CPU, 4x8^3 latents, 64 tokens); ``demo``: the demo chain on 2 CPU
#: cores (4x16^3 latents, 512 tokens); ``paper``: DiT-B/2 on MAISI's 4x24^3 latents (1728 tokens).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(in_channels=4, input_size=8, patch_size=2, dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
    "demo": dict(in_channels=4, input_size=16, patch_size=2, dim=128, depth=4, num_heads=4, mlp_ratio=4.0),
    "paper": dict(in_channels=4, input_size=24, patch_size=2, dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
}

#: Accepted values of ``condition``.
CONDITIONS = ("none", "metadata", "factors", "semantic")

#: Constructor arguments that do not change which weights the network has (ignored when a checkpoint's
#: architecture is compared with a network's).
_NON_WEIGHT_ARGS = ("input_size", "cond_dropout")


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------
@register
class LatentDiT(RecordMixin, nn.Module):
    """3D diffusion transformer over VAE latents (DiT with adaLN-Zero), see the module docstring for shapes.

    Args:
        in_channels: latent channels ``C`` (4 for MAISI); the output has the same channels.
        input_size: default latent crop size (sets the cached position buffer only; any size divisible by
            ``patch_size`` works).
        patch_size: latent patch side ``p``.
        dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio (DiT-B: 768, 12, 12, 4).
        condition: ``"none"``, ``"metadata"``, ``"factors"`` or ``"semantic"``.
        num_domains: metadata: number of sites (``cond["domain"]`` in ``[0, num_domains)``).
        num_metadata_scalars: metadata: width ``k`` of ``cond["metadata"] (B, k)`` (0 = site only).
        content_dim, style_dim: factors: widths of the pooled content/style vectors (``Dc``, ``Ds``; ``Ds=0`` for
            content only).
        content_map: factors: also add the content token map ``cond["content_map"] (B, Dc, h1, h2, h3)``.
        semantic_encoder: semantic: the ``SemanticEncoder``'s arguments (``patch_size``, ``dim``, ``depth``,
            ``num_heads``, ``code_dim``; ``meduet.networks.semantic.SEMANTIC_PRESETS``).
        cond_dropout: probability of dropping a sample's condition in training (classifier-free guidance).
        qkv_bias: bias of the qkv projection.
        num_train_timesteps: range of ``t`` (``T``; 1000 for MONAI's DDPM/RFlow schedulers).
        freq_dim: width of the sinusoidal timestep features.

    ``arch`` holds these arguments and ``meta`` (empty; the trainer fills in the latent facts, objective and
    scheduler) — both travel in the state dict's ``_extra_state``, so ``meduet.records.load(path)`` rebuilds the
    network.
    """

    kind = "dit"
    non_weight_args = _NON_WEIGHT_ARGS

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
        semantic_encoder: Mapping[str, Any] | None = None,
        cond_dropout: float = 0.1,
        qkv_bias: bool = True,
        num_train_timesteps: int = 1000,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        _check_args(condition, num_domains, num_metadata_scalars, content_dim, style_dim, content_map, cond_dropout,
                    dim, num_heads)
        if (condition == "semantic") != (semantic_encoder is not None):
            raise MeduetConfigError("semantic_encoder (its sizes) goes with condition 'semantic' and only with it")
        self.arch = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size, dim=dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, condition=condition, num_domains=num_domains,
                         num_metadata_scalars=num_metadata_scalars, content_dim=content_dim, style_dim=style_dim,
                         content_map=content_map, semantic_encoder=dict(semantic_encoder) if semantic_encoder else None,
                         cond_dropout=cond_dropout, qkv_bias=qkv_bias,
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
        self.semantic_encoder: SemanticEncoder | None = None
        if condition == "metadata":
            self.y_embedder = MetadataEmbedder(num_domains, num_metadata_scalars, dim)
        elif condition == "factors":
            self.y_embedder = FactorEmbedder(content_dim, style_dim, dim)
            if content_map:
                self.content_map_embedder = ContentMapEmbedder(content_dim, dim)
        elif condition == "semantic":
            self.semantic_encoder = SemanticEncoder(in_channels, input_size, **dict(semantic_encoder))
            self.code_dim = self.semantic_encoder.code_dim
            self.y_embedder = FactorEmbedder(self.code_dim, 0, dim)
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
        if self.condition == "semantic":
            return ("semantic",)
        return ()

    def encode_semantic(self, x0: torch.Tensor) -> torch.Tensor:
        """Semantic code ``(B, code_dim)`` of clean scaled latents ``x0 (B, C, S1, S2, S3)`` (condition semantic)."""
        if self.semantic_encoder is None:
            raise MeduetConfigError(f"this generator is conditioned on '{self.condition}', not 'semantic'; it has no "
                                    "semantic encoder (train meduet_diffusion with --condition semantic)")
        if x0.ndim != 5 or x0.shape[1] != self.in_channels:
            raise MeduetConfigError(f"encode_semantic needs latents (B, {self.in_channels}, S1, S2, S3), got "
                                    f"{tuple(x0.shape)}")
        return self.semantic_encoder(x0)

    def semantic_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"semantic": code}`` from ``cond``'s code, or from its clean latent ``x0`` (encoded here)."""
        if cond.get("semantic") is not None:
            return {"semantic": cond["semantic"]}
        if cond.get("x0") is None:
            raise MeduetConfigError(f"condition 'semantic' needs cond['semantic'] (B, {self.code_dim}) or cond['x0'] "
                                    f"(the clean latents); got keys {sorted(cond)}")
        return {"semantic": self.encode_semantic(torch.as_tensor(cond["x0"]))}

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
        elif self.condition == "semantic":
            code = self._cond_tensor(self.semantic_cond(cond), "semantic", b, (self.code_dim,)).to(t.device)
            y = self.y_embedder(code, None, drop)  # type: ignore[misc]
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
        if self.condition == "semantic":
            cond = self.semantic_cond(cond)
        cond2 = {k: _repeat2(v) for k, v in cond.items() if k in self.cond_keys}
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        out = self(torch.cat([x, x]), torch.cat([t, t]), cond2, force_drop=drop)
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    # ------------------------------------------------------------------ pretrained initialisation
    def init_from_pretrained(self, source: Any, gates: str = "open") -> dict[str, Any]:
        """Initialise the trunk from meduet_pretrain's latent ViT (a module or a state dict); returns a report of
        what was copied. See ``meduet.networks.dit_init.init_from_vit``."""
        return init_from_vit(self, source, gates)


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


# ----------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------
def build_dit(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> LatentDiT:
    """``LatentDiT(**DIT_PRESETS[preset] | overrides)`` (``preset`` may also be a dict or None); condition semantic
    gets ``SEMANTIC_PRESETS[preset]`` updated by an overriding ``semantic_encoder`` dict."""
    if preset is None:
        kw: dict[str, Any] = {}
    elif isinstance(preset, str):
        if preset not in DIT_PRESETS:
            raise MeduetConfigError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
        kw = dict(DIT_PRESETS[preset])
    else:
        kw = dict(preset)
    kw.update(overrides)
    if kw.get("condition") == "semantic":  # the encoder sized like the DiT preset, overridable key by key
        kw["semantic_encoder"] = semantic_encoder_args(preset if isinstance(preset, str) else None,
                                                       kw.get("semantic_encoder"))
    return LatentDiT(**kw)
