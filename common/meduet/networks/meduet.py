"""The MeDUET network (token mixing, content/style factor heads, recombination, dual reconstruction, domain
heads, learnable SiQC temperature) and the masked-autoencoder baseline with the same backbone.

Shapes (``p`` latent patch, ``g`` token grid, ``N = g1 g2 g3``, ``D`` encoder width, ``Ds`` style width,
``P = C p^3`` values per patch):

* A training batch ``x (2K, C, S1, S2, S3)`` holds ``K`` *pairs*: sample ``k`` (source **A**) is mixed with
  sample ``k + K`` (source **B**).
* The mix mask ``M (K, N)`` is boolean: ``True`` where the mixed sequence carries A's token, ``False`` where
  it carries B's. Every row has exactly ``round(mix_ratio * N)`` True entries (half-up rounding), so
  ``mix_ratio`` is A's share of the positions; it must leave both sources at least one token.
* Everything that is "per source" is stacked as ``[A rows (K); B rows (K)]``, i.e. in the order of the input
  batch: ``visible = cat([M, ~M])`` is each source's own positions, ``hidden = ~visible``.

What ``MeDUET.forward`` computes (the student side of one training step; the losses live in
``meduet.losses.meduet``):

1. embed both sources (patch embedding + fixed positions), mix them token-wise with ``M``, run the encoder on
   the ``K`` mixed sequences;
2. factor heads per token: ``content = Linear(D, D)``, ``style = Linear(D, Ds)`` then a *normalised*
   depthwise 3D smoothing over the token grid restricted to the source's own tokens (``StyleSmoothing``), so
   a source's style never sees the other source's tokens. Demixing is positional: a source's factors are the
   factor tokens at its own positions (kept on the full grid, with the other source's positions masked);
3. recombination ``Linear(D + Ds, D)`` of ``[content, style]``;
4. decoder streams (one decoder call for all of them): stream A = recombined tokens at A's positions and the
   mask token at B's; stream B = the same with the complementary mask ``~M`` of the *same pair*; optionally
   the style-swapped streams A<-sB (A's content with B's pooled style, A's positions) and B<-sA;
5. domain heads on pooled factors: content (through gradient reversal) and style -> domain logits;
6. optionally the student re-encodes the first 2 or 4 reconstructed views (unpatchified, with gradients)
   as full unmixed sequences, in one encoder call.

Design decisions not fixed by the paper (documented here once):

* Style smoothing is a normalised convolution: ``conv(s * m) / conv(m)`` with the same positive depthwise
  kernel (parameterised as ``exp(log_weight)``, initialised uniform), which is a learnable weighted average
  over the source's real neighbours. Positivity keeps the denominator >= the centre weight > 0 on the source's
  own positions; a free-sign kernel could make it vanish. Outputs at the other source's positions are zero.
* Pooled factors are plain means over the source's own tokens (over all tokens for unmixed inputs).
* The style swap uses the other source's *pooled* style vector broadcast over this source's content tokens,
  because the two sources occupy different positions (and, for ``mix_ratio != 0.5``, different numbers of
  positions); this is what makes any mixing ratio work.
* The domain heads are linear by default (``domain_hidden=0``); ``domain_hidden > 0`` gives a one-hidden-layer
  MLP.
* The SiQC temperatures (content, style) are ``exp(log_tau)``; with ``learn_temperature=True`` ``log_tau`` is
  an ``nn.Parameter`` (so the optimiser updates it) and is clamped to ``[log 0.01, log 1]`` when used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.losses.meduet import grad_reverse
from meduet.networks.vae import decode_record, encode_record
from meduet.networks.latent_vit import (
    LatentDecoder,
    LatentViT,
    to_3tuple,
    tokens_to_map,
    unpatchify,
)

__all__ = [
    "MEDUET_PRESETS",
    "TAU_RANGE",
    "sample_mix_mask",
    "sample_visible_mask",
    "masked_mean",
    "pool_style",
    "STYLE_POOLS",
    "ContentEraser",
    "StyleSmoothing",
    "FactorHeads",
    "Recombination",
    "FactorEncoder",
    "MeDUET",
    "MaskedAutoencoder",
    "PretrainedEncoder",
    "build_meduet",
    "build_mae",
    "build_encoder",
    "latent_record",
    "with_latent_record",
    "load_pretrain",
    "load_encoder",
    "PRETRAIN_FIX",
]

#: Network sizes, DiT-style. ``tiny``: tests (seconds on CPU); ``demo``: minutes on 2 CPU cores; ``paper``:
#: the seed paper's ViT-B on 4x24^3 MAISI latents (216 tokens). ``style_dim`` defaults to ``dim // 4``.
MEDUET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(input_size=8, patch_size=2, dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                 dec_dim=32, dec_depth=1, dec_heads=2, style_pool="mean_std"),
    "demo": dict(input_size=8, patch_size=2, dim=96, depth=4, num_heads=4, mlp_ratio=4.0,
                 dec_dim=64, dec_depth=2, dec_heads=4, style_pool="mean_std"),
    "paper": dict(input_size=24, patch_size=4, dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                  dec_dim=384, dec_depth=8, dec_heads=12),
}

#: How a case's style tokens become its style vector: ``"mean"`` (the paper: the mean token, width ``Ds``) or
#: ``"mean_std"`` (mean and standard deviation per channel, width ``2 Ds``: the feature statistics that
#: AdaIN-style transfer calls style). A site shows in *how* the style of tissues differs across a volume, which
#: the mean of a few hundred tokens dilutes (docs/README.md, "Style statistics").
STYLE_POOLS = ("mean", "mean_std")


def style_vector_width(style_dim: int, style_pool: str) -> int:
    """Width of a case's pooled style vector: ``Ds``, or ``2 Ds`` for ``"mean_std"``."""
    return int(style_dim) * (2 if style_pool == "mean_std" else 1)

#: Clamp range of the SiQC temperature.
TAU_RANGE = (0.01, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------
def _count(ratio: float, n: int, what: str) -> int:
    count = int(math.floor(ratio * n + 0.5))
    if not 0 < count < n:
        raise ValueError(f"{what}={ratio} gives {count} of {n} tokens; it must leave at least one token on each side")
    return count


def _exactly_k_true(rows: int, n: int, k: int, device, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(rows, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < k


def sample_mix_mask(pairs: int, num_tokens: int, ratio: float = 0.5, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Random mix mask ``(pairs, num_tokens)`` bool with exactly ``round(ratio * N)`` True (= source A) per row."""
    return _exactly_k_true(pairs, num_tokens, _count(ratio, num_tokens, "mix_ratio"), device, generator)


def sample_visible_mask(batch: int, num_tokens: int, mask_ratio: float = 0.5, device=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE mask ``(batch, N)`` bool, True = visible; exactly ``round(mask_ratio * N)`` hidden tokens per row."""
    hidden = _count(mask_ratio, num_tokens, "mask_ratio")
    return _exactly_k_true(batch, num_tokens, num_tokens - hidden, device, generator)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``tokens (B, N, F)`` over positions where ``mask (B, N)`` is True (all if None) -> ``(B, F)``."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


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


# ----------------------------------------------------------------------------------------------------------------
# checkpoint record
# ----------------------------------------------------------------------------------------------------------------
#: Constructor arguments that change only how a network computes or which crop size its cached positions use,
#: never which weights it has: ignored when a checkpoint's architecture is compared with a network's.
_NON_WEIGHT_ARGS = ("input_size", "dropout_rate", "siqc_temperature", "mask_ratio")


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _arch_diff(saved: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Differences between two architecture records on their shared keys, recursing into nested dicts and
    ignoring ``_NON_WEIGHT_ARGS`` at every level."""
    diff: dict[str, Any] = {}
    for k in saved.keys() & own.keys():
        if k in _NON_WEIGHT_ARGS:
            continue
        a, b = saved[k], own[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            sub = _arch_diff(a, b)
            diff.update({f"{k}.{kk}": v for kk, v in sub.items()})
        elif a != b:
            diff[k] = (a, b)
    return diff


class _CheckpointRecord:
    """Mixin: the network's kind, architecture and ``meta`` (what downstream stages need: latent scale factor,
    latent channels, domains, preprocessing, the VAE's config hash) travel in the state dict as ``_extra_state``
    (a fixed-size JSON byte tensor, see ``meduet.networks.vae.encode_record``), so ``model.pt`` stays a flat state
    dict for ``monai.bundle.load`` / ``CheckpointLoader`` / MONAI Label and ``load_pretrain(path)`` rebuilds the
    network from the file alone. Loading a record whose architecture differs from the network's is an error."""

    kind: str = ""
    arch: dict[str, Any]
    meta: dict[str, Any]

    def get_extra_state(self) -> torch.Tensor:
        return encode_record({"kind": self.kind, "architecture": _jsonable(self.arch), **self.meta})

    def set_extra_state(self, state: Any) -> None:
        record = decode_record(state)
        if not record:
            return
        kind = record.get("kind")
        if kind and kind != self.kind:
            raise MeduetConfigError(
                f"checkpoint holds a '{kind}' network but this is '{self.kind}'; set objective to '{kind}' "
                "or load it with meduet.networks.meduet.load_pretrain(path)")
        diff = _arch_diff(record.get("architecture") or {}, _jsonable(self.arch))
        if diff:
            raise MeduetConfigError(
                f"checkpoint was trained with another architecture {diff} (checkpoint, network); use the same "
                "model_preset, or build the network from the file with meduet.networks.meduet.load_pretrain(path)")
        self.meta = {k: v for k, v in record.items() if k not in ("kind", "architecture")}


# ----------------------------------------------------------------------------------------------------------------
# factor heads
# ----------------------------------------------------------------------------------------------------------------
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


def _domain_head(in_dim: int, num_domains: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, num_domains)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_domains))


# ----------------------------------------------------------------------------------------------------------------
# MeDUET
# ----------------------------------------------------------------------------------------------------------------
class MeDUET(_CheckpointRecord, nn.Module):
    """MeDUET: token-mixed latent ViT with content/style factor heads, dual reconstruction and domain heads.

    Args:
        in_channels: latent channels ``C`` (4 for MAISI).
        input_size: default latent crop size (only sets the cached position buffers; any size divisible by
            ``patch_size`` works).
        patch_size: latent patch ``p``.
        dim, depth, num_heads, mlp_ratio: encoder (paper: 768, 12, 12, 4).
        dec_dim, dec_depth, dec_heads: decoder (paper: 384, 8, 12); ``dec_heads`` defaults to ``num_heads`` if it
            divides ``dec_dim``, else 1.
        style_dim: ``Ds``, default ``dim // 4`` (192 for the paper).
        num_domains: number of sites/datasets for the domain heads.
        domain_hidden: 0 = linear domain heads; > 0 = MLP with that hidden width.
        siqc_temperature: SiQC temperature (initial value when learnable).
        style_pool: how style tokens become a case's style vector (``STYLE_POOLS``; the domain head, SiQC and
            downstream stages use that vector; a style swap uses its mean part).
        learn_temperature: make ``log_tau`` (content, style) an optimised ``nn.Parameter``.
        smooth_kernel: style smoothing kernel size.
        qkv_bias, dropout_rate: transformer options.

    Submodules: ``backbone`` (``FactorEncoder``: ``backbone.encoder``, ``backbone.factors``), ``recombine``,
    ``decoder``, ``domain_content_head``, ``domain_style_head``; ``log_tau`` (parameter or buffer).
    ``arch`` holds the constructor arguments and ``meta`` the latent facts; both travel in the state dict
    (``_extra_state``), see ``load_pretrain``.
    """

    kind = "meduet"

    def __init__(self, in_channels: int = 4, input_size: int | Sequence[int] = 24, patch_size: int = 4,
                 dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 dec_dim: int = 384, dec_depth: int = 8, dec_heads: int | None = None,
                 style_dim: int | None = None, num_domains: int = 2, domain_hidden: int = 0,
                 siqc_temperature: float = 0.07, learn_temperature: bool = False, smooth_kernel: int = 3,
                 qkv_bias: bool = True, dropout_rate: float = 0.0, style_pool: str = "mean") -> None:
        super().__init__()
        style_dim = style_dim or dim // 4
        if dec_heads is None:
            dec_heads = num_heads if dec_dim % num_heads == 0 else 1
        if num_domains < 1:
            raise ValueError("num_domains must be >= 1")
        self.arch = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size, dim=dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dec_dim=dec_dim,
                         dec_depth=dec_depth, dec_heads=dec_heads, style_dim=style_dim, num_domains=num_domains,
                         domain_hidden=domain_hidden, siqc_temperature=siqc_temperature,
                         learn_temperature=learn_temperature, smooth_kernel=smooth_kernel, qkv_bias=qkv_bias,
                         dropout_rate=dropout_rate, style_pool=style_pool)
        self.meta: dict[str, Any] = {}
        self.in_channels, self.patch_size, self.dim, self.style_dim = in_channels, patch_size, dim, style_dim
        self.style_pool = style_pool
        self.num_domains = num_domains
        self.backbone = FactorEncoder(in_channels, input_size, patch_size, dim, depth, num_heads, mlp_ratio,
                                      style_dim, smooth_kernel, qkv_bias, dropout_rate, style_pool)
        self.recombine = Recombination(dim, style_dim)
        self.decoder = LatentDecoder(dim, in_channels, input_size, patch_size, dec_dim, dec_depth, dec_heads,
                                     mlp_ratio, qkv_bias, dropout_rate)
        self.domain_content_head = _domain_head(dim, num_domains, domain_hidden)
        self.domain_style_head = _domain_head(self.style_vector_dim, num_domains, domain_hidden)
        nn.init.xavier_uniform_(self.recombine.proj.weight)
        nn.init.zeros_(self.recombine.proj.bias)
        log_tau = torch.full((2,), math.log(siqc_temperature))
        if learn_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    # ------------------------------------------------------------------ accessors
    @property
    def style_vector_dim(self) -> int:
        """Width of a case's pooled style vector (``Ds``, or ``2 Ds`` with ``style_pool="mean_std"``)."""
        return style_vector_width(self.style_dim, self.style_pool)

    @property
    def encoder(self) -> LatentViT:
        return self.backbone.encoder

    @property
    def factors(self) -> FactorHeads:
        return self.backbone.factors

    def ema_source(self) -> nn.Module:
        """The part the EMA teacher copies and follows: encoder + factor heads."""
        return self.backbone

    def temperature(self) -> torch.Tensor:
        """SiQC temperatures ``(2,)`` = (content, style), clamped to ``TAU_RANGE``."""
        return self.log_tau.clamp(math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1])).exp()

    def encode(self, x: torch.Tensor, erase: bool = True) -> dict[str, torch.Tensor]:
        """Downstream API on unmixed inputs; see ``FactorEncoder.encode``."""
        return self.backbone.encode(x, erase)

    def render(self, content_tokens: torch.Tensor, style: torch.Tensor, grid: Sequence[int],
               generator: torch.Generator | None = None, as_hidden: bool | None = None) -> torch.Tensor:
        """Decode factors back to a latent: ``content_tokens (B, N, D)`` recombined with ``style`` (per token
        ``(B, N, Ds)``, or one vector per sample ``(B, Ds)``/``(B, 1, Ds)`` broadcast over the tokens, e.g. another
        case's pooled style for a style swap; of a ``mean_std`` style vector the mean part) -> ``(B, C, g1 p, g2 p,
        g3 p)`` in the scaled latent space (divide by ``latent_scale_factor`` before the VAE decoder). The decoder
        was trained on content before the site eraser: take it from ``encode(x, erase=False)``.

        With the paper's reconstruction target (``rec_on="hidden"``) the decoder only learns the positions a source
        did *not* see, so every patch is rendered as a hidden one (``as_hidden``): two decoder passes with a random
        half mask and its complement, each patch taken from the pass in which it was hidden. A network pretrained
        with ``rec_on="all"`` also reconstructs visible positions and is rendered in one pass with every token
        visible. ``as_hidden=None`` follows ``meta["rec_on"]`` (default hidden).
        """
        if style.ndim == 2:
            style = style[:, : self.style_dim].unsqueeze(1)  # a pooled style vector: its mean part
        tokens = self.recombine(content_tokens, style)
        if as_hidden is None:
            as_hidden = self.meta.get("rec_on", "hidden") == "hidden"
        if not as_hidden:
            return unpatchify(self.decoder(tokens, None, grid), self.patch_size, grid, self.in_channels)
        b, n = tokens.shape[:2]
        visible = sample_mix_mask(b, n, 0.5, tokens.device, generator)
        pred = self.decoder(torch.cat([tokens, tokens]), torch.cat([visible, ~visible]), grid)
        full = torch.where(visible.unsqueeze(-1), pred[b:], pred[:b])
        return unpatchify(full, self.patch_size, grid, self.in_channels)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        x: torch.Tensor,
        mix_mask: torch.Tensor | None = None,
        *,
        mix_ratio: float = 0.5,
        streams: int = 2,
        reencode: int = 0,
        domain_content: bool = True,
        domain_style: bool = True,
        grl_lambda: float = 1.0,
        content_adversary: str = "grl",
        generator: torch.Generator | None = None,
        aux_pairs: int | None = None,
        x_cross: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Student side of one MeDUET step on a batch of ``K`` pairs.

        Args:
            x: ``(2K, C, S1, S2, S3)``; rows ``k`` and ``k + K`` are mixed.
            mix_mask: ``(K, N)`` bool (True = source A's token); sampled with ``mix_ratio`` if None.
            streams: decoder streams: 0 (no decoding), 2 (dual reconstruction A, B), 4 (+ style-swapped A<-sB,
                B<-sA).
            reencode: number of reconstructed views re-encoded by the student (0, 2 = x_hat_A, x_hat_B, 4 = +
                the swapped views); must be <= ``streams``. Gradients flow through the reconstructions.
            domain_content, domain_style: compute the domain logits (content through gradient reversal with
                coefficient ``grl_lambda``).
            content_adversary: ``"grl"`` (the paper: the content domain head sees the content through gradient
                reversal) or ``"confusion"``: the head is trained on *detached* pooled content
                (``domain_content_logits``), and ``domain_content_confusion_logits`` are the same head with
                *frozen* parameters on the live content, for a loss pushing its prediction to uniform. With GRL
                the encoder can win by making the head confidently *wrong*, which keeps the site decodable;
                confusion has no such optimum. ``"confusion_tokens"``: the same with the head on every content
                token at its source's own positions (logits ``(2K, N, num_domains)``, valid where ``visible``).
            aux_pairs: ``P`` (1..K, default K): only the first ``P`` pairs get the style-swapped streams and the
                re-encoded views (MFTD / SiQC on a subset of the pairs; the pairs are random, so any ``P`` of
                them are a random subset). ``pred`` is then ``(2K + 2P, ...)`` with 4 streams and the views are
                ``[x_hat_A[:P], x_hat_B[:P], x_hat_A<-sB, x_hat_B<-sA][:V]`` (``V * P`` rows).
            x_cross: optional ``(2K, C, S1, S2, S3)`` copies of ``x`` with another appearance (same crops, e.g.
                synthetic-site copies): each is encoded unmixed, and the decoder gets each source's content
                tokens from the mixed forward (its own positions) with the pooled style (mean part) of its copy:
                ``pred_cross (2K, N, C p^3)``, which should render the copy (the ``cross_appearance`` term).

        Returns a dict (``V = reencode``):
            ``mix_mask (K, N)``, ``visible (2K, N)`` (each source's own positions, A rows then B rows),
            ``content_tokens (K, N, D)`` / ``style_tokens (K, N, Ds)`` (each position holds its own source's
            factor), ``content (2K, D)`` / ``style (2K, style_vector_dim)`` pooled per source over its own
            positions (style by ``pool_style``; the swap streams broadcast its mean part);
            optional ``domain_content_logits``/``domain_style_logits (2K, num_domains)``;
            ``pred (2K [+ 2P], N, C p^3)`` in stream order [A, B, A<-sB, B<-sA] (the swapped streams for the
            first ``P`` pairs); ``view_content_tokens (V*P, N, D)``, ``view_style_tokens (V*P, N, Ds)``,
            ``view_content (V*P, D)``, ``view_style (V*P, Ds)`` for views [x_hat_A, x_hat_B, x_hat_A<-sB,
            x_hat_B<-sA][:V] of those pairs;
            ``pred_cross (2K, N, C p^3)`` with ``x_cross``;
            ``temperature (2,)`` = ``self.temperature()`` (returned here so that a learnable temperature is part
            of the forward graph, which DDP needs).

        All student computation of a step happens inside this call, so a ``DistributedDataParallel`` wrapper
        sees every parameter use.
        """
        if streams not in (0, 2, 4) or reencode not in (0, 2, 4) or reencode > streams:
            raise ValueError(f"streams must be 0/2/4 and reencode 0/2/4 <= streams, got {streams}, {reencode}")
        b = x.shape[0]
        if b < 2 or b % 2:
            raise ValueError(f"MeDUET needs an even batch of at least 2 (pairs k, k+K), got {b}")
        k = b // 2
        p = k if aux_pairs is None else int(aux_pairs)
        if not 1 <= p <= k:
            raise ValueError(f"aux_pairs must be in 1..{k} (the number of pairs), got {aux_pairs}")
        with torch.profiler.record_function("meduet/mixed_encode"):
            tokens, grid = self.encoder.embed(x)
            n = tokens.shape[1]
            if mix_mask is None:
                mix_mask = sample_mix_mask(k, n, mix_ratio, x.device, generator)
            if mix_mask.shape != (k, n) or mix_mask.dtype != torch.bool:
                raise ValueError(f"mix_mask must be bool of shape {(k, n)}, "
                                 f"got {mix_mask.dtype} {tuple(mix_mask.shape)}")
            m = mix_mask.unsqueeze(-1)
            z = self.encoder.forward_tokens(torch.where(m, tokens[:k], tokens[k:]))
            visible = torch.cat([mix_mask, ~mix_mask], dim=0)
            content = self.factors.content_of(z)
            style_per_source = self.factors.smooth(self.factors.style(z).repeat(2, 1, 1), visible, grid)
            style = torch.where(m, style_per_source[:k], style_per_source[k:])
            content_pooled = masked_mean(content.repeat(2, 1, 1), visible)
            style_pooled = pool_style(style_per_source, visible, self.style_pool)
        out: dict[str, torch.Tensor] = {
            "mix_mask": mix_mask,
            "visible": visible,
            "content_tokens": content,
            "style_tokens": style,
            "content": content_pooled,
            "style": style_pooled,
            "temperature": self.temperature(),
        }
        if domain_content:
            if content_adversary == "grl":
                out["domain_content_logits"] = self.domain_content_head(grad_reverse(content_pooled, grl_lambda))
            elif content_adversary == "confusion":
                head = self.domain_content_head
                out["domain_content_logits"] = head(content_pooled.detach())
                frozen = {n: p.detach() for n, p in head.named_parameters()}
                out["domain_content_confusion_logits"] = torch.func.functional_call(head, frozen, (content_pooled,))
            elif content_adversary == "confusion_tokens":
                # the same game per content token (each source's own positions): every token must hide the site,
                # not only their mean, which a fresh linear probe can otherwise still read
                head = self.domain_content_head
                per_source = content.repeat(2, 1, 1)  # (2K, N, D); rows of A then B, valid where `visible`
                out["domain_content_logits"] = head(per_source.detach())
                frozen = {n: p.detach() for n, p in head.named_parameters()}
                out["domain_content_confusion_logits"] = torch.func.functional_call(head, frozen, (per_source,))
            else:
                raise ValueError(f"content_adversary must be 'grl', 'confusion' or 'confusion_tokens', "
                                 f"got {content_adversary!r}")
        if domain_style:
            out["domain_style_logits"] = self.domain_style_head(style_pooled)
        if streams:
            with torch.profiler.record_function("meduet/decode"):
                c_part = self.recombine.content_part(content)
                rec = c_part + self.recombine.style_part(style)
                dec_tokens, dec_visible = [rec, rec], [mix_mask, ~mix_mask]
                if streams == 4:
                    # A's content with B's pooled style (A positions) and B's content with A's pooled style
                    s_part = self.recombine.style_part(style_pooled[:, None, : self.style_dim])  # (2K, 1, D)
                    dec_tokens += [c_part[:p] + s_part[k: k + p], c_part[:p] + s_part[:p]]
                    dec_visible += [mix_mask[:p], ~mix_mask[:p]]
                pred = self.decoder(torch.cat(dec_tokens), torch.cat(dec_visible), grid)
            out["pred"] = pred
            if reencode:
                with torch.profiler.record_function("meduet/reencode"):
                    if p == k:  # the first `reencode` streams, as they are
                        rows = pred[: reencode * k]
                    else:  # x_hat_A and x_hat_B of the first P pairs, then their swapped views
                        rows = torch.cat([pred[:p], pred[k: k + p]] + ([pred[2 * k:]] if reencode == 4 else []))
                    views = unpatchify(rows, self.patch_size, grid, self.in_channels)
                    enc = self.backbone.encode(views)
                out.update({
                    "view_content_tokens": enc["content_tokens"],
                    "view_style_tokens": enc["style_tokens"],
                    "view_content": enc["content"],
                    "view_style": enc["style"],
                })
        if x_cross is not None:
            if x_cross.shape != x.shape:
                raise ValueError(f"x_cross must have the batch's shape {tuple(x.shape)}, got {tuple(x_cross.shape)}")
            with torch.profiler.record_function("meduet/cross_appearance"):
                s_cross = self.backbone.encode(x_cross.to(x))["style"][:, None, : self.style_dim]  # (2K, 1, Ds)
                c_own = self.recombine.content_part(content)  # (K, N, D): each position its own source's content
                tokens_cross = torch.cat([c_own, c_own]) + self.recombine.style_part(s_cross)
                out["pred_cross"] = self.decoder(tokens_cross, visible, grid)
        return out


# ----------------------------------------------------------------------------------------------------------------
# masked-autoencoder baseline
# ----------------------------------------------------------------------------------------------------------------
class MaskedAutoencoder(_CheckpointRecord, nn.Module):
    """Masked-autoencoder baseline with MeDUET's backbone (no mixing, no factors).

    ``forward(x (B, C, S1, S2, S3), visible=None)``: a random ``visible (B, N)`` mask keeps exactly
    ``N - round(mask_ratio * N)`` tokens per sample; the encoder runs on the visible tokens only (MAE-style),
    its outputs are put back on the grid and the decoder fills the rest with the mask token and predicts every
    patch. Returns ``{"pred": (B, N, C p^3), "visible": (B, N)}``; the loss (MSE on hidden patches) is
    ``meduet.losses.meduet.mae_step_losses``.

    ``encode(x)`` has the same keys as ``FactorEncoder.encode`` with ``content_tokens = tokens``,
    ``content`` = mean token, ``content_map`` = the token map, and ``style_tokens = style = None`` (the
    baseline has no style factor).
    """

    kind = "mae"

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


# ----------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------
def _preset(preset: str | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if preset is None:
        base: dict[str, Any] = {}
    elif isinstance(preset, str):
        if preset not in MEDUET_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(MEDUET_PRESETS)}")
        base = dict(MEDUET_PRESETS[preset])
    else:
        base = dict(preset)
    base.update(overrides)
    return base


def build_meduet(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> MeDUET:
    """``MeDUET(**MEDUET_PRESETS[preset] | overrides)``."""
    return MeDUET(**_preset(preset, overrides))


def build_mae(preset: str | Mapping[str, Any] | None = "tiny", **overrides: Any) -> MaskedAutoencoder:
    """``MaskedAutoencoder`` with the backbone of a MeDUET preset (MeDUET-only keys are dropped)."""
    kw = _preset(preset, overrides)
    for key in ("style_dim", "num_domains", "domain_hidden", "siqc_temperature", "learn_temperature",
                "smooth_kernel", "style_pool"):
        kw.pop(key, None)
    return MaskedAutoencoder(**kw)



# ----------------------------------------------------------------------------------------------------------------
# deployable encoder and loading
# ----------------------------------------------------------------------------------------------------------------
class PretrainedEncoder(_CheckpointRecord, nn.Module):
    """The deployable part of a meduet_pretrain checkpoint: the latent ViT with (for MeDUET) its content/style
    factor heads, without decoder, recombination or domain heads.

    Its parameter names are those of the training network (``backbone.*`` for MeDUET, ``encoder.*`` for the
    masked-autoencoder baseline), so ``monai.bundle.load`` / ``CheckpointLoader`` / ``copy_model_state`` fill it
    from meduet_pretrain's ``model.pt`` by name and skip the rest.

    ``forward(x (B, C, S1, S2, S3))`` -> factor map ``(B, D + Ds, g1, g2, g3)``: content channels first, then the
    (smoothed) style channels; for the baseline ``(B, D, g1, g2, g3)`` token features. ``encode(x)`` returns the
    dict of ``FactorEncoder.encode``. Inputs are *scaled* latents (cached latent x ``latent_scale_factor``) with
    every spatial size divisible by ``patch_size``.
    """

    def __init__(self, objective: str = "meduet", in_channels: int = 4, input_size: int | Sequence[int] = 24,
                 patch_size: int = 4, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 style_dim: int | None = None, smooth_kernel: int = 3, qkv_bias: bool = True,
                 dropout_rate: float = 0.0, style_pool: str = "mean") -> None:
        super().__init__()
        if objective not in ("meduet", "mae"):
            raise ValueError(f"objective must be 'meduet' or 'mae', got {objective!r}")
        self.kind = objective
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
        return self.backbone.encoder if self.kind == "meduet" else self.encoder

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if self.kind == "meduet":
            return self.backbone.encode(x)
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


_ENCODER_KEYS = ("in_channels", "input_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio", "style_dim",
                 "smooth_kernel", "qkv_bias", "dropout_rate", "style_pool")
_STYLE_KEYS = ("style_dim", "smooth_kernel", "style_pool")  # MeDUET-only encoder arguments


def build_encoder(preset: str | Mapping[str, Any] | None = "tiny", objective: str = "meduet",
                  **overrides: Any) -> PretrainedEncoder:
    """``PretrainedEncoder`` with the backbone of a MeDUET preset (decoder/domain keys are dropped)."""
    kw = {k: v for k, v in _preset(preset, overrides).items() if k in _ENCODER_KEYS}
    if objective != "meduet":
        kw = {k: v for k, v in kw.items() if k not in _STYLE_KEYS}
    return PretrainedEncoder(objective, **kw)


#: Latent-datalist keys (meduet_vae encode.yaml) copied into the pretraining checkpoint's record.
_LATENT_KEYS = ("latent_channels", "downsample_factor", "latent_scale_factor", "latent_std", "latent_mean",
                "domains", "heldout_domains", "labels", "modality", "preprocessing", "vae_config_hash", "augmentation")


def latent_record(latents: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The facts of meduet_vae's latent cache a downstream stage needs, plus ``extra`` (e.g. ``crop_size``)."""
    rec = {k: _jsonable(latents[k]) for k in _LATENT_KEYS if k in latents}
    rec.update({k: _jsonable(v) for k, v in extra.items()})
    return rec


def with_latent_record(network: nn.Module, latents: Mapping[str, Any], **extra: Any) -> nn.Module:
    """Set ``network.meta`` from the latent datalist (for configs); returns the network."""
    network.meta = latent_record(latents, **extra)
    return network


PRETRAIN_FIX = ("train meduet_pretrain first (python -m monai.bundle run training --config_file "
                "\"['bundles/meduet_pretrain/configs/train.yaml','bundles/meduet_pretrain/configs/presets/demo.yaml']\") "
                "or download the bundle")


def _read_record(path: Any, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from meduet.networks.vae import _read_state_dict

    state = _read_state_dict(path, what, PRETRAIN_FIX)
    record = decode_record(state.get("_extra_state"))
    if not record.get("architecture") or record.get("kind") not in ("meduet", "mae"):
        raise MeduetConfigError(f"{what} '{path}' has no meduet_pretrain record (not a model.pt of meduet_pretrain); "
                                f"{PRETRAIN_FIX}")
    return state, record


def load_pretrain(path: Any, device: str | torch.device = "cpu") -> MeDUET | MaskedAutoencoder:
    """Rebuild the trained ``MeDUET`` / ``MaskedAutoencoder`` from meduet_pretrain's ``model.pt`` alone
    (architecture and latent facts travel inside; ``network.meta`` holds the latter). Returned in eval mode."""
    state, record = _read_record(path, "pretraining checkpoint")
    cls = MeDUET if record["kind"] == "meduet" else MaskedAutoencoder
    net = cls(**record["architecture"])
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def load_encoder(path: Any, device: str | torch.device = "cpu") -> PretrainedEncoder:
    """The deployable ``PretrainedEncoder`` (encoder + factor heads) of meduet_pretrain's ``model.pt``."""
    state, record = _read_record(path, "pretraining checkpoint")
    arch = {k: v for k, v in record["architecture"].items() if k in _ENCODER_KEYS}
    if record["kind"] != "meduet":
        arch = {k: v for k, v in arch.items() if k not in _STYLE_KEYS}
    enc = PretrainedEncoder(record["kind"], **arch)
    own = enc.state_dict()
    missing = [k for k in own if k not in state and ".eraser." not in k]  # an absent eraser loads as identity
    if missing:
        raise MeduetConfigError(f"pretraining checkpoint '{path}' lacks {len(missing)} encoder weights "
                                f"(e.g. {missing[:2]}); {PRETRAIN_FIX}")
    enc.load_state_dict({k: state[k] for k in own if k in state}, strict=True)
    return enc.to(device).eval()
