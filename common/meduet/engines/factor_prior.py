"""Fitting and sampling the factor prior (``meduet.networks.factor_prior.FactorPrior``): a DDPM over a case's pooled
``(content, style)`` vectors, so a factor-conditioned generator needs no reference scan.

* ``prior_loss``: epsilon-prediction MSE on raw vectors (MONAI ``DDPMScheduler``), sites dropped with the prior's
  ``cond_dropout`` for classifier-free guidance;
* ``sample_factors``: DDIM sampling (MONAI ``DDIMScheduler``), de-standardised ``(content, style)``;
* ``train_factor_prior``: the statistics and a short AdamW loop, deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from meduet.errors import MeduetConfigError
from meduet.networks.factor_prior import FactorPrior, Vectors, split_vectors

__all__ = ["prior_loss", "sample_factors", "train_factor_prior"]


def prior_loss(prior: FactorPrior, vectors: Vectors, domain: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM epsilon-prediction MSE on a batch of raw (not standardised) vectors; sites dropped with
    ``cond_dropout`` (drawn from ``generator``)."""
    scheduler = DDPMScheduler(**prior.schedule_args)
    z0 = prior.standardise(prior.join(vectors).to(prior.mean.device))
    b, dev = z0.shape[0], z0.device
    gdev = generator.device if generator is not None else dev
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator, device=gdev).to(dev)
    noise = torch.randn(z0.shape, generator=generator, device=gdev).to(dev)
    drop = None
    if domain is not None and prior.cond_dropout > 0:
        drop = (torch.rand(b, generator=generator, device=gdev) < prior.cond_dropout).to(dev)
    pred = prior(scheduler.add_noise(z0, noise, t), t, domain, drop)
    return F.mse_loss(pred, noise)


@torch.no_grad()
def sample_factors(prior: FactorPrior, n: int, domain: torch.Tensor | int | None = None,
                   generator: torch.Generator | None = None, steps: int = 50, guidance_scale: float = 1.0,
                   eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` factor vectors with DDIM (MONAI ``DDIMScheduler``): ``(content (n, Dc), style (n, Ds))``,
    de-standardised. ``domain``: one site index or ``(n,)`` indices (None = all sites, the null condition);
    ``guidance_scale`` > 1 sharpens per-site samples (classifier-free guidance)."""
    dev = prior.mean.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn((n, prior.features), generator=generator, device=gdev).to(dev)
    sched = DDIMScheduler(**prior.schedule_args)
    sched.set_timesteps(steps, device=dev)
    d = prior.domain_indices(domain, n, dev)
    was_training = prior.training
    prior.eval()
    try:
        for t in sched.timesteps:
            tb = torch.full((n,), int(t), dtype=torch.long, device=dev)
            eps = prior(z, tb, d)
            if d is not None and float(guidance_scale) != 1.0:
                eps_null = prior(z, tb, None)
                eps = eps_null + guidance_scale * (eps - eps_null)
            z, _ = sched.step(eps, int(t), z, eta=eta, generator=generator)
    finally:
        prior.train(was_training)
    return prior.split(prior.destandardise(z))


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
        loss = prior_loss(prior, z[idx], d[idx] if d is not None else None, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
    prior.meta["train_loss"] = sum(tail) / len(tail)
    return prior.eval()
