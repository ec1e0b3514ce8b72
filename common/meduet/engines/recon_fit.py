"""Test-time reconstruction of one new subject from its measurement, DisINR and its baselines in one code path.

Methods (``METHODS``):

* ``disinr``: the pretrained shared encoder-decoder pair frozen; only a new subject encoder is optimised (started
  from the ``model.pt``'s stored grid, the pretraining subjects' mean, or drawn afresh: ``subject_init``);
* ``finetune``: the pretrained network, every parameter optimised (which can forget the prior);
* ``scratch``: a per-subject INR of the same architecture from a fresh random initialisation (seeded), every
  parameter optimised;
* ``classical``: zero-filled (mri), FBP (ct) or MLEM (pet) (``Measurement.classical``-like, one call, no iteration
  of the INR).

Each INR method takes ``iterations`` Adam steps on ``meduet.losses.recon.measurement_loss`` (the measurement only) at
``learning_rate``, except ``disinr``, whose subject grid alone is fitted at ``subject_learning_rate`` (``None``: the
same ``learning_rate``; measured in bench/recon_study.py: a rate of 0.1 suits the small grid, while the whole INRs do
best at 0.01-0.03 and fine-tuning forgets at 0.1),
recording the loss of every step and, when a ``truth`` volume is given, PSNR/SSIM every ``metric_interval`` steps and
at the last one. Metrics compare the image with the truth over the truth's range (``max - min``); for PET, whose
images are relative activity (counts are scale-free), the image is first scaled to the truth's total
(``image * sum(truth) / sum(image)``), for every method alike.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.inferers import Inferer
from monai.metrics import PSNRMetric, SSIMMetric

from meduet.data.forward import fbp, mlem
from meduet.errors import MeduetConfigError
from meduet.losses.recon import MODALITIES, measurement_loss
from meduet.networks.inr import DisINR, grid_coordinates

__all__ = ["METHODS", "FitResult", "image_metrics", "classical_reconstruction", "trainable_parameters", "fit",
           "SubjectFit"]

METHODS = ("disinr", "finetune", "scratch", "classical")


@dataclass
class FitResult:
    """One reconstruction: ``image (1, 1, S1, S2, S3)`` float32 on the CPU, the loss per step, the metrics rows
    ``{"iteration", "psnr", "ssim"}`` (empty without a truth), the seconds spent, the parameters optimised."""

    method: str
    image: torch.Tensor
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    trained_parameters: int = 0
    total_parameters: int = 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "iterations": len(self.losses), "seconds": self.seconds,
                               "trained_parameters": self.trained_parameters,
                               "total_parameters": self.total_parameters,
                               "final_loss": self.losses[-1] if self.losses else None}
        if self.metrics:
            out.update(final_psnr=self.metrics[-1]["psnr"], final_ssim=self.metrics[-1]["ssim"])
        return out


def image_metrics(image: torch.Tensor, truth: torch.Tensor, modality: str) -> dict[str, float]:
    """PSNR and SSIM of ``image`` against ``truth`` (both ``(1, 1, S1, S2, S3)``; see the module docstring)."""
    image, truth = image.detach().float().cpu(), truth.detach().float().cpu()
    if modality == "pet":
        image = image * (truth.sum() / image.sum().clamp(min=1e-12))
    data_range = float(truth.max() - truth.min()) or 1.0
    psnr = PSNRMetric(max_val=data_range)(image, truth).mean().item()
    win = min(11, *truth.shape[2:])
    ssim = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win - (1 - win % 2))(image, truth)
    return {"psnr": float(psnr), "ssim": float(ssim.mean().item())}


@torch.no_grad()
def classical_reconstruction(measured: torch.Tensor, operator: torch.nn.Module, modality: str,
                             mlem_iterations: int = 20) -> torch.Tensor:
    """Zero-filled magnitude (mri), ramp FBP (ct), MLEM from a uniform start (pet): ``(1, 1, S1, S2, S3)``."""
    if modality == "mri":
        return operator.zero_filled(measured).float()
    if modality == "ct":
        return fbp(measured, operator).float()
    if modality == "pet":
        return mlem(measured.float(), operator, int(mlem_iterations)).float()
    raise MeduetConfigError(f"modality {modality!r} is not one of {MODALITIES}; fix the acquisition JSON")


def trainable_parameters(network: DisINR, method: str, subject_init: str = "mean", seed: int = 0
                         ) -> tuple[DisINR, list[torch.nn.Parameter]]:
    """The network a method optimises (a copy: the pretrained one is never changed) and its optimised parameters."""
    if method == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = type(network)(**network.arch).to(next(network.parameters()).device)
        net.meta = copy.deepcopy(dict(network.meta))
        return net, list(net.parameters())
    net = copy.deepcopy(network)
    if method == "disinr":
        net.reset_subject(subject_init, seed)
        net.requires_grad_(False)
        params = net.subject_parameters()
        for p in params:
            p.requires_grad_(True)
        return net, params
    if method == "finetune":
        net.reset_subject(subject_init, seed)
        net.requires_grad_(True)
        return net, list(net.parameters())
    raise MeduetConfigError(f"method {method!r} is not one of {METHODS}; fix --method")


def fit(network: DisINR | None, measured: torch.Tensor, operator: torch.nn.Module, modality: str, method: str,
        image_shape: Sequence[int], iterations: int = 200, learning_rate: float = 1e-2,
        truth: torch.Tensor | None = None, metric_interval: int = 10, subject_init: str = "mean", seed: int = 0,
        mlem_iterations: int = 20, subject_learning_rate: float | None = None) -> FitResult:
    """Reconstruct one subject (``measured (1, 1, *measurement_shape)`` through ``operator``) with ``method``.

    ``network``: the pretrained ``DisINR`` (``None`` only for ``classical``); ``image_shape``: the output grid (the
    acquisition's). Returns a ``FitResult`` whose image is on the CPU."""
    if method not in METHODS:
        raise MeduetConfigError(f"method {method!r} is not one of {METHODS}; fix --method")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise MeduetConfigError(f"iterations must be a positive integer, got {iterations!r}; fix --iterations")
    shape = tuple(int(s) for s in image_shape)
    start = time.perf_counter()
    if method == "classical":
        image = classical_reconstruction(measured, operator, modality, mlem_iterations).cpu()
        result = FitResult(method, image, seconds=time.perf_counter() - start)
        if truth is not None:
            result.metrics.append({"iteration": 0, **image_metrics(image, truth, modality)})
        return result
    if network is None:
        raise MeduetConfigError(f"method '{method}' needs the pretrained network; pass ckpt_path (meduet_recon's "
                                "models/model.pt) or use method 'classical'")
    net, params = trainable_parameters(network, method, subject_init, seed)
    device = next(net.parameters()).device
    operator, measured = operator.to(device), measured.to(device)
    coords = grid_coordinates(shape, device=device)
    rate = subject_learning_rate if method == "disinr" and subject_learning_rate is not None else learning_rate
    optimizer = torch.optim.Adam(params, lr=float(rate))
    result = FitResult(method, torch.empty(0), trained_parameters=sum(p.numel() for p in params),
                       total_parameters=int(network.parameter_counts()["total"]))
    net.train()
    metric_seconds = 0.0  # time spent on PSNR/SSIM, not counted in the method's seconds
    for it in range(1, iterations + 1):
        optimizer.zero_grad(set_to_none=True)
        image = net(coords).view(1, 1, *shape)
        loss = measurement_loss(operator(image), measured, modality)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite measurement loss at iteration {it} of {method}; lower the "
                                     "learning_rate")
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if truth is not None and (it % max(1, int(metric_interval)) == 0 or it == iterations):
            t0 = time.perf_counter()
            with torch.no_grad():
                now = net(coords).view(1, 1, *shape)
            result.metrics.append({"iteration": it, **image_metrics(now, truth, modality)})
            metric_seconds += time.perf_counter() - t0
    with torch.no_grad():
        result.image = net(coords).view(1, 1, *shape).float().cpu()
    result.seconds = time.perf_counter() - start - metric_seconds
    return result


class SubjectFit(Inferer):
    """The test-time reconstruction as MONAI's ``inferer`` property (``inference.json``, ``reconstruct.yaml``): the
    fitting settings; ``inferer(measurement, network, truth=None) -> FitResult`` for a
    ``meduet.data.measurements.Measurement`` (its data, forward model and image grid)."""

    def __init__(self, method: str = "disinr", iterations: int = 200, learning_rate: float = 1e-2,
                 metric_interval: int = 10, subject_init: str = "mean", seed: int = 0,
                 mlem_iterations: int = 20, subject_learning_rate: float | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise MeduetConfigError(f"method {method!r} is not one of {METHODS}; fix --method")
        self.method, self.iterations, self.learning_rate = method, iterations, learning_rate
        self.metric_interval, self.subject_init, self.seed = metric_interval, subject_init, seed
        self.mlem_iterations = mlem_iterations
        self.subject_learning_rate = subject_learning_rate

    def __call__(self, inputs: Any, network: DisINR | None, *args: Any, truth: torch.Tensor | None = None,
                 **kwargs: Any) -> FitResult:
        acq = inputs.acquisition
        return fit(network, inputs.data, inputs.operator(), acq.modality, self.method, acq.image_shape,
                   iterations=self.iterations, learning_rate=self.learning_rate, truth=truth,
                   metric_interval=self.metric_interval, subject_init=self.subject_init, seed=self.seed,
                   mlem_iterations=self.mlem_iterations, subject_learning_rate=self.subject_learning_rate)
