"""VAE-GAN training for the meduet_vae bundle, as a MONAI ``Trainer`` (an ignite engine).

One iteration: reconstruct a batch of crops, generator loss = L1 + ``kl_weight`` * KL
(+ ``perceptual_weight`` * perceptual when a perceptual loss is given) (+ ``adv_weight`` * patch adversarial loss
after ``adv_warmup_iterations``), optimiser step with gradient clipping; then, once adversarial training is on,
one discriminator step on the detached reconstruction and the real crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import default_metric_cmp_fn
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from torch.utils.data import DataLoader

from meduet.engines.checkpoint import unwrap
from meduet.errors import MeduetConfigError, require_bool
from meduet.engines.trainer import MeduetTrainer, NonFiniteLossError
from meduet.latent import LatentSpace
from meduet.metrics.features import MedicalNetFeatures
from meduet.networks.vae import MeduetVAE, PatchEncoding, reconstruct_patchwise

__all__ = [
    "VAEGANTrainer",
    "kl_divergence",
    "prepare_reconstruction_batch",
    "ReconstructionInferer",
    "NonFiniteLossError",
    "refresh_vae_meta",
    "DecoderFinetuneTrainer",
    "decoder_parameters",
    "MedicalNetPerceptualLoss",
    "build_perceptual_loss",
    "check_paper_weights",
    "PERCEPTUAL_DOC",
    "MAISI_WEIGHTS_DOC",
]

logger = logging.getLogger(__name__)

#: where the docs say to get the weights (one-line errors point here)
MAISI_WEIGHTS_DOC = "meduet_vae's docs/README.md, 'Using MAISI's pretrained CT autoencoder'"
PERCEPTUAL_DOC = "meduet_vae's docs/README.md, 'The perceptual term from local weights'"


class MedicalNetPerceptualLoss(torch.nn.Module):
    """A 3D perceptual distance from a local MedicalNet ResNet file (never downloaded), as MONAI's
    ``PerceptualLoss(network_type="medicalnet_resnet10_23datasets", is_fake_3d=False)`` computes it: each volume
    z-scored, the ResNet's last feature map, unit-normalised over channels, squared difference averaged over space
    and summed over channels, averaged over the batch. Not MAISI's network (MAISI's recipe uses LPIPS SqueezeNet on
    2D slices, ``network: squeeze``); an option for hosts without torchvision/lpips.

    ``weights_path``: a MedicalNet ``.pth`` (``meduet.metrics.features.MedicalNetFeatures``); ``depth``: its ResNet.
    """

    def __init__(self, weights_path: str, depth: int = 10) -> None:
        super().__init__()
        self.net = MedicalNetFeatures(weights_path, depth=depth).net.requires_grad_(False).eval()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        x = (x - mean) / x.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        diff = (self._features(input.float()) - self._features(target.float())).pow(2)
        return diff.mean(dim=(2, 3, 4)).sum(dim=1).mean()


def build_perceptual_loss(weights: str | None, network: str = "squeeze", fake_3d_ratio: float = 0.2,
                          depth: int = 10) -> torch.nn.Module | None:
    """The perceptual term from local weights, or None (no term) when ``weights`` is None. Nothing is downloaded.

    ``network="squeeze"`` (MAISI's recipe): MONAI's ``PerceptualLoss(network_type="squeeze", is_fake_3d=True,
    fake_3d_ratio)`` (LPIPS on 2D slices); ``weights`` is a local torch hub directory holding torchvision's
    SqueezeNet 1.1 file under ``checkpoints/`` (needs the ``lpips`` and ``torchvision`` packages).
    ``network="medicalnet"`` (not MAISI's): ``MedicalNetPerceptualLoss(weights, depth)``, ``weights`` a MedicalNet
    ``.pth`` file.
    """
    if weights is None or str(weights) == "":
        return None
    path = Path(str(weights))
    if network == "medicalnet":
        return MedicalNetPerceptualLoss(str(path), depth)
    if network != "squeeze":
        raise MeduetConfigError(f"perceptual_network must be 'squeeze' (MAISI's) or 'medicalnet', got {network!r}")
    found = sorted(path.glob("checkpoints/squeezenet1_1-*.pth")) if path.is_dir() else []
    if not found:
        raise MeduetConfigError(f"perceptual_weights '{path}' is not a torch hub directory with "
                                f"checkpoints/squeezenet1_1-*.pth; see {PERCEPTUAL_DOC}")
    import importlib.util

    missing = [m for m in ("lpips", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        raise MeduetConfigError(f"perceptual_network 'squeeze' needs the packages {missing} (pip install "
                                f"{' '.join(missing)}), or set perceptual_network: medicalnet; see {PERCEPTUAL_DOC}")
    from monai.losses import PerceptualLoss

    return PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True, fake_3d_ratio=fake_3d_ratio,
                          cache_dir=str(path)).eval()


def check_paper_weights(required: bool, allow_missing: bool, pretrained_ckpt: str | None,
                        perceptual_weights: str | None, perceptual_loss: Any = None) -> bool:
    """The paper preset trains from MAISI's published weights with a perceptual term; both need local files.
    With ``required`` (paper.yaml) and either missing: a one-line ``MeduetConfigError`` naming the keys, unless
    ``allow_missing`` (``allow_missing_paper_weights: True``), which logs one warning naming what is not the paper.
    Returns True when the run is the paper's in these two respects."""
    require_bool(required, "paper_weights_required")
    require_bool(allow_missing, "allow_missing_paper_weights")
    missing = []
    if not pretrained_ckpt:
        missing.append(f"pretrained_ckpt (MAISI's CT autoencoder file; {MAISI_WEIGHTS_DOC})")
    if not perceptual_weights and perceptual_loss is None:
        missing.append(f"perceptual_weights (the perceptual network's local weights; {PERCEPTUAL_DOC})")
    if not required or not missing:
        return not missing
    if not allow_missing:
        raise MeduetConfigError("the paper preset needs local weights: set " + " and ".join(missing)
                                + ", or set allow_missing_paper_weights: True to train without them (not the paper)")
    what = [m.split(" ", 1)[0] for m in missing]
    notpaper = {"pretrained_ckpt": "random initial weights instead of MAISI's",
                "perceptual_weights": "no perceptual term (perceptual_weight has no effect)"}
    logger.warning("allow_missing_paper_weights: not the paper: %s", "; ".join(notpaper[w] for w in what))
    return False


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def prepare_reconstruction_batch(
    batchdata: dict[str, torch.Tensor], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """For MONAI evaluators: the target of a reconstruction is the image itself."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
    return image, image


class ReconstructionInferer(Inferer):
    """Image -> latent mean -> image; whole volume or patch-wise (``patch_size``) encoding, whole-volume decoding."""

    def __init__(self, patch_size: Sequence[int] | int | None = None, overlap: float = 0.0) -> None:
        self.patch_size = patch_size
        self.overlap = overlap

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        vae = unwrap(network)
        out = reconstruct_patchwise(vae, inputs, patch_size=self.patch_size, overlap=self.overlap)  # type: ignore[arg-type]
        if isinstance(inputs, MetaTensor):  # same grid as the input: keep its meta so outputs can be inverted/saved
            out = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out).copy_meta_from(inputs)
        return out


class VAEGANTrainer(MeduetTrainer):
    """KL-autoencoder + patch discriminator trainer.

    Args:
        device: torch device.
        max_epochs: epochs to run.
        train_data_loader: yields dicts with ``image`` of shape ``(B, C, H, W, D)``.
        network: the ``MeduetVAE`` (possibly DDP-wrapped).
        optimizer: generator optimiser.
        discriminator, d_optimizer: ``monai.networks.nets.PatchDiscriminator`` and its optimiser; ``None``
            trains a plain KL-autoencoder.
        kl_weight, adv_weight, perceptual_weight: loss weights.
        adv_warmup_iterations: iterations before the adversarial terms switch on.
        perceptual_loss: e.g. ``monai.losses.PerceptualLoss`` built from local weights; ``None`` (default) = off.
        grad_clip: max gradient norm (``None`` = no clipping).
        lr_scheduler, d_lr_scheduler: stepped once per iteration.
        amp: bf16 autocast on CUDA (ignored on CPU).
        train_handlers: MONAI/ignite handlers (``attach(engine)``).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.1,
        perceptual_weight: float = 0.3,
        adv_warmup_iterations: int = 0,
        perceptual_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        grad_clip: float | None = 1.0,
        lr_scheduler: Any = None,
        d_lr_scheduler: Any = None,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        non_blocking: bool = False,
        inferer: Inferer | None = None,
    ) -> None:
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
            grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
            non_blocking=non_blocking, key_metric=key_train_metric, additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn, inferer=inferer,
        )
        if (discriminator is None) != (d_optimizer is None):
            raise ValueError("discriminator and d_optimizer must be given together")
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.kl_weight = kl_weight
        self.adv_weight = adv_weight
        self.perceptual_weight = perceptual_weight
        self.adv_warmup_iterations = adv_warmup_iterations
        self.perceptual_loss = perceptual_loss
        self.d_lr_scheduler = d_lr_scheduler
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.l1 = torch.nn.L1Loss()
        self._latent_sum = 0.0
        self._latent_sq = 0.0
        self._latent_n = 0
        self.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset_latent_stats())

    def latent_std(self) -> float | None:
        """Standard deviation of the latent means seen since the last reset (``None`` before any)."""
        if self._latent_n == 0:
            return None
        mean = self._latent_sum / self._latent_n
        return math.sqrt(max(self._latent_sq / self._latent_n - mean * mean, 1e-12))

    def reset_latent_stats(self) -> None:
        self._latent_sum, self._latent_sq, self._latent_n = 0.0, 0.0, 0

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        adv_on = self.discriminator is not None and engine.state.iteration > self.adv_warmup_iterations

        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            recon, z_mu, z_sigma = self.inferer(images, self.network)
            rec = self.l1(recon.float(), images)
            kl = kl_divergence(z_mu.float(), z_sigma.float())
            loss_g = rec + self.kl_weight * kl
            terms = {"rec": rec, "kl": kl}
            if self.perceptual_loss is not None:
                p = self.perceptual_loss(recon.float(), images)
                loss_g = loss_g + self.perceptual_weight * p
                terms["perceptual"] = p
            if adv_on:
                logits_fake = self.discriminator(recon.contiguous().float())[-1]  # type: ignore[misc]
                g_adv = self.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
                loss_g = loss_g + self.adv_weight * g_adv
                terms["adv_g"] = g_adv
        self.check_finite(engine, total=loss_g, **terms)
        self.optimizer_step(loss_g)

        if adv_on:
            self.discriminator.train()  # type: ignore[union-attr]
            self.d_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            with self.autocast():
                # one forward over [fake; real] (instance norm keeps samples apart): DDP allows one pass per backward
                both = torch.cat([recon.detach().float(), images], dim=0).contiguous()
                logits_fake, logits_real = self.discriminator(both)[-1].chunk(2, dim=0)  # type: ignore[misc]
                d_fake = self.adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                d_real = self.adv_loss(logits_real, target_is_real=True, for_discriminator=True)
                loss_d = self.adv_weight * 0.5 * (d_fake + d_real)
            self.check_finite(engine, discriminator=loss_d)
            loss_d.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.grad_clip)  # type: ignore[union-attr]
            self.d_optimizer.step()  # type: ignore[union-attr]
            terms["d"] = loss_d
        if self.d_lr_scheduler is not None and self.d_optimizer is not None:
            self.d_lr_scheduler.step()

        with torch.no_grad():
            zm = z_mu.detach().float()
            self._latent_sum += float(zm.sum())
            self._latent_sq += float(zm.pow(2).sum())
            self._latent_n += zm.numel()
        losses = {k: float(v.detach()) for k, v in terms.items()}
        losses["total"] = float(loss_g.detach())
        return {"image": images, "pred": recon.detach(), "loss": loss_g.detach(), "losses": losses}


def refresh_vae_meta(vae: torch.nn.Module, trainer: VAEGANTrainer | None = None, **meta: Any) -> None:
    """Write what the next stage needs into the VAE's checkpoint record (latent scale factor = 1/std)."""
    net: MeduetVAE = unwrap(vae)  # type: ignore[assignment]
    if trainer is not None:
        std = trainer.latent_std()
        if std is not None:
            net.meta.update(LatentSpace.measured(std))
    for k, v in meta.items():
        net.meta[k] = v
    record = json.dumps({"architecture": net.architecture, "preprocessing": net.meta.get("preprocessing")}, sort_keys=True)
    net.meta["config_hash"] = hashlib.sha256(record.encode()).hexdigest()[:16]


class DecoderFinetuneTrainer(MeduetTrainer):
    """3D MedDiffusion's second VAE stage: frozen encoder, decoder fine-tuned on patch-wise encoded volumes.

    Each iteration encodes whole volumes (or large crops) patch by patch with one ``PatchEncoding`` (``patch_size``,
    ``overlap``, ``mode``; 3D MedDiffusion: independent patches, no overlap), decodes the assembled latent in one
    pass and minimises L1 to the input, so that decoding a stitched latent shows no seams at patch borders. The
    scheme is stored in the VAE's record (``refresh_vae_meta(..., patch_encoding=scheme.record())`` in
    train_decoder.yaml), from which ``encode.yaml`` caches latents exactly the same way.

    Args:
        network: the ``MeduetVAE``; its encoder is frozen here.
        optimizer: over the decoder's parameters (``decoder_parameters(network)``).
        patch_size, overlap, mode: the patch-wise encoding (``meduet.networks.vae.PatchEncoding``), or
        patch_encoding: the scheme itself (replaces the three).
        other args as ``VAEGANTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        patch_size: Sequence[int] | int = 64,
        grad_clip: float | None = 1.0,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        inferer: Inferer | None = None,
        overlap: float = 0.0,
        mode: str = "constant",
        patch_encoding: PatchEncoding | None = None,
    ) -> None:
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, grad_clip=grad_clip,
            epoch_length=epoch_length, amp=amp, train_handlers=train_handlers, inferer=inferer,
        )
        self.patch_encoding = patch_encoding or PatchEncoding(patch_size, overlap, mode)
        self.patch_size = self.patch_encoding.patch_size
        vae = unwrap(network)
        for p in vae.encoder.parameters():
            p.requires_grad_(False)
        if hasattr(vae, "quant_conv_mu"):
            for m in (vae.quant_conv_mu, vae.quant_conv_log_sigma):
                for p in m.parameters():
                    p.requires_grad_(False)

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        images = batchdata["image"].to(engine.state.device)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        vae = unwrap(self.network)
        vae.eval()  # no dropout/batch statistics in MAISI's VAE; eval keeps the frozen encoder deterministic
        with torch.no_grad():
            z = self.patch_encoding.encode(vae, images)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            recon = self.patch_encoding.decode(vae, z)  # one decoder call unless the scheme has decode_window
            loss = torch.nn.functional.l1_loss(recon.float(), images)
        self.check_finite(engine, decoder=loss)
        self.optimizer_step(loss, decoder_parameters(vae))
        value = float(loss.detach())
        return {"image": images, "pred": recon.detach(), "loss": loss.detach(), "losses": {"rec": value, "total": value}}


def decoder_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that decoder fine-tuning trains: ``post_quant_conv`` and the decoder."""
    vae = unwrap(network)
    params = list(vae.decoder.parameters())
    if hasattr(vae, "post_quant_conv"):
        params += list(vae.post_quant_conv.parameters())
    return params
