"""Factor prior: a small diffusion model over MeDUET's pooled ``(content, style)`` vectors, optionally per site, so
that a factor-conditioned DiT can generate volumes without a reference scan (sample factors here, then latents
with ``meduet.engines.sampling.sample_latents(..., cond={"content": c, "style": s})``).

Shapes: ``content (B, Dc)``, ``style (B, Ds)`` (``Ds = 0`` allowed), concatenated to ``z (B, F)``, ``F = Dc + Ds``,
and standardised per feature with the training set's mean/std (buffers ``mean (F,)``, ``std (F,)``, stored in the
state dict). The denoiser ``forward(z_t (B, F), t (B,), domain (B,) | None, force_drop) -> eps (B, F)`` is
``Linear(F, hidden)`` -> ``depth`` residual MLP blocks modulated (adaLN-Zero: shift, scale, gate) by the timestep
embedding plus a site embedding (``num_domains + 1`` rows, the last = null for classifier-free guidance) ->
modulated LayerNorm -> zero-initialised ``Linear(hidden, F)``.

Training is ``loss(vectors, domain)`` (MONAI ``DDPMScheduler``, epsilon prediction, MSE) and sampling
``sample(n, domain, generator, steps)`` (MONAI ``DDIMScheduler``, deterministic with ``eta=0``) returns
de-standardised ``(content, style)``. ``train_factor_prior`` does both the statistics and a short AdamW loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from meduet.errors import MeduetConfigError
from meduet.networks.dit import TimestepEmbedder, check_record, modulate
from meduet.networks.meduet import _CheckpointRecord
from meduet.networks.vae import decode_record

__all__ = ["FactorPrior", "train_factor_prior", "load_factor_prior", "split_vectors"]

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


class FactorPrior(_CheckpointRecord, nn.Module):
    """Diffusion prior over standardised ``[content, style]`` vectors, see the module docstring.

    Args:
        content_dim, style_dim: ``Dc``, ``Ds`` (the pretrained encoder's widths; ``Ds = 0`` for content only).
        num_domains: sites for per-site sampling (0 = unconditional only).
        hidden, depth: width and number of residual blocks.
        cond_dropout: probability of training a sample with the null site (so ``domain=None`` samples the mixture).
        num_train_timesteps, schedule, beta_start, beta_end: the MONAI DDPM noise schedule (shared by DDIM sampling).
    """

    kind = "factor_prior"

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
        self._sched_args = dict(num_train_timesteps=num_train_timesteps, schedule=schedule, beta_start=beta_start,
                                beta_end=beta_end, clip_sample=False, prediction_type="epsilon")
        self.scheduler = DDPMScheduler(**self._sched_args)
        self._init_weights()

    def set_extra_state(self, state: Any) -> None:
        check_record(self, state, ("cond_dropout",), "meduet.networks.factor_prior.load_factor_prior")

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
    def _domain(self, domain: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor | None:
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
            d = self._domain(domain, b, z.device)
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

    # ------------------------------------------------------------------ training / sampling
    def loss(self, vectors: Vectors, domain: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM epsilon-prediction MSE on a batch of raw (not standardised) vectors; sites dropped with
        ``cond_dropout`` (drawn from ``generator``)."""
        z0 = self.standardise(self.join(vectors).to(self.mean.device))
        b, dev = z0.shape[0], z0.device
        gdev = generator.device if generator is not None else dev
        t = torch.randint(0, self.scheduler.num_train_timesteps, (b,), generator=generator, device=gdev).to(dev)
        noise = torch.randn(z0.shape, generator=generator, device=gdev).to(dev)
        drop = None
        if domain is not None and self.cond_dropout > 0:
            drop = (torch.rand(b, generator=generator, device=gdev) < self.cond_dropout).to(dev)
        pred = self(self.scheduler.add_noise(z0, noise, t), t, domain, drop)
        return F.mse_loss(pred, noise)

    @torch.no_grad()
    def sample(self, n: int, domain: torch.Tensor | int | None = None, generator: torch.Generator | None = None,
               steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` factor vectors with DDIM (MONAI ``DDIMScheduler``): ``(content (n, Dc), style (n, Ds))``,
        de-standardised. ``domain``: one site index or ``(n,)`` indices (None = all sites, the null condition);
        ``guidance_scale`` > 1 sharpens per-site samples (classifier-free guidance)."""
        dev = self.mean.device
        gdev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((n, self.features), generator=generator, device=gdev).to(dev)
        sched = DDIMScheduler(**self._sched_args)
        sched.set_timesteps(steps, device=dev)
        d = self._domain(domain, n, dev)
        was_training = self.training
        self.eval()
        try:
            for t in sched.timesteps:
                tb = torch.full((n,), int(t), dtype=torch.long, device=dev)
                eps = self(z, tb, d)
                if d is not None and float(guidance_scale) != 1.0:
                    eps_null = self(z, tb, None)
                    eps = eps_null + guidance_scale * (eps - eps_null)
                z, _ = sched.step(eps, int(t), z, eta=eta, generator=generator)
        finally:
            self.train(was_training)
        return self.split(self.destandardise(z))


def train_factor_prior(vectors: Vectors, domains: torch.Tensor | Sequence[int] | None = None, steps: int = 500,
                       lr: float = 1e-3, batch_size: int = 256, num_domains: int | None = None, hidden: int = 256,
                       depth: int = 3, cond_dropout: float = 0.1, weight_decay: float = 0.0, seed: int = 0,
                       device: str | torch.device = "cpu", **prior_args: Any) -> FactorPrior:
    """Fit a ``FactorPrior`` on training vectors (``(content (N, Dc), style (N, Ds))`` or a dict with those keys)
    and optional site indices ``domains (N,)``: statistics, then ``steps`` AdamW steps on random minibatches (with
    replacement). Deterministic for a ``seed``. Returns the prior in eval mode (``meta["train_loss"]`` = mean loss
    of the last 10% of steps)."""
    content, style = split_vectors(vectors)
    content = content.detach().float()
    style = style.detach().float() if style is not None else None
    n = content.shape[0]
    d = None
    if domains is not None:
        d = torch.as_tensor(domains).long().reshape(-1)
        if d.numel() != n:
            raise MeduetConfigError(f"domains has {d.numel()} entries for {n} vectors")
        if num_domains is None:
            num_domains = int(d.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = FactorPrior(content.shape[1], style.shape[1] if style is not None else 0, num_domains or 0, hidden,
                            depth, cond_dropout, **prior_args).to(device)
    z = prior.join((content, style) if style is not None else content).to(device)
    prior.set_statistics(z)
    if d is not None:
        d = d.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=weight_decay)
    prior.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(device)
        loss = prior.loss(z[idx], d[idx] if d is not None else None, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
    prior.meta["train_loss"] = sum(tail) / len(tail)
    return prior.eval()


def load_factor_prior(path: str | Path, device: str | torch.device = "cpu") -> FactorPrior:
    """Rebuild a ``FactorPrior`` from its saved state dict alone (architecture travels in ``_extra_state``)."""
    from meduet.networks.dit import DIFFUSION_FIX
    from meduet.networks.vae import _read_state_dict

    state = _read_state_dict(path, "factor prior", DIFFUSION_FIX)
    record = decode_record(state.get("_extra_state"))
    if record.get("kind") != FactorPrior.kind or not record.get("architecture"):
        raise MeduetConfigError(f"factor prior '{path}' has no factor-prior record (kind {record.get('kind')!r}); "
                                f"{DIFFUSION_FIX}")
    prior = FactorPrior(**record["architecture"])
    prior.load_state_dict(state, strict=True)
    return prior.to(device).eval()
