"""Sampling latents from a trained diffusion network with MONAI's schedulers (no hand-written update rules).

``sample_latents(model, shape, cond, objective, sampler, num_steps, guidance_scale, generator)`` starts from
``x_T ~ N(0, I)`` of ``shape = (B, C, S1, S2, S3)`` (or from given ``noise``) and runs the scheduler's
``set_timesteps`` + ``step`` loop; each step calls ``model.forward_with_cfg(x, t (B,), cond, guidance_scale)`` when
the network has it (``meduet.networks.dit.LatentDiT``), else ``model(x, t)`` (guidance 1 only).

* ``"ddpm"`` (objective ddpm): ancestral DDPM through every training timestep. MONAI's ``DDPMScheduler.step``
  always steps from ``t`` to ``t - 1``, so fewer steps are not possible with it: use ``"ddim"`` for that.
* ``"ddim"`` (objective ddpm): DDIM with ``eta`` (0 = deterministic). MONAI's ``DDIMScheduler`` visits
  ``linspace(T-1, 0, n).round()`` but steps each one back by ``T // n``; the mismatch is small and left as MONAI
  has it.
* ``"rflow"`` (objective rflow): Euler ODE integration of the velocity from ``t = T`` (noise) to ``t = 0`` (data):
  MONAI's ``RFlowScheduler.set_timesteps(n)`` gives ``T, T - T/n, ..., T/n`` and ``step(v, t, x, t_next)`` moves
  ``x += v (t - t_next) / T``, with ``t_next = 0`` after the last one.

``invert_latents`` maps a clean latent to the noise that sampling maps back to it (deterministic): for ``rflow`` the
ODE the other way with the same MONAI ``step`` and negative increments; for ``ddpm`` DDIM inversion, each of MONAI's
DDIM steps (``eta = 0``) undone in the reverse order with the noise predicted at the step's own timestep (DDIM
encoding; MONAI's ``DDIMScheduler.reversed_step`` walks a grid that its ``set_timesteps`` does not sample, so it is
written here). Used by diffusion autoencoding, interpolation in noise space and style transfer.

Random numbers (the initial noise and DDPM/DDIM-eta noise) come from ``generator``; the initial noise is drawn on
the generator's device (CPU when None) and moved to the model's device, so a seed gives the same start on any
device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import SAMPLERS, DiffusionObjective

__all__ = ["LatentSampler", "sample_latents", "invert_latents", "ddim_invert", "predict"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any] | None,
            guidance_scale: float) -> torch.Tensor:
    """One network evaluation at timesteps ``t (B,)``, guided when the network supports it."""
    net = _unwrap(model)
    if hasattr(net, "forward_with_cfg"):
        return net.forward_with_cfg(x, t, cond, guidance_scale)
    if float(guidance_scale) != 1.0 or cond is not None:
        raise MeduetConfigError(f"{type(net).__name__} has no forward_with_cfg; sample it with cond=None and "
                                "guidance_scale=1")
    return net(x, t)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(it: Sequence[Any], enabled: bool, desc: str):
    if not enabled or os.environ.get("MEDUET_PROGRESS") == "0":
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


def _objective(objective: DiffusionObjective | Mapping[str, Any] | str) -> DiffusionObjective:
    try:
        return DiffusionObjective.from_config(objective)  # type: ignore[arg-type]
    except TypeError as e:
        raise MeduetConfigError(f"bad diffusion objective config {objective!r}: {e}") from None


class LatentSampler:
    """The sampling settings of an inference config as a component (meduet_diffusion ``inference.json``'s
    ``inferer``): ``sampler`` / ``num_steps`` (None: the defaults of ``sample_latents``) and the classifier-free
    ``guidance_scale``; ``sample(model, shape, cond, objective, generator)`` is ``sample_latents`` with them."""

    def __init__(self, sampler: str | None = None, num_steps: int | None = None, guidance_scale: float = 1.5) -> None:
        self.sampler, self.num_steps, self.guidance_scale = sampler, num_steps, float(guidance_scale)

    def sample(self, model: nn.Module, shape: Sequence[int], cond: Mapping[str, Any] | None,
               objective: DiffusionObjective | Mapping[str, Any] | str, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        return sample_latents(model, shape, cond, objective, sampler=self.sampler, num_steps=self.num_steps,
                              guidance_scale=self.guidance_scale if cond is not None else 1.0, generator=generator,
                              progress=progress)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    shape: Sequence[int],
    cond: Mapping[str, Any] | None = None,
    objective: DiffusionObjective | Mapping[str, Any] | str = "ddpm",
    sampler: str | None = None,
    num_steps: int | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    step_callback: Callable[[int, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate latents ``(B, C, S1, S2, S3)`` (in the network's scaled latent space: divide by the latent scale
    factor before the VAE decoder).

    Args:
        model: the diffusion network (``LatentDiT``, possibly DDP-wrapped); run in eval mode, mode restored after.
        shape: ``(B, C, S1, S2, S3)``.
        cond: condition dict for the network (``LatentDiT.cond_keys``, batch ``B``), or None (unconditional).
        objective: the ``DiffusionObjective`` the network was trained with (or its ``config()`` dict, or
            ``"ddpm"``/``"rflow"`` with default settings).
        sampler: ``"ddpm"``, ``"ddim"`` (objective ddpm; default ddim) or ``"rflow"`` (objective rflow).
        num_steps: sampling steps (default: ``T`` for ddpm, 50 for ddim, 30 for rflow; ddpm needs ``T``).
        guidance_scale: classifier-free guidance ``s`` (1 = plain conditional; needs a network trained with
            ``cond_dropout > 0`` to mean anything).
        generator: RNG for the initial noise and stochastic steps.
        progress: tqdm bar over the steps (off when ``MEDUET_PROGRESS=0``).
        noise: start from these ``x_T`` instead of drawing them (e.g. from ``invert_latents``).
        eta: DDIM noise weight (0 = deterministic DDIM).
        step_callback: called after every step as ``x = step_callback(i, x, x0_hat, data_weight)``: ``x`` the latents
            after step ``i`` (0-based), ``x0_hat`` the clean latents the scheduler predicted at that step (MONAI's
            ``pred_original_sample``) and ``data_weight`` the weight of the clean latents in ``x``'s marginal at its
            new time (rflow ``1 - t_next / T``; ddim / ddpm ``sqrt(alpha_bar)`` of the step's target timestep, 1 after
            the last one). A guidance step (e.g. data consistency) that changes ``x0_hat`` by ``d`` moves ``x`` by
            ``data_weight * d`` (ddim after its last step: MONAI's ``final_alpha_cumprod``). None: no call.
    """
    obj = _objective(objective)
    obj.check_model(model)
    sampler = sampler or SAMPLERS[obj.objective][0]
    if sampler not in SAMPLERS[obj.objective]:
        raise MeduetConfigError(f"sampler {sampler!r} does not fit a network trained with objective "
                                f"'{obj.objective}'; use one of {list(SAMPLERS[obj.objective])}")
    T = obj.num_train_timesteps
    if num_steps is None:
        num_steps = {"ddpm": T, "ddim": 50, "rflow": 30}[sampler]
    if sampler == "ddpm" and num_steps != T:
        raise MeduetConfigError(f"sampler 'ddpm' steps through all {T} training timesteps (MONAI's DDPMScheduler "
                                f"steps t -> t-1), got num_steps={num_steps}; use sampler 'ddim' for fewer steps")
    if not 1 <= num_steps <= T:
        raise MeduetConfigError(f"num_steps must be in [1, {T}], got {num_steps}")
    shape = tuple(int(s) for s in shape)
    device = _device(model)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise MeduetConfigError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise.to(device=device, dtype=torch.float32).clone()
    else:
        gdev = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=gdev).to(device)
    scheduler = obj.make_scheduler(sampler)
    if sampler == "rflow":
        scheduler.set_timesteps(num_steps, device=device, input_img_size_numel=int(torch.tensor(shape[2:]).prod()))
    else:
        scheduler.set_timesteps(num_steps, device=device)
    timesteps = list(scheduler.timesteps)
    b = shape[0]
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for i, t in enumerate(_progress(timesteps, progress, f"{sampler} sampling")):
            t_batch = torch.full((b,), t.item(), device=device, dtype=t.dtype)
            out = predict(model, x, t_batch, cond, guidance_scale)
            if sampler == "rflow":
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros((), dtype=t.dtype)
                x, x0_hat = scheduler.step(out, t, x, t_next)
                weight = 1.0 - float(t_next) / T
            else:
                if sampler == "ddim":
                    x, x0_hat = scheduler.step(out, int(t), x, eta=eta, generator=generator)
                    prev = int(t) - T // scheduler.num_inference_steps
                else:
                    x, x0_hat = scheduler.step(out, int(t), x, generator=generator)
                    prev = int(t) - 1
                final = getattr(scheduler, "final_alpha_cumprod", 1.0) if sampler == "ddim" else 1.0
                weight = float(torch.as_tensor(scheduler.alphas_cumprod[prev] if prev >= 0 else final).sqrt())
            if step_callback is not None:
                x = step_callback(i, x, x0_hat, weight)
    finally:
        net.train(was_training)
    return x


@torch.no_grad()
def invert_latents(
    model: nn.Module,
    x0: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    objective: DiffusionObjective | Mapping[str, Any] | str = "rflow",
    num_steps: int = 30,
    guidance_scale: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic inversion ``x0 (B, C, S1, S2, S3) -> x_T``; ``sample_latents(..., noise=x_T, num_steps=n)`` (with
    the same ``cond``; sampler ``rflow`` or ``ddim``) maps it back to about ``x0``, up to the discretisation error of
    both directions.

    * rflow: Euler steps over the reversed ``RFlowScheduler`` grid ``0, T/n, ..., T`` with MONAI's
      ``step(v, t, x, t_next)`` (``t_next > t``, so ``x += v (t - t_next) / T`` moves towards noise).
    * ddpm: DDIM inversion on MONAI's DDIM grid (``ddim_invert``).
    """
    obj = _objective(objective)
    obj.check_model(model)
    if obj.objective != "rflow":
        return ddim_invert(model, x0, cond, obj, num_steps, guidance_scale, progress)
    T = obj.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise MeduetConfigError(f"num_steps must be in [1, {T}], got {num_steps}")
    device = _device(model)
    x = x0.to(device=device, dtype=torch.float32).clone()
    scheduler = obj.make_scheduler("rflow")
    scheduler.set_timesteps(num_steps, device=device, input_img_size_numel=int(torch.tensor(x.shape[2:]).prod()))
    grid = [torch.zeros((), dtype=scheduler.timesteps.dtype, device=device)] + list(scheduler.timesteps.flip(0))
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for i in _progress(range(len(grid) - 1), progress, "rflow inversion"):
            t, t_next = grid[i], grid[i + 1]
            t_batch = torch.full((x.shape[0],), t.item(), device=device, dtype=t.dtype)
            v = predict(model, x, t_batch, cond, guidance_scale)
            x, _ = scheduler.step(v, t, x, t_next)
    finally:
        net.train(was_training)
    return x


@torch.no_grad()
def ddim_invert(model: nn.Module, x0: torch.Tensor, cond: Mapping[str, Any] | None, objective: DiffusionObjective,
                num_steps: int = 50, guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
    """DDIM inversion ``x0 -> x_T`` of a ``ddpm`` network, the exact reverse of ``sample_latents(sampler="ddim",
    eta=0)``'s steps given the predicted noise: MONAI's DDIM visits ``t_i = round(linspace(T-1, 0, n))`` and moves
    ``x`` from ``alpha_bar(t_i)`` to ``alpha_bar(t_i - T // n)`` (``final_alpha_cumprod`` below 0); here, from
    ``i = n-1`` down to 0, ``x`` at ``alpha_bar(t_i - T // n)`` goes to ``alpha_bar(t_i)`` with the noise the network
    predicts for ``(x, t_i)`` (``x0_hat = (x - sqrt(1 - a_prev) eps) / sqrt(a_prev)``,
    ``x <- sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``). The only approximation is that the noise is predicted from the
    less noisy ``x`` (DDIM encoding, as diffusion autoencoders do)."""
    T = objective.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise MeduetConfigError(f"num_steps must be in [1, {T}], got {num_steps}")
    device = _device(model)
    x = x0.to(device=device, dtype=torch.float32).clone()
    scheduler = objective.make_scheduler("ddim")
    scheduler.set_timesteps(num_steps, device=device)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    stride = T // num_steps
    v_pred = objective.prediction_type == "v_prediction"
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for t in _progress([int(t) for t in scheduler.timesteps.flip(0)], progress, "ddim inversion"):
            a_t = alphas[t]
            a_prev = alphas[t - stride] if t - stride >= 0 else final
            out = predict(model, x, torch.full((x.shape[0],), t, device=device, dtype=torch.long), cond,
                          guidance_scale)
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x if v_pred else out
            x0_hat = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps
    finally:
        net.train(was_training)
    return x
