"""Building blocks of the latent ViT: patchify helpers, fixed 3D sin-cos positions, encoder, light decoder.

Everything here works on VAE latents ``x`` of shape ``(B, C, S1, S2, S3)`` (``C = 4`` for MAISI) cut into
non-overlapping cubes of side ``p`` (the *latent patch*). The token grid is ``g = (S1/p, S2/p, S3/p)`` (any
three sizes divisible by ``p``; cubic in the paper: ``24/4 = 6`` per axis) and the sequence length is
``N = g1 * g2 * g3``. Tokens are ordered in raster order over ``(g1, g2, g3)`` with the last axis fastest,
which is the order of ``Conv3d(...).flatten(2)``; ``patchify`` uses the same order, and each patch vector is
laid out as ``(C, p, p, p)`` (channel-major, like the patch-embedding convolution's weight).

Attention runs through MONAI's ``TransformerBlock`` with ``use_flash_attention=True``: its ``SABlock`` then
calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU, the math/flash CPU kernels
here). Note that ``SABlock`` passes ``dropout_p=dropout_rate`` to that call even in eval mode, so the networks
of this module default to ``dropout_rate=0`` (as in the paper).

Positions are fixed (not learned): ``sincos_position_embedding_3d`` splits the width over the three axes,
``2 * (dim // 6)`` channels per axis (half sine, half cosine), and pads the remainder with zeros when ``dim`` is
not divisible by 6. The embedding for the construction-time grid is a non-persistent buffer (so it never
enters a state dict, and a checkpoint loads regardless of the crop size); other grids are computed on the fly
and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock

__all__ = [
    "to_3tuple",
    "token_grid",
    "patchify",
    "unpatchify",
    "tokens_to_map",
    "sincos_position_embedding_3d",
    "init_vit_weights",
    "LatentViT",
    "LatentDecoder",
]

Grid = tuple[int, int, int]


def to_3tuple(value: int | Sequence[int]) -> Grid:
    """``6 -> (6, 6, 6)``; a sequence of three ints is returned as a tuple."""
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected an int or three ints, got {value!r}")
    return out  # type: ignore[return-value]


def token_grid(spatial: Sequence[int], patch_size: int) -> Grid:
    """Token grid ``(S1/p, S2/p, S3/p)`` of a latent with spatial shape ``spatial``; errors if not divisible."""
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) != 3 or any(s % patch_size or s <= 0 for s in spatial):
        raise ValueError(f"latent spatial shape {spatial} must be three positive multiples of patch size {patch_size}")
    return tuple(s // patch_size for s in spatial)  # type: ignore[return-value]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, S1, S2, S3) -> (B, N, C * p^3)`` in the token order of the patch embedding."""
    b, c = x.shape[:2]
    g1, g2, g3 = token_grid(x.shape[2:], patch_size)
    p = patch_size
    x = x.reshape(b, c, g1, p, g2, p, g3, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, g1 * g2 * g3, c * p**3)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, N, C * p^3) -> (B, C, g1 p, g2 p, g3 p)``."""
    g1, g2, g3 = to_3tuple(grid)
    b, n, d = patches.shape
    p = patch_size
    if n != g1 * g2 * g3 or d != channels * p**3:
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {(g1, g2, g3)}, C={channels}, p={p}")
    x = patches.reshape(b, g1, g2, g3, channels, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, g1 * p, g2 * p, g3 * p)


def tokens_to_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, N, D) -> (B, D, g1, g2, g3)``."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *to_3tuple(grid))


def sincos_position_embedding_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding, ``(N, dim)`` in raster token order.

    Each axis gets ``2 * (dim // 6)`` channels: ``sin(pos * w_k)`` then ``cos(pos * w_k)`` with
    ``w_k = temperature ** (-k / (dim // 6))``; the axes are concatenated in order (g1, g2, g3) and the last
    ``dim - 6 * (dim // 6)`` channels are zero.
    """
    g = to_3tuple(grid)
    half = dim // 6
    if half < 1:
        raise ValueError(f"embedding width {dim} is too small for 3D sin-cos positions (need >= 6)")
    omega = temperature ** (-torch.arange(half, dtype=torch.float64) / half)
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in g), indexing="ij")
    parts = []
    for axis in coords:
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def init_vit_weights(module: nn.Module) -> None:
    """MAE-style initialisation: xavier-uniform linears (zero bias), unit LayerNorms, patch convs as linears."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d) and getattr(m, "_patch_embed", False):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Positions(nn.Module):
    """Fixed sin-cos positions: a non-persistent buffer for the default grid, cached tensors for other grids."""

    def __init__(self, grid: Grid, dim: int) -> None:
        super().__init__()
        self.grid, self.dim = grid, dim
        self.register_buffer("pos_embed", sincos_position_embedding_3d(grid, dim)[None], persistent=False)
        self._cache: dict[tuple, torch.Tensor] = {}

    def positions(self, grid: Sequence[int]) -> torch.Tensor:
        grid = to_3tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        key = (grid, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._cache:
            self._cache[key] = sincos_position_embedding_3d(grid, self.dim)[None].to(
                device=self.pos_embed.device, dtype=self.pos_embed.dtype
            )
        return self._cache[key]


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
            dropout_rate: float) -> nn.ModuleList:
    """``depth`` MONAI ``TransformerBlock``s (pre-norm, GELU MLP, SDPA attention).

    ``TransformerBlock`` always builds a ``norm_cross_attn`` LayerNorm that it only uses with cross-attention;
    it is replaced by ``nn.Identity`` so that every parameter receives a gradient (DDP then needs no
    ``find_unused_parameters``, and weight decay does not act on dead weights).
    """
    blocks = nn.ModuleList()
    for _ in range(depth):
        block = TransformerBlock(
            hidden_size=dim,
            mlp_dim=int(round(dim * mlp_ratio)),
            num_heads=num_heads,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            use_flash_attention=True,
        )
        block.norm_cross_attn = nn.Identity()
        blocks.append(block)
    return blocks


class LatentViT(_Positions):
    """ViT encoder over latent patches.

    ``x (B, C, S1, S2, S3)`` -> Conv3d patch embedding (kernel = stride = ``patch_size``) -> tokens
    ``(B, N, dim)`` + fixed sin-cos positions -> ``depth`` MONAI ``TransformerBlock``s (SDPA attention,
    ``qkv_bias``) -> LayerNorm.

    The two halves are exposed separately so that callers can rearrange tokens in between (token mixing,
    MAE-style dropping of hidden tokens): ``embed(x) -> (tokens, grid)`` and ``forward_tokens(tokens)``, which
    accepts any subset/arrangement of embedded tokens ``(B, n, dim)``. ``forward(x)`` is both.

    Args:
        in_channels: latent channels ``C``.
        input_size: latent crop size used for the default position buffer (any other size divisible by
            ``patch_size`` also works).
        patch_size: latent patch side ``p``.
        dim, depth, num_heads, mlp_ratio: transformer width, number of blocks, heads, MLP width ratio.
        qkv_bias: bias of the qkv projection (True as in MAE/MeDUET).
        dropout_rate: attention/MLP dropout (0 in the paper).
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int | Sequence[int] = 24,
        patch_size: int = 4,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__(token_grid(to_3tuple(input_size), patch_size), dim)
        self.in_channels, self.patch_size = in_channels, patch_size
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embed._patch_embed = True  # type: ignore[assignment]
        self.blocks = _blocks(dim, depth, num_heads, mlp_ratio, qkv_bias, dropout_rate)
        self.norm = nn.LayerNorm(dim)
        init_vit_weights(self)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """``(B, C, S1, S2, S3) -> tokens (B, N, dim)`` with positions added, and the token grid."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents (B, {self.in_channels}, S1, S2, S3), got {tuple(x.shape)}")
        grid = token_grid(x.shape[2:], self.patch_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.positions(grid), grid

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks + final norm on embedded tokens ``(B, n, dim) -> (B, n, dim)``."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full unmixed sequence: ``(B, C, S1, S2, S3) -> (B, N, dim)``."""
        return self.forward_tokens(self.embed(x)[0])


class LatentDecoder(_Positions):
    """Light decoder predicting latent patches from a full grid of encoder tokens.

    ``tokens (B, N, enc_dim)`` -> Linear(enc_dim -> dim) -> positions where ``visible`` is False get the
    learnable mask token -> + fixed sin-cos positions -> ``depth`` blocks -> LayerNorm ->
    Linear(dim -> C p^3) -> ``(B, N, C p^3)`` (patch layout of ``patchify``).

    Args:
        enc_dim: encoder width ``D``.
        in_channels, input_size, patch_size: as in ``LatentViT`` (the decoder predicts ``in_channels * p^3``
            values per token).
        dim, depth, num_heads, mlp_ratio, qkv_bias, dropout_rate: decoder transformer.
    """

    def __init__(
        self,
        enc_dim: int = 768,
        in_channels: int = 4,
        input_size: int | Sequence[int] = 24,
        patch_size: int = 4,
        dim: int = 384,
        depth: int = 8,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__(token_grid(to_3tuple(input_size), patch_size), dim)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = _blocks(dim, depth, num_heads, mlp_ratio, qkv_bias, dropout_rate)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, in_channels * patch_size**3)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor | None, grid: Sequence[int]) -> torch.Tensor:
        """``tokens (B, N, enc_dim)``, ``visible (B, N)`` bool (None = all visible) -> ``(B, N, C p^3)``.

        Values of ``tokens`` at non-visible positions are ignored (replaced by the mask token).
        """
        h = self.embed(tokens)
        if visible is not None:
            h = torch.where(visible.unsqueeze(-1), h, self.mask_token.to(h.dtype))
        h = h + self.positions(grid)
        for block in self.blocks:
            h = block(h)
        return self.pred(self.norm(h))
