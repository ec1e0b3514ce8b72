"""Factor prior: a small diffusion model over MeDUET's pooled ``(content, style)`` vectors, optionally per site, so
that a factor-conditioned DiT can generate volumes without a reference scan (sample factors here, then latents
with ``meduet.engines.sampling.sample_latents(..., cond={"content": c, "style": s})``).

Shapes: ``content (B, Dc)``, ``style (B, Ds)`` (``Ds = 0`` allowed), concatenated to ``z (B, F)``, ``F = Dc + Ds``,
and standardised per feature with the training set's mean/std (buffers ``mean (F,)``, ``std (F,)``, stored in the
state dict). The denoiser ``forward(z_t (B, F), t (B,), domain (B,) | None, force_drop) -> eps (B, F)`` is
``Linear(F, hidden)`` -> ``depth`` residual MLP blocks modulated (adaLN-Zero: shift, scale, gate) by the timestep
embedding plus a site embedding (``num_domains + 1`` rows, the last = null for classifier-free guidance) ->
modulated LayerNorm -> zero-initialised ``Linear(hidden, F)``.

Training (MONAI ``DDPMScheduler``, epsilon prediction, MSE) and sampling (MONAI ``DDIMScheduler``, deterministic with
``eta=0``, de-standardised ``(content, style)``) live in ``meduet.engines.factor_prior``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from meduet.errors import MeduetConfigError
from meduet.networks.dit_blocks import TimestepEmbedder, modulate
from meduet.records import RecordMixin, register

__all__ = ["FactorPrior", "split_vectors"]

Vectors = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any]


def split_vectors(vectors: Vectors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(content, style)`` from a tuple/list, a dict with ``"content"``/``"style"`` (e.g. the output of
    ``FactorEncoder.encode``), or a concatenated tensor (returned as ``(z, None)``)."""
    if torch.is_tensor(vectors):
        return vectors, None
    if isinstance(vectors, Mapping):
        if "content" not in vectors:
            raise MeduetConfigError(f"factor vectors dict needs 'content' (and 'style'), got {sorted(vectors)}")
        return vectors["content"], vectors.get("style")
    if isinstance(vectors, Sequence) and len(vectors) == 2:
        return vectors[0], vectors[1]
    raise MeduetConfigError("factor vectors must be (content, style), a dict with 'content'/'style', or a (B, Dc+Ds) "
                            "tensor")


class _PriorBlock(nn.Module):
    """``h += gate * MLP(LayerNorm(h) * (1 + scale) + shift)`` with (shift, scale, gate) = ``Linear(SiLU(c))``."""

    def __init__(self, hidden: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.SiLU(),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        return h + gate * self.mlp(modulate(self.norm(h).unsqueeze(1), shift, scale).squeeze(1))


@register
class FactorPrior(RecordMixin, nn.Module):
    """Diffusion prior over standardised ``[content, style]`` vectors, see the module docstring.

    Args:
        content_dim, style_dim: ``Dc``, ``Ds`` (the pretrained encoder's widths; ``Ds = 0`` for content only).
        num_domains: sites for per-site sampling (0 = unconditional only).
        hidden, depth: width and number of residual blocks.
        cond_dropout: probability of training a sample with the null site (so ``domain=None`` samples the mixture).
        num_train_timesteps, schedule, beta_start, beta_end: the MONAI DDPM noise schedule (shared by DDIM sampling).
    """

    kind = "factor_prior"
    non_weight_args = ("cond_dropout",)

    def __init__(self, content_dim: int, style_dim: int = 0, num_domains: int = 0, hidden: int = 256, depth: int = 3,
                 cond_dropout: float = 0.1, num_train_timesteps: int = 1000, schedule: str = "linear_beta",
                 beta_start: float = 1e-4, beta_end: float = 2e-2) -> None:
        super().__init__()
        if content_dim < 1 or style_dim < 0 or num_domains < 0:
            raise MeduetConfigError("FactorPrior needs content_dim >= 1, style_dim >= 0, num_domains >= 0")
        if not 0.0 <= cond_dropout < 1.0:
            raise MeduetConfigError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.arch = dict(content_dim=content_dim, style_dim=style_dim, num_domains=num_domains, hidden=hidden,
                         depth=depth, cond_dropout=cond_dropout, num_train_timesteps=num_train_timesteps,
                         schedule=schedule, beta_start=beta_start, beta_end=beta_end)
        self.meta: dict[str, Any] = {}
        self.content_dim, self.style_dim, self.num_domains = content_dim, style_dim, num_domains
        self.features = content_dim + style_dim
        self.cond_dropout = float(cond_dropout)
        self.register_buffer("mean", torch.zeros(self.features))
        self.register_buffer("std", torch.ones(self.features))
        self.inp = nn.Linear(self.features, hidden)
        self.t_embedder = TimestepEmbedder(hidden, 128, num_train_timesteps)
        self.domain_embed = nn.Embedding(num_domains + 1, hidden) if num_domains else None
        self.blocks = nn.ModuleList(_PriorBlock(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, self.features)
        #: MONAI DDPM/DDIM scheduler arguments of this prior's noise schedule (``meduet.engines.factor_prior``)
        self.schedule_args = dict(num_train_timesteps=num_train_timesteps, schedule=schedule, beta_start=beta_start,
                                  beta_end=beta_end, clip_sample=False, prediction_type="epsilon")
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.domain_embed is not None:
            nn.init.normal_(self.domain_embed.weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.out_modulation[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ vectors
    def join(self, vectors: Vectors) -> torch.Tensor:
        """``(content, style)`` / dict / ``(B, F)`` tensor -> raw ``z (B, F)`` (checked)."""
        content, style = split_vectors(vectors)
        z = content if style is None or self.style_dim == 0 else torch.cat([content, style], dim=1)
        if z.ndim != 2 or z.shape[1] != self.features:
            raise MeduetConfigError(f"factor vectors must be content (B, {self.content_dim}) and style "
                                    f"(B, {self.style_dim}) (together (B, {self.features})), got {tuple(z.shape)}")
        return z.float()

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, F) -> content (B, Dc), style (B, Ds)``."""
        return z[:, : self.content_dim], z[:, self.content_dim:]

    @torch.no_grad()
    def set_statistics(self, vectors: Vectors) -> None:
        """Store the per-feature mean/std of the training vectors (std clamped to >= 1e-6)."""
        z = self.join(vectors).to(self.mean.device)
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0, unbiased=False).clamp_min(1e-6) if z.shape[0] > 1 else torch.ones_like(self.std))

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    # ------------------------------------------------------------------ network
    def domain_indices(self, domain: torch.Tensor | int | None, batch: int,
                       device: torch.device) -> torch.Tensor | None:
        if domain is None:
            return None
        if self.domain_embed is None:
            raise MeduetConfigError("this factor prior was trained without sites (num_domains=0); pass domain=None")
        d = torch.as_tensor(domain, device=device).long().reshape(-1)
        if d.numel() == 1:
            d = d.expand(batch)
        if d.numel() != batch:
            raise MeduetConfigError(f"domain must be one site index or ({batch},) indices, got {d.numel()}")
        if bool(((d < 0) | (d >= self.num_domains)).any()):
            raise MeduetConfigError(f"site index out of range 0..{self.num_domains - 1}: {d.unique().tolist()}")
        return d

    def forward(self, z: torch.Tensor, t: torch.Tensor, domain: torch.Tensor | int | None = None,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction ``(B, F)`` for standardised noisy vectors ``z (B, F)`` at timesteps ``t (B,)``; ``domain
        (B,)`` long (None = null site); ``force_drop (B,)`` bool selects the null site per sample."""
        b = z.shape[0]
        t = torch.as_tensor(t, device=z.device).reshape(-1)
        c = self.t_embedder(t.expand(b) if t.numel() == 1 else t)
        if self.domain_embed is not None:
            d = self.domain_indices(domain, b, z.device)
            null = torch.full((b,), self.num_domains, dtype=torch.long, device=z.device)
            if d is None:
                d = null
            elif force_drop is not None:
                d = torch.where(force_drop.to(z.device), null, d)
            c = c + self.domain_embed(d)
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=1)
        return self.out(modulate(self.norm_out(h).unsqueeze(1), shift, scale).squeeze(1))
