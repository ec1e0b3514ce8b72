"""MeDUET's factor heads on encoder tokens: content, smoothed style, their recombination, and the encoder with heads.

Shapes: tokens ``(B, N, D)`` on a token grid ``g`` (``N = g1 g2 g3``), content ``(B, N, D)``, style ``(B, N, Ds)``;
a case's *style vector* pools its style tokens (``pool_style``).

* ``FactorHeads``: ``content = Linear(D, D)`` (then ``ContentEraser``, identity unless fitted after pretraining;
  not in the paper, see ``meduet.networks.options``), ``style = StyleSmoothing(Linear(D, Ds))``.
* ``StyleSmoothing`` is a normalised depthwise convolution, ``conv(s * m) / conv(m)`` with one positive kernel
  (``exp(log_weight)``, initialised uniform): a learnable weighted average over a source's *own* token neighbours,
  so a source's style never sees the other source's tokens of a mixed sequence.
* ``Recombination``: ``Linear(D + Ds, D)`` of ``[content, style]``, applied as two blocks.
* ``FactorEncoder``: latent ViT + heads, the deployable part of MeDUET (what the EMA teacher copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.networks.latent_vit import LatentViT, to_3tuple, tokens_to_map
from meduet.networks.masks import masked_mean

__all__ = [
    "STYLE_POOLS",
    "style_vector_width",
    "pool_style",
    "StyleSmoothing",
    "ContentEraser",
    "FactorHeads",
    "Recombination",
    "FactorEncoder",
]


#: How a case's style tokens become its style vector: ``"mean"`` (the paper: the mean token, width ``Ds``) or
#: ``"mean_std"`` (mean and standard deviation per channel, width ``2 Ds``: the feature statistics that
#: AdaIN-style transfer calls style). A site shows in *how* the style of tissues differs across a volume, which
#: the mean of a few hundred tokens dilutes (docs/README.md, "Style statistics").
STYLE_POOLS = ("mean", "mean_std")


def style_vector_width(style_dim: int, style_pool: str) -> int:
    """Width of a case's pooled style vector: ``Ds``, or ``2 Ds`` for ``"mean_std"``."""
    return int(style_dim) * (2 if style_pool == "mean_std" else 1)

#: Clamp range of the SiQC temperature.


def pool_style(style: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "mean") -> torch.Tensor:
    """A case's style vector from its style tokens ``(B, N, Ds)`` over the positions where ``mask (B, N)`` is
    True (all if None): ``mode="mean"`` -> ``(B, Ds)``; ``"mean_std"`` -> ``(B, 2 Ds)`` = [mean, standard
    deviation] (population std, ``sqrt(var + 1e-6)`` so that its gradient stays finite)."""
    if mode not in STYLE_POOLS:
        raise ValueError(f"style_pool must be one of {STYLE_POOLS}, got {mode!r}")
    mean = masked_mean(style, mask)
    if mode == "mean":
        return mean
    sq = (style - mean.unsqueeze(1)).square()
    var = masked_mean(sq, mask)
    return torch.cat([mean, (var + 1e-6).sqrt()], dim=-1)


class StyleSmoothing(nn.Module):
    """Depthwise 3D smoothing of style tokens over a source's own token neighbours (normalised convolution).

    ``forward(style (B, N, Ds), visible (B, N) bool | None, grid) -> (B, N, Ds)``: the tokens are scattered onto
    the ``grid`` with zeros where ``visible`` is False, and ``conv(s * m) / conv(m)`` is taken with the same
    positive per-channel kernel ``exp(log_weight)`` (``kernel_size``^3, zero padding), so the result at a
    visible position is a weighted average of visible neighbours only; non-visible outputs are zero. With
    ``visible=None`` every token is real (borders are still normalised by the number of real neighbours).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        self.channels, self.kernel_size = channels, kernel_size
        self.log_weight = nn.Parameter(torch.zeros(channels, 1, kernel_size, kernel_size, kernel_size))

    def forward(self, style: torch.Tensor, visible: torch.Tensor | None, grid: Sequence[int]) -> torch.Tensor:
        b, n, c = style.shape
        g = to_3tuple(grid)
        weight = self.log_weight.exp().to(style.dtype)
        pad = self.kernel_size // 2
        s = style.transpose(1, 2).reshape(b, c, *g)
        if visible is None:
            m = style.new_ones(1, 1, *g)
        else:
            m = visible.to(style.dtype).reshape(b, 1, *g)
            s = s * m
        num = F.conv3d(s, weight, padding=pad, groups=c)
        den = F.conv3d(m, weight, padding=pad)  # one input channel -> Ds channels, each with its own kernel
        out = num / den.clamp_min(1e-6)
        if visible is not None:
            out = out * m
        return out.reshape(b, c, n).transpose(1, 2)


class ContentEraser(nn.Module):
    """A fixed affine map on content tokens, ``c -> c - (c - mean) @ proj.T``, fitted after pretraining to remove
    what a linear model reads of the site from the pooled content (LEACE,
    ``meduet.engines.pretrain.ContentEraserFit``). Identity (``proj = 0``) until fitted; ``fitted`` says which.

    Its buffers travel in the state dict (``*.eraser.mean / proj / fitted``); a state dict written before the
    eraser existed loads as an identity eraser. Since pooling is a mean, erasing every token erases the pooled
    vector in the same way.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.zeros(dim, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._register_load_state_dict_pre_hook(self._identity_if_absent)

    def _identity_if_absent(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, buf in (("mean", self.mean), ("proj", self.proj), ("fitted", self.fitted)):
            state_dict.setdefault(prefix + name, torch.zeros_like(buf))

    def set(self, mean: torch.Tensor | None, proj: torch.Tensor | None) -> None:
        """Install a fitted eraser (``mean (D,)``, ``proj (D, D)``), or reset to identity with ``None``."""
        with torch.no_grad():
            if proj is None:
                self.mean.zero_()
                self.proj.zero_()
                self.fitted.fill_(False)
                return
            self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
            self.proj.copy_(torch.as_tensor(proj, dtype=self.proj.dtype))
            self.fitted.fill_(True)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        # no branch on `fitted` (exporters trace this): the identity eraser (zeros) returns the input exactly
        return content - F.linear(content - self.mean.to(content.dtype), self.proj.to(content.dtype))


class FactorHeads(nn.Module):
    """Per-token factor heads: ``content = eraser(Linear(D, D))`` (the eraser is identity unless fitted after
    pretraining, see ``ContentEraser``), ``style = StyleSmoothing(Linear(D, Ds))``."""

    def __init__(self, dim: int, style_dim: int, smooth_kernel: int = 3) -> None:
        super().__init__()
        self.content = nn.Linear(dim, dim)
        self.style = nn.Linear(dim, style_dim)
        self.smooth = StyleSmoothing(style_dim, smooth_kernel)
        self.eraser = ContentEraser(dim)

    def content_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Content tokens ``(B, N, D)`` of encoder tokens: the linear head, then the (fitted or identity) eraser."""
        return self.eraser(self.content(tokens))

    def forward(self, tokens: torch.Tensor, grid: Sequence[int], visible: torch.Tensor | None = None,
                erase: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, N, D) -> content (B, N, D), smoothed style (B, N, Ds)`` (style over ``visible`` only;
        ``erase=False``: content without the eraser)."""
        content = self.content_of(tokens) if erase else self.content(tokens)
        return content, self.smooth(self.style(tokens), visible, grid)


class Recombination(nn.Module):
    """``Linear(D + Ds -> D)`` of ``[content, style]``; ``style`` may be per token ``(B, N, Ds)`` or one vector
    per sample ``(B, 1, Ds)`` broadcast over the tokens (the SiQC style swap). The weight is applied as two blocks,
    which is the same linear map without materialising the concatenation."""

    def __init__(self, dim: int, style_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim + style_dim, dim)

    def content_part(self, content: torch.Tensor) -> torch.Tensor:
        return F.linear(content, self.proj.weight[:, : self.dim])

    def style_part(self, style: torch.Tensor) -> torch.Tensor:
        return F.linear(style, self.proj.weight[:, self.dim:], self.proj.bias)

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.content_part(content) + self.style_part(style)


class FactorEncoder(nn.Module):
    """Encoder with factor heads: the deployable part of MeDUET (what the EMA teacher copies, what the
    downstream bundles load).

    ``encode(x (B, C, S1, S2, S3))`` on unmixed full inputs (any grid divisible by ``patch_size``) returns a dict:

    * ``tokens (B, N, D)``: encoder output; ``content_tokens (B, N, D)``; ``style_tokens (B, N, Ds)`` (smoothed);
    * ``content (B, D)``: mean over all tokens; ``style (B, Ds)`` or ``(B, 2 Ds)``: ``pool_style`` with the
      encoder's ``style_pool``;
    * ``content_map (B, D, g1, g2, g3)``: content tokens on the token grid.

    ``forward(x)`` is ``encode(x)``.
    """

    def __init__(self, in_channels: int = 4, input_size: int | Sequence[int] = 24, patch_size: int = 4,
                 dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 style_dim: int | None = None, smooth_kernel: int = 3, qkv_bias: bool = True,
                 dropout_rate: float = 0.0, style_pool: str = "mean") -> None:
        super().__init__()
        if style_pool not in STYLE_POOLS:
            raise ValueError(f"style_pool must be one of {STYLE_POOLS}, got {style_pool!r}")
        self.style_dim = style_dim or dim // 4
        self.style_pool = style_pool
        self.encoder = LatentViT(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio,
                                 qkv_bias, dropout_rate)
        self.factors = FactorHeads(dim, self.style_dim, smooth_kernel)
        nn.init.xavier_uniform_(self.factors.content.weight)
        nn.init.zeros_(self.factors.content.bias)
        nn.init.xavier_uniform_(self.factors.style.weight)
        nn.init.zeros_(self.factors.style.bias)

    def ema_source(self) -> nn.Module:
        return self

    def encode(self, x: torch.Tensor, erase: bool = True) -> dict[str, torch.Tensor]:
        """See the class docstring; ``erase=False`` gives the content head's output before the site eraser
        (what the decoder was trained on: ``MeDUET.render`` wants it)."""
        tokens, grid = self.encoder.embed(x)
        tokens = self.encoder.forward_tokens(tokens)
        content, style = self.factors(tokens, grid, erase=erase)
        return {
            "tokens": tokens,
            "content_tokens": content,
            "style_tokens": style,
            "content": content.mean(dim=1),
            "style": pool_style(style, None, self.style_pool),
            "content_map": tokens_to_map(content, grid),
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(x)
