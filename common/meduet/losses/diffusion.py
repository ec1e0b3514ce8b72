"""Diffusion objectives of meduet_diffusion on latents ``x0 (B, C, S1, S2, S3)``, with MONAI's schedulers.

* ``"ddpm"`` (DiT): MONAI ``DDPMScheduler``; ``t`` uniform integers in ``[0, T)``, ``x_t = sqrt(a_t) x0 +
  sqrt(1 - a_t) eps`` (``add_noise``), the network predicts the noise ``eps`` (MSE). Sampled with MONAI's
  ``DDPMScheduler`` (all ``T`` steps) or ``DDIMScheduler`` (few steps), see ``meduet.engines.sampling``.
* ``"rflow"`` (SiT-style rectified flow): MONAI ``RFlowScheduler``; ``t`` from its ``sample_timesteps`` (integers in
  ``[0, T)`` by default, floats with ``use_discrete_timesteps=False``), ``x_t = (1 - t/T) x0 + (t/T) eps``
  (``add_noise``: ``t = 0`` is clean data, ``t = T`` pure noise), and the network predicts the velocity
  ``v = x0 - eps`` (MSE), i.e. the direction from noise *towards data*: MONAI's ``RFlowScheduler.step`` integrates
  ``x_next = x + v (t - t_next) / T`` while ``t`` decreases from ``T`` to 0, and its ``pred_original_sample`` is
  ``x + v t / T``, which equals ``x0`` exactly when ``v = x0 - eps``.

Defaults (latent diffusion, as MONAI's MAISI / LDM bundles): ``T = 1000``, the ``"scaled_linear_beta"`` schedule
with betas 0.0015 -> 0.0195, and no clipping of the predicted ``x0`` (scaled latents are not confined to [-1, 1];
MONAI's schedulers clip by default).

Options of ``"ddpm"`` that are **not in the DiT paper** (which predicts the noise, with a learned variance), off by
default (see BENCHMARKS.md, "meduet_diffusion: why DiT samples were 5x too wide"):

* ``prediction_type="v_prediction"``: the network predicts ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (MONAI's
  ``get_velocity``; Salimans & Ho 2022) and MONAI's DDPM/DDIM ``step`` recover ``x0 = sqrt(a_t) x_t - sqrt(1 - a_t)
  v``, so an error in the prediction is not multiplied by ``1 / sqrt(a_t)`` (84 at ``t = T - 1`` with the default
  schedule) when ``x0`` is estimated from it.
* ``zero_terminal_snr=True``: the betas rescaled so that ``a_{T-1} = 0`` exactly (Lin et al. 2024, "Common
  diffusion noise schedules and sample steps are flawed", Algorithm 1: shift and scale ``sqrt(a_t)`` so that its
  last value is 0 and its first unchanged), so training sees pure noise at the last timestep, which is what
  sampling starts from. Needs ``v_prediction`` (the noise cannot be told from ``x_t`` there).

``DiffusionObjective.loss`` returns ``DiffusionLoss(loss, noisy, timesteps, pred, target)``;
``validation_loss`` is deterministic for a given generator (fixed timesteps spread over the range and noise from
the generator), so validation curves are comparable across runs and objectives of the same kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from meduet.errors import MeduetConfigError, require_bool

__all__ = ["OBJECTIVES", "SAMPLERS", "PREDICTION_TYPES", "DiffusionLoss", "DiffusionObjective", "call_model",
           "rescale_zero_terminal_snr"]

#: Training objectives.
OBJECTIVES = ("ddpm", "rflow")
#: Samplers allowed for each objective (the first is the default).
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}
#: What a ``"ddpm"`` network predicts: the noise (DiT, the default) or the velocity ``v`` (not in the DiT paper).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose ``sqrt(alpha_bar)`` is shifted and scaled to end at exactly 0 and start where it started (Lin et
    al. 2024, Algorithm 1): the last training timestep is then pure noise (zero signal-to-noise ratio)."""
    b = betas.double()
    s = torch.cumprod(1.0 - b, 0).sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * first / (first - last)
    abar = s**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


class DiffusionLoss(NamedTuple):
    """One training step's loss: ``loss`` (scalar), ``noisy`` ``x_t (B, C, ...)``, ``timesteps (B,)``, and the
    network's ``pred`` and the ``target`` (both like ``x0``)."""

    loss: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor


def call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any] | None = None,
               force_drop: torch.Tensor | bool | None = None) -> torch.Tensor:
    """``model(x, t, cond[, force_drop=...])``; ``model(x, t)`` when ``cond`` is None and nothing is forced, so
    that plain ``(x, timesteps)`` networks (e.g. MONAI's ``DiffusionModelUNet``) work unconditionally."""
    if force_drop is not None:
        return model(x, t, cond, force_drop=force_drop)
    if cond is None:
        return model(x, t)
    return model(x, t, cond)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Normal noise drawn on the generator's device (CPU by default) and moved to ``like``'s device/dtype."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev).to(device=like.device, dtype=like.dtype)


class DiffusionObjective:
    """The training side of a diffusion process over latents (the network is separate).

    Args:
        objective: ``"ddpm"`` (noise prediction) or ``"rflow"`` (velocity prediction).
        num_train_timesteps: ``T``; must match the network's ``num_train_timesteps``.
        schedule, beta_start, beta_end: DDPM noise schedule (MONAI ``NoiseSchedules`` name and its arguments).
        clip_sample: clip the predicted ``x0`` to [-1, 1] in DDPM/DDIM sampling (off for latents).
        sample_method, use_discrete_timesteps, loc, scale, use_timestep_transform, base_img_size_numel:
            ``RFlowScheduler`` options (timestep distribution ``"uniform"`` or ``"logit-normal"``, integer or float
            timesteps, resolution-dependent timestep shift).
        num_val_timesteps: number of fixed timesteps ``(k + 0.5) T / K`` used by ``validation_loss``.
        prediction_type: ``"ddpm"`` only (``"rflow"`` ignores it, as it ignores the betas): ``"epsilon"`` (noise,
            DiT) or ``"v_prediction"`` (not in the paper).
        zero_terminal_snr: ``"ddpm"`` only: rescale the betas to zero terminal SNR (not in the paper; needs
            ``v_prediction``).
        clip_sample_value: with ``clip_sample``, the predicted ``x0`` is clipped to ``[-v, v]`` (scaled latent units).
    """

    def __init__(
        self,
        objective: str = "ddpm",
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        clip_sample: bool = False,
        sample_method: str = "uniform",
        use_discrete_timesteps: bool = True,
        loc: float = 0.0,
        scale: float = 1.0,
        use_timestep_transform: bool = False,
        base_img_size_numel: int = 32 * 32 * 32,
        num_val_timesteps: int = 10,
        prediction_type: str = "epsilon",
        zero_terminal_snr: bool = False,
        clip_sample_value: float = 1.0,
    ) -> None:
        if objective not in OBJECTIVES:
            raise MeduetConfigError(f"objective must be one of {list(OBJECTIVES)} (DiT = 'ddpm', SiT = 'rflow'), "
                                    f"got {objective!r}")
        if num_val_timesteps < 1:
            raise MeduetConfigError("num_val_timesteps must be >= 1")
        for key, value in (("clip_sample", clip_sample), ("zero_terminal_snr", zero_terminal_snr),
                           ("use_discrete_timesteps", use_discrete_timesteps),
                           ("use_timestep_transform", use_timestep_transform)):
            require_bool(value, key)
        if prediction_type not in PREDICTION_TYPES:
            raise MeduetConfigError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        if objective == "ddpm" and zero_terminal_snr and prediction_type != "v_prediction":
            raise MeduetConfigError("zero_terminal_snr needs prediction_type v_prediction (at zero SNR the noise cannot "
                                    "be predicted from x_t); set both")
        if float(clip_sample_value) <= 0:
            raise MeduetConfigError(f"clip_sample_value must be > 0, got {clip_sample_value!r}")
        self.prediction_type = prediction_type
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.objective = objective
        self.num_train_timesteps = int(num_train_timesteps)
        self.num_val_timesteps = int(num_val_timesteps)
        self.ddpm_args = dict(num_train_timesteps=self.num_train_timesteps, schedule=schedule, beta_start=beta_start,
                              beta_end=beta_end, clip_sample=clip_sample,
                              clip_sample_min=-float(clip_sample_value), clip_sample_max=float(clip_sample_value))
        self.rflow_args = dict(num_train_timesteps=self.num_train_timesteps, sample_method=sample_method,
                               use_discrete_timesteps=use_discrete_timesteps, loc=loc, scale=scale,
                               use_timestep_transform=use_timestep_transform, base_img_size_numel=base_img_size_numel)
        self._config = dict(objective=objective, num_train_timesteps=self.num_train_timesteps, schedule=schedule,
                            beta_start=beta_start, beta_end=beta_end, clip_sample=clip_sample,
                            sample_method=sample_method, use_discrete_timesteps=use_discrete_timesteps, loc=loc,
                            scale=scale, use_timestep_transform=use_timestep_transform,
                            base_img_size_numel=base_img_size_numel, num_val_timesteps=self.num_val_timesteps,
                            prediction_type=prediction_type, zero_terminal_snr=self.zero_terminal_snr,
                            clip_sample_value=float(clip_sample_value))
        self.scheduler = self.make_scheduler("ddpm" if objective == "ddpm" else "rflow")

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able), for the checkpoint's ``meta`` so sampling rebuilds the same process."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str) -> DiffusionObjective:
        """Inverse of ``config()``; a plain string is the objective name with defaults."""
        if isinstance(config, str):
            return cls(config)
        if isinstance(config, cls):
            return config
        return cls(**dict(config))

    def __repr__(self) -> str:
        return f"DiffusionObjective({self.objective!r}, T={self.num_train_timesteps})"

    def make_scheduler(self, sampler: str) -> DDPMScheduler | DDIMScheduler | RFlowScheduler:
        """A fresh MONAI scheduler with this process's settings: ``"ddpm"``, ``"ddim"`` or ``"rflow"``."""
        if sampler not in SAMPLERS[self.objective]:
            raise MeduetConfigError(f"sampler {sampler!r} does not fit objective '{self.objective}'; use one of "
                                    f"{list(SAMPLERS[self.objective])}")
        if sampler == "rflow":
            return RFlowScheduler(**self.rflow_args)
        cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        sched = cls(prediction_type=self.prediction_type, **self.ddpm_args)
        if self.zero_terminal_snr:
            sched.betas = rescale_zero_terminal_snr(sched.betas)
            sched.alphas = 1.0 - sched.betas
            sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
        return sched

    def check_model(self, model: nn.Module) -> None:
        """A network that records its timestep range (``arch["num_train_timesteps"]``, or ``arch["base"][...]`` for a
        ControlNet on a base generator) must share ``T``."""
        net = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
        arch = getattr(net, "arch", None)
        if isinstance(arch, Mapping) and "num_train_timesteps" not in arch and isinstance(arch.get("base"), Mapping):
            arch = arch["base"]
        t_net = arch.get("num_train_timesteps") if isinstance(arch, Mapping) else None
        if t_net is not None and int(t_net) != self.num_train_timesteps:
            raise MeduetConfigError(f"the network embeds timesteps in [0, {t_net}] but the objective has "
                                    f"num_train_timesteps={self.num_train_timesteps}; set both to the same value")

    # ------------------------------------------------------------------ pieces
    def sample_timesteps(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps ``(B,)``: DDPM uniform integers in ``[0, T)`` (from ``generator``); RFlow MONAI's
        ``RFlowScheduler.sample_timesteps`` (global RNG: MONAI takes no generator)."""
        b = x0.shape[0]
        if self.objective == "ddpm":
            dev = generator.device if generator is not None else x0.device
            return torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=dev).to(x0.device)
        return self.scheduler.sample_timesteps(x0).to(x0.device)  # type: ignore[union-attr]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` of the forward process (MONAI's ``add_noise``)."""
        return self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """What the network predicts: ``noise`` (DDPM), ``sqrt(a_t) noise - sqrt(1 - a_t) x0`` (DDPM
        ``v_prediction``, MONAI's ``get_velocity``; needs ``timesteps``) or ``x0 - noise`` (RFlow velocity)."""
        if self.objective == "rflow":
            return x0 - noise
        if self.prediction_type == "v_prediction":
            if timesteps is None:
                raise MeduetConfigError("the v_prediction target needs the timesteps")
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return noise

    # ------------------------------------------------------------------ losses
    def loss(self, model: nn.Module, x0: torch.Tensor, cond: Mapping[str, Any] | None = None,
             generator: torch.Generator | None = None,
             force_drop: torch.Tensor | bool | None = None) -> DiffusionLoss:
        """One training loss: sample ``t`` and noise, ``x_t = add_noise(x0, noise, t)``, MSE of
        ``model(x_t, t, cond)`` against ``target`` (the network drops conditions itself in training mode)."""
        if x0.ndim not in (4, 5):
            raise MeduetConfigError(f"diffusion inputs must be latents (B, C, S1, S2[, S3]), got {tuple(x0.shape)}")
        self.check_model(model)
        t = self.sample_timesteps(x0, generator)
        noise = _randn(tuple(x0.shape), generator, x0)
        noisy = self.add_noise(x0, noise, t)
        pred = call_model(model, noisy, t, cond, force_drop)
        target = self.target(x0, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        return DiffusionLoss(loss, noisy, t, pred, target)

    __call__ = loss

    def validation_timesteps(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The fixed validation timesteps ``round((k + 0.5) T / K)``, ``k = 0..K-1`` (long)."""
        k = torch.arange(self.num_val_timesteps, dtype=torch.float64)
        return ((k + 0.5) * self.num_train_timesteps / self.num_val_timesteps).round().long().to(device)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, x0: torch.Tensor, cond: Mapping[str, Any] | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic validation MSE (scalar): every sample at each of the ``validation_timesteps`` with noise
        from ``generator`` (a CPU generator seeded 0 when None), conditions never dropped; mean over timesteps.
        The model is evaluated in whatever mode it is in (conditions are forced on, so a dropout-free DiT gives the
        same value in train and eval mode)."""
        self.check_model(model)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        force = None if cond is None else False
        total = x0.new_zeros((), dtype=torch.float64)
        for t_val in self.validation_timesteps():
            t = torch.full((x0.shape[0],), int(t_val), dtype=torch.long, device=x0.device)
            noise = _randn(tuple(x0.shape), generator, x0)
            pred = call_model(model, self.add_noise(x0, noise, t), t, cond, force)
            total += F.mse_loss(pred.float(), self.target(x0, noise, t).float()).double()
        return (total / self.num_val_timesteps).float()
