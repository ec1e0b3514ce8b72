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
  positions); this is what makes any mixing ratio work. ``style_swap="tokens"`` is the public code's form instead:
  the other source's style tokens paired by rank (``swapped_style_tokens``; mixing ratio 0.5 only).
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

from meduet.networks.factors import FactorEncoder, FactorHeads, Recombination, pool_style, style_vector_width
from meduet.networks.latent_vit import Grid, LatentDecoder, LatentViT, unpatchify
from meduet.networks.layers import grad_reverse
from meduet.networks.masks import masked_mean, sample_mix_mask
from meduet.networks.meduet_extras import MeduetExtras
from meduet.records import RecordMixin, register

__all__ = ["MEDUET_PRESETS", "NON_WEIGHT_ARGS", "TAU_RANGE", "MeDUET", "build_meduet", "preset_args",
           "swapped_style_tokens"]

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

#: Clamp range of the SiQC temperature.
TAU_RANGE = (0.01, 1.0)

#: Constructor arguments that change only how a network computes or which crop size its cached positions use,
#: never which weights it has: ignored when a checkpoint's architecture is compared with a network's.
NON_WEIGHT_ARGS = ("input_size", "dropout_rate", "siqc_temperature", "mask_ratio")


def _domain_head(in_dim: int, num_domains: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, num_domains)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_domains))


# ----------------------------------------------------------------------------------------------------------------
# MeDUET
# ----------------------------------------------------------------------------------------------------------------
@register
class MeDUET(RecordMixin, nn.Module):
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
    (``_extra_state``), see ``meduet.records.load``.
    """

    kind = "meduet"
    non_weight_args = NON_WEIGHT_ARGS

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
        generator: torch.Generator | None = None,
        extras: MeduetExtras | None = None,
        style_swap: str = "pooled",
    ) -> dict[str, torch.Tensor]:
        """Student side of one MeDUET step on a batch of ``K`` pairs: the paper's steps 1-6 of the module docstring.

        Args:
            x: ``(2K, C, S1, S2, S3)``; rows ``k`` and ``k + K`` are mixed.
            mix_mask: ``(K, N)`` bool (True = source A's token); sampled with ``mix_ratio`` if None.
            streams: decoder streams: 0 (no decoding), 2 (dual reconstruction A, B), 4 (+ style-swapped A<-sB,
                B<-sA).
            reencode: number of reconstructed views re-encoded by the student (0, 2 = x_hat_A, x_hat_B, 4 = +
                the swapped views); must be <= ``streams``. Gradients flow through the reconstructions.
            domain_content, domain_style: compute the domain logits (content through gradient reversal with
                coefficient ``grl_lambda``).
            extras: options that are not in the paper (``meduet.networks.meduet_extras.MeduetExtras``: another
                content adversary, MFTD/SiQC on a subset of the pairs, the cross-appearance stream); None = the
                paper.
            style_swap: what a swapped stream gets of the other source's style: ``"pooled"`` (its pooled style
                vector on every token) or ``"tokens"`` (the public code's form: its style tokens, paired by rank;
                see ``swapped_style_tokens``).

        Returns a dict (``V = reencode``, ``P`` = the pairs that get MFTD/SiQC, ``K`` unless ``extras.aux_pairs``):
            ``mix_mask (K, N)``, ``visible (2K, N)`` (each source's own positions, A rows then B rows),
            ``content_tokens (K, N, D)`` / ``style_tokens (K, N, Ds)`` (each position holds its own source's
            factor), ``content (2K, D)`` / ``style (2K, style_vector_dim)`` pooled per source over its own
            positions (style by ``pool_style``; the swap streams broadcast its mean part);
            optional ``domain_content_logits``/``domain_style_logits (2K, num_domains)``;
            ``pred (2K [+ 2P], N, C p^3)`` in stream order [A, B, A<-sB, B<-sA] (the swapped streams for the
            first ``P`` pairs); ``view_content_tokens (V*P, N, D)``, ``view_style_tokens (V*P, N, Ds)``,
            ``view_content (V*P, D)``, ``view_style (V*P, Ds)`` for views [x_hat_A, x_hat_B, x_hat_A<-sB,
            x_hat_B<-sA][:V] of those pairs; what ``extras`` adds (``domain_content_confusion_logits``,
            ``pred_cross``); ``temperature (2,)`` = ``self.temperature()`` (returned here so that a learnable
            temperature is part of the forward graph, which DDP needs).

        All student computation of a step happens inside this call, so a ``DistributedDataParallel`` wrapper
        sees every parameter use.
        """
        extras = extras or MeduetExtras()
        if streams not in (0, 2, 4) or reencode not in (0, 2, 4) or reencode > streams:
            raise ValueError(f"streams must be 0/2/4 and reencode 0/2/4 <= streams, got {streams}, {reencode}")
        b = x.shape[0]
        if b < 2 or b % 2:
            raise ValueError(f"MeDUET needs an even batch of at least 2 (pairs k, k+K), got {b}")
        k = b // 2
        p = extras.pairs(k)
        out, grid = self.mix_and_factor(x, mix_mask, mix_ratio, generator)  # steps 1-2
        if domain_content:  # step 5
            out.update(extras.content_domain_logits(self, out, grl_lambda))
        if domain_style:
            out["domain_style_logits"] = self.domain_style_head(out["style"])
        if streams:  # steps 3-4
            out["pred"] = self.decode_streams(out, streams, p, grid, style_swap)
            if reencode:  # step 6
                out.update(self.reencode_views(out["pred"], reencode, k, p, grid))
        out.update(extras.cross_appearance(self, x, out, grid))
        return out

    def mix_and_factor(self, x: torch.Tensor, mix_mask: torch.Tensor | None, mix_ratio: float,
                       generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], Grid]:
        """Steps 1-2: embed both sources, mix them token-wise with ``M`` (``(K, N)``), encode the ``K`` mixed
        sequences, and take each source's content and (smoothed, own-positions-only) style tokens and pooled
        vectors. Returns the first entries of ``forward``'s dict and the token grid."""
        k = x.shape[0] // 2
        with torch.profiler.record_function("meduet/mixed_encode"):
            tokens, grid = self.encoder.embed(x)  # (2K, N, D)
            n = tokens.shape[1]
            if mix_mask is None:
                mix_mask = sample_mix_mask(k, n, mix_ratio, x.device, generator)
            if mix_mask.shape != (k, n) or mix_mask.dtype != torch.bool:
                raise ValueError(f"mix_mask must be bool of shape {(k, n)}, "
                                 f"got {mix_mask.dtype} {tuple(mix_mask.shape)}")
            m = mix_mask.unsqueeze(-1)
            z = self.encoder.forward_tokens(torch.where(m, tokens[:k], tokens[k:]))  # (K, N, D) mixed
            visible = torch.cat([mix_mask, ~mix_mask], dim=0)  # (2K, N) each source's own positions
            content = self.factors.content_of(z)  # (K, N, D)
            style_per_source = self.factors.smooth(self.factors.style(z).repeat(2, 1, 1), visible, grid)  # (2K, N, Ds)
            style = torch.where(m, style_per_source[:k], style_per_source[k:])  # (K, N, Ds) demixed by position
            content_pooled = masked_mean(content.repeat(2, 1, 1), visible)  # (2K, D)
            style_pooled = pool_style(style_per_source, visible, self.style_pool)  # (2K, Ds or 2 Ds)
        out = {"mix_mask": mix_mask, "visible": visible, "content_tokens": content, "style_tokens": style,
               "content": content_pooled, "style": style_pooled, "temperature": self.temperature()}
        return out, grid

    def grl_domain_logits(self, content_pooled: torch.Tensor, grl_lambda: float) -> torch.Tensor:
        """Step 5 (content side): the domain head on the pooled content through gradient reversal."""
        return self.domain_content_head(grad_reverse(content_pooled, grl_lambda))  # (2K, num_domains)

    def decode_streams(self, out: Mapping[str, torch.Tensor], streams: int, pairs: int, grid: Grid,
                       style_swap: str = "pooled", swapped_only: bool = False) -> torch.Tensor:
        """Steps 3-4: recombine each source's content and style at its own positions (A, B: the dual
        reconstruction), and with ``streams=4`` also the first ``pairs`` pairs' content with the other source's
        style (A<-sB at A's positions, B<-sA at B's; ``style_swap`` ``"pooled"``: the other source's pooled style
        vector, ``"tokens"``: its rank-paired style tokens, ``swapped_style_tokens``); one decoder call ->
        ``(2K [+ 2P], N, C p^3)`` (``swapped_only``: only the ``2P`` swapped streams)."""
        mix_mask, content, style = out["mix_mask"], out["content_tokens"], out["style_tokens"]
        k, p = mix_mask.shape[0], pairs
        with torch.profiler.record_function("meduet/decode"):
            c_part = self.recombine.content_part(content)  # (K, N, D)
            dec_tokens, dec_visible = [], []
            if not swapped_only:
                rec = c_part + self.recombine.style_part(style)
                dec_tokens, dec_visible = [rec, rec], [mix_mask, ~mix_mask]
            if streams == 4:
                if style_swap == "tokens":
                    # every position gets the other source's style token of the same rank: one token tensor
                    # serves A<-sB (read at A's positions) and B<-sA (read at B's)
                    swapped = c_part[:p] + self.recombine.style_part(swapped_style_tokens(style[:p], mix_mask[:p]))
                    dec_tokens += [swapped, swapped]
                elif style_swap == "pooled":
                    # A's content with B's pooled style (A positions) and B's content with A's pooled style
                    s_part = self.recombine.style_part(out["style"][:, None, : self.style_dim])  # (2K, 1, D)
                    dec_tokens += [c_part[:p] + s_part[k: k + p], c_part[:p] + s_part[:p]]
                else:
                    raise ValueError(f"style_swap must be 'pooled' or 'tokens', got {style_swap!r}")
                dec_visible += [mix_mask[:p], ~mix_mask[:p]]
            return self.decoder(torch.cat(dec_tokens), torch.cat(dec_visible), grid)

    @torch.no_grad()
    def swapped_keys(self, x: torch.Tensor, mix_mask: torch.Tensor, style_swap: str = "pooled",
                     extra: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The public code's SiQC keys, computed by this network as the teacher (no gradients): mix the pairs of
        ``x`` with ``mix_mask`` (the student's complement), demix, decode the two style-swapped streams of every
        pair and re-encode them. Returns ``mix_and_factor``'s entries (``content_tokens``, ``style_tokens``,
        ``visible``, pooled ``content``/``style``, ...) and ``view_content_tokens``, ``view_style_tokens``
        ``(2K, N, .)``, ``view_content``, ``view_style`` (pooled) of the re-encoded views
        ``[x_hat_A<-sB; x_hat_B<-sA]``. ``extra`` (e.g. the unmixed batch MFTD needs) is encoded in the
        same encoder call as the views; its encoding is ``extra_encoding`` (the same numbers as a separate
        ``backbone.encode``, up to floating-point summation order of the larger batch)."""
        k = mix_mask.shape[0]
        out, grid = self.mix_and_factor(x, mix_mask, 0.5, None)
        pred = self.decode_streams(out, 4, k, grid, style_swap, swapped_only=True)  # (2K, N, P)
        views = unpatchify(pred, self.patch_size, grid, self.in_channels)
        if extra is not None:
            views = torch.cat([views.to(extra.dtype), extra])
        with torch.profiler.record_function("meduet/teacher_reencode"):
            enc = self.backbone.encode(views)
        n = pred.shape[0]
        out.update(view_content_tokens=enc["content_tokens"][:n], view_style_tokens=enc["style_tokens"][:n],
                   view_content=enc["content"][:n], view_style=enc["style"][:n])
        if extra is not None:
            out["extra_encoding"] = {key: v[n:] for key, v in enc.items() if v is not None}
        return out

    def reencode_views(self, pred: torch.Tensor, reencode: int, k: int, p: int, grid: Grid) -> dict[str, torch.Tensor]:
        """Step 6: the student re-encodes the first ``reencode`` reconstructed views of the first ``p`` pairs
        (unpatchified, with gradients) as full unmixed sequences, in one encoder call."""
        with torch.profiler.record_function("meduet/reencode"):
            if p == k:  # the first `reencode` streams, as they are
                rows = pred[: reencode * k]
            else:  # x_hat_A and x_hat_B of the first P pairs, then their swapped views
                rows = torch.cat([pred[:p], pred[k: k + p]] + ([pred[2 * k:]] if reencode == 4 else []))
            views = unpatchify(rows, self.patch_size, grid, self.in_channels)  # (V*P, C, S1, S2, S3)
            enc = self.backbone.encode(views)
        return {"view_content_tokens": enc["content_tokens"], "view_style_tokens": enc["style_tokens"],
                "view_content": enc["content"], "view_style": enc["style"]}


def swapped_style_tokens(style: torch.Tensor, mix_mask: torch.Tensor) -> torch.Tensor:
    """The public code's token-wise style swap: ``style (K, N, Ds)`` holds at each position its own source's style
    token, ``mix_mask (K, N)`` (True = A) has as many True as False entries per row. The ``r``-th of A's
    positions (in token order) gets B's ``r``-th style token and vice versa -> ``(K, N, Ds)``."""
    k, n = mix_mask.shape
    half = n // 2
    if n % 2 or bool((mix_mask.sum(dim=1) != half).any()):
        raise ValueError("the token-wise style swap pairs A's and B's tokens by rank and needs a mix mask with "
                         "as many A as B positions (mix_ratio 0.5, an even number of tokens)")
    order = torch.argsort((~mix_mask).to(torch.int8), dim=1, stable=True)  # A's positions, then B's, each sorted
    pos_a, pos_b = order[:, :half], order[:, half:]
    partner = torch.empty_like(order)
    partner.scatter_(1, pos_a, pos_b)
    partner.scatter_(1, pos_b, pos_a)
    return torch.gather(style, 1, partner.unsqueeze(-1).expand_as(style))


# ----------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------
def preset_args(preset: str | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
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
    return MeDUET(**preset_args(preset, overrides))
