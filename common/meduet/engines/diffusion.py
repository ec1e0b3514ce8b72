"""Training pieces of meduet_diffusion: conditions from a batch, the network builder, the trainer, the validation
loss handler and the factor prior fit.

* ``Conditioner``: turns a batch of scaled latent crops (+ their items' facts) into the network's ``cond`` dict:
  ``none`` -> ``None``; ``metadata`` -> ``{"domain": (B,), "metadata": (B, k)}``; ``factors`` -> pooled ``content``
  ``(B, Dc)`` / ``style`` ``(B, Ds)`` and optionally ``content_map`` ``(B, Dc, g1, g2, g3)`` from meduet_pretrain's
  frozen encoder applied to the clean latent, by sliding windows of its pretraining crop (the ViT does not
  generalise to token grids it was not trained on); ``semantic`` -> ``{"x0": clean latents}``, which the network's
  own semantic encoder (trained with it, LDAE) turns into a code.
* ``build_diffusion_network``: a ``LatentDiT`` (or 3D MedDiffusion's dual-flow ``LatentDualFlow``, train.yaml
  ``backbone``) whose condition sizes come from the conditioner and whose record
  carries what sampling needs (latent scale factor, channels, domains, crop, objective, condition, VAE hash).
* ``DiffusionTrainer``: MONAI ``Trainer`` step = objective loss (DDPM noise / RFlow velocity), finite check,
  optimiser + schedule step, EMA generator update.
* ``ValidationLoss``: deterministic validation denoising loss of the EMA generator on fixed validation crops every
  ``interval`` epochs -> ``engine.state.metrics["val_loss"]``, TensorBoard and ``<output_dir>/val_loss.jsonl``.
* ``fit_factor_prior``: the (content, style) prior for generation without a reference scan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.inferers import Inferer
from monai.transforms import RandSpatialCrop, ResizeWithPadOrCrop
from torch.utils.data import DataLoader

from meduet import records
from meduet.engines.checkpoint import atomic_save
from meduet.engines.ema import EMATeacher
from meduet.engines.factor_prior import train_factor_prior
from meduet.engines.trainer import MeduetTrainer
from meduet.errors import MeduetConfigError, require_bool
from meduet.latent import LatentDatalist, LatentSpace, latent_record, load_latent
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dualflow import BACKBONES, build_backbone
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.factors import pool_style
from meduet.networks.windows import crop_size_of, factor_map, pad_for_windows, sliding_windows

__all__ = ["FactorPriorFit", "Conditioner", "build_conditioner", "build_diffusion_network", "DiffusionTrainer",
           "ValidationLoss",
           "fit_factor_prior", "metadata_vector", "diffusion_items", "diffusion_record", "center_crop_or_pad"]

CONDITIONS = ("none", "metadata", "factors", "semantic")


def metadata_vector(item: Mapping[str, Any], keys: Sequence[str]) -> list[float]:
    """Numeric facts of a datalist item (scalars or lists, e.g. ``spacing``) concatenated, for ``metadata``."""
    out: list[float] = []
    for k in keys:
        if k not in item:
            raise MeduetConfigError(f"metadata key '{k}' is missing from a datalist item ({sorted(item)}); "
                                    "remove it from `metadata_keys` or add it to every item")
        v = item[k]
        out += [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return out


def diffusion_items(latent_datalist: str, split: str, metadata_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Items of a split of meduet_vae's latent datalist: the keys training reads (absolute ``latent`` path,
    ``domain``, ``domain_index``) and a ``metadata`` vector when ``metadata_keys`` are given. Other keys
    (a label path, per-case attributes) are left out, so items of splits that carry different keys (the unlabelled
    pretraining pool, a longitudinal cohort) collate into one batch."""
    out = []
    for it in LatentDatalist(latent_datalist).items(split):
        row = {k: it[k] for k in ("latent", "domain", "domain_index") if k in it}
        if metadata_keys:
            row["metadata"] = np.asarray(metadata_vector(it, metadata_keys), dtype=np.float32)
        out.append(row)
    return out


class Conditioner(nn.Module):
    """Batch -> ``cond`` dict of ``LatentDiT`` (see the module docstring).

    Args:
        condition: ``"none"``, ``"metadata"``, ``"factors"`` or ``"semantic"``.
        encoder: for ``factors``: meduet_pretrain's encoder (``PretrainedEncoder``, its ``model.pt``:
            ``meduet.records.load_part``; a whole ``MeDUET`` / masked-autoencoder network works too), frozen and in
            eval mode.
        crop: the encoder's pretraining crop (default its record's).
        content_map: also return the content token map.
        metadata_keys: item keys concatenated into ``cond["metadata"]`` (``metadata``).
    """

    def __init__(self, condition: str = "none", encoder: nn.Module | None = None, crop: Sequence[int] | None = None,
                 content_map: bool = False, metadata_keys: Sequence[str] = ()) -> None:
        super().__init__()
        if condition not in CONDITIONS:
            raise MeduetConfigError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if condition == "factors" and encoder is None:
            raise MeduetConfigError("condition 'factors' needs meduet_pretrain's model.pt (key pretrain_ckpt)")
        self.condition = condition
        self.metadata_keys = list(metadata_keys)
        self.content_map = bool(content_map) and condition == "factors"
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False).eval()
            self.crop = tuple(int(c) for c in (crop or crop_size_of(encoder)))
            self.content_dim = int(encoder.dim)
            # the pooled style vector's width (Ds, or 2 Ds for style_pool mean_std); the map keeps Ds channels
            self.style_dim = int(getattr(encoder, "style_vector_dim", 0) or 0)
            self.style_pool = getattr(encoder, "style_pool", "mean")
        else:
            self.crop, self.content_dim, self.style_dim = None, 0, 0

    def train(self, mode: bool = True) -> Conditioner:  # the encoder stays frozen in eval mode
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    @torch.no_grad()
    def factors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled factors (and the content map) of scaled latents ``x (B, C, S1, S2, S3)``."""
        enc = self.encoder
        z, _ = pad_for_windows(x.float(), int(enc.patch_size), self.crop)
        fmap = sliding_windows(z, self.crop, lambda t: factor_map(enc, t))
        content = fmap[:, : self.content_dim]
        out = {"content": content.flatten(2).mean(2)}
        if self.style_dim:
            out["style"] = pool_style(fmap[:, self.content_dim:].flatten(2).transpose(1, 2), None, self.style_pool)
        if self.content_map:
            out["content_map"] = content
        return out

    def forward(self, x: torch.Tensor, batch: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
        if self.condition == "none":
            return None
        if self.condition == "factors":
            return self.factors(x)
        if self.condition == "semantic":  # the network encodes it (its encoder is trained with it)
            return {"x0": x}
        batch = batch or {}
        if "domain_index" not in batch:
            raise MeduetConfigError("condition 'metadata' needs each item's domain_index (a latent datalist item)")
        cond = {"domain": torch.as_tensor(batch["domain_index"]).long().view(-1).to(x.device)}
        if self.metadata_keys:
            meta = batch["metadata"]
            if isinstance(meta, (list, tuple)):  # collated per position: B-vectors -> (B, k)
                meta = torch.stack([torch.as_tensor(m) for m in meta], dim=1)
            cond["metadata"] = torch.as_tensor(meta).float().view(x.shape[0], -1).to(x.device)
        return cond


def build_conditioner(condition: str, pretrain_ckpt: str | None = None, latents: Mapping[str, Any] | None = None,
                      content_map: bool = False, metadata_keys: Sequence[str] = (),
                      device: str | torch.device = "cpu") -> Conditioner:
    """A ``Conditioner``; for ``factors`` the encoder is loaded from ``pretrain_ckpt`` and checked against the
    latent cache (same VAE)."""
    require_bool(content_map, "content_map")
    encoder = None
    if condition == "factors":
        if not pretrain_ckpt:
            raise MeduetConfigError("condition 'factors' needs pretrain_ckpt (meduet_pretrain's model.pt)")
        encoder = records.load_part(pretrain_ckpt, PretrainedEncoder, device)
        if latents is not None:
            LatentSpace.from_record(encoder.meta, pretrain_ckpt).check_same(
                LatentSpace.from_record(latents, "the latent datalist"), pretrain_ckpt, "the latent datalist")
    return Conditioner(condition, encoder, content_map=content_map, metadata_keys=metadata_keys).to(device)


def diffusion_record(latents: Mapping[str, Any], crop_size: Sequence[int], objective: DiffusionObjective,
                     conditioner: Conditioner, pretrain_ckpt: str | None = None) -> dict[str, Any]:
    """What a trained generator records besides its architecture: the latent cache's facts, the crop, objective,
    condition and (for metadata) per-site means."""
    extra: dict[str, Any] = {
        "crop_size": [int(c) for c in crop_size],
        "objective": objective.config(),
        "condition": conditioner.condition,
        "metadata_keys": conditioner.metadata_keys,
    }
    if conditioner.condition == "factors":
        extra["pretrain_ckpt"] = str(pretrain_ckpt)
        extra["pretrain_crop"] = list(conditioner.crop)
        extra["pretrain_kind"] = getattr(conditioner.encoder, "kind", "")
    if conditioner.metadata_keys:  # per-site means of the metadata, so sampling a site needs no reference item
        by_site: dict[str, list[list[float]]] = {}
        for it in latents.get("training") or []:
            by_site.setdefault(str(it.get("domain")), []).append(metadata_vector(it, conditioner.metadata_keys))
        every = [v for vs in by_site.values() for v in vs]
        extra["metadata_by_site"] = {s: [float(x) for x in torch.tensor(vs).mean(0)] for s, vs in by_site.items()}
        extra["metadata_mean"] = [float(x) for x in torch.tensor(every).mean(0)] if every else []
    for key in ("labels", "heldout_domains", "downsample_factor"):
        if key in latents:
            extra[key] = latents[key]
    return latent_record(dict(latents), **extra)


def build_diffusion_network(preset: str, latents: Mapping[str, Any], conditioner: Conditioner,
                            objective: DiffusionObjective, crop_size: Sequence[int], cond_dropout: float = 0.1,
                            init_from_pretrained: bool = False, pretrain_ckpt: str | None = None,
                            backbone: str = "dit", **overrides: Any) -> nn.Module:
    """``LatentDiT`` (``backbone="dit"``) or ``LatentDualFlow`` (``"dualflow"``, 3D MedDiffusion's dual-flow
    denoiser) sized by ``preset`` (+ ``overrides``) for the latent cache and the conditioner, with its record in
    ``.meta``; ``init_from_pretrained`` copies the pretrained latent ViT's blocks into the DiT (dit only)."""
    require_bool(init_from_pretrained, "init_from_pretrained")
    if backbone not in BACKBONES:
        raise MeduetConfigError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}; set train.yaml's "
                                "backbone")
    if backbone == "dualflow" and init_from_pretrained:
        raise MeduetConfigError("init_from_pretrained copies the latent ViT into a DiT; set it false for backbone "
                                "dualflow")
    kw: dict[str, Any] = dict(in_channels=int(latents["latent_channels"]), input_size=list(crop_size),
                              condition=conditioner.condition, cond_dropout=float(cond_dropout),
                              num_train_timesteps=objective.num_train_timesteps)
    if conditioner.condition == "metadata":
        kw["num_domains"] = len(latents["domains"])
        if conditioner.metadata_keys:
            items = latents.get("training") or []
            if not items:
                raise MeduetConfigError("metadata_keys need a training split in the latent datalist")
            kw["num_metadata_scalars"] = len(metadata_vector(items[0], conditioner.metadata_keys))
    elif conditioner.condition == "factors":
        kw.update(content_dim=conditioner.content_dim, style_dim=conditioner.style_dim,
                  content_map=conditioner.content_map)
    kw.update(overrides)
    net = build_backbone(backbone, preset, **kw)
    if init_from_pretrained:
        source = conditioner.encoder if conditioner.encoder is not None else (
            records.load_part(pretrain_ckpt, PretrainedEncoder) if pretrain_ckpt else None)
        if source is None:
            raise MeduetConfigError("init_from_pretrained needs pretrain_ckpt (meduet_pretrain's model.pt)")
        net.init_from_pretrained(source)
    net.meta = diffusion_record(latents, crop_size, objective, conditioner, pretrain_ckpt)
    return net


class DiffusionTrainer(MeduetTrainer):
    """Latent diffusion training as an ignite engine.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers: as MONAI's ``Trainer``; batches are
            dicts with ``latent`` ``(B, C, S1, S2, S3)`` (cached, unscaled), ``domain_index`` and, for metadata
            keys, ``metadata``.
        network: ``LatentDiT`` (possibly DDP-wrapped).
        optimizer: e.g. AdamW(lr 1e-4, weight decay 0).
        objective: ``DiffusionObjective`` (DDPM noise or RFlow velocity).
        conditioner: ``Conditioner`` giving the network's ``cond``.
        ema: the EMA generator (``EMATeacher`` with a constant momentum), updated after every step.
        latent_space: the VAE's latent space (``meduet.latent.LatentSpace``): scales the cached latents before the
            network sees them.
        lr_scheduler, grad_clip, amp: as ``MeduetTrainer``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: DataLoader,
                 network: nn.Module, optimizer: torch.optim.Optimizer, objective: DiffusionObjective,
                 conditioner: Conditioner, ema: EMATeacher | None = None, latent_space: LatentSpace | None = None,
                 lr_scheduler: Any = None, grad_clip: float | None = 1.0, epoch_length: int | None = None,
                 amp: bool = False, train_handlers: Sequence | None = None, inferer: Inferer | None = None) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
                         grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
                         inferer=inferer)
        self.objective = objective
        self.conditioner = conditioner
        self.ema = ema
        self.latent_space = latent_space or LatentSpace(1.0)

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = batchdata["latent"].to(engine.state.device, non_blocking=engine.non_blocking)
        x = self.latent_space.scale(x.as_tensor() if hasattr(x, "as_tensor") else x)
        step = int(engine.state.iteration) - 1
        cond = self.conditioner(x, batchdata)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.objective.loss(self.network, x, cond)
        loss = out.loss.float()
        self.check_finite(engine, diffusion=loss)
        lr = self.optimizer_step(loss)
        losses = {"diffusion": float(loss.detach()), "lr": lr}
        if self.ema is not None:
            losses["ema_momentum"] = float(self.ema.update(self.network, step, self.total_steps))
        return {"loss": loss.detach(), "losses": losses}


def center_crop_or_pad(z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(C, *S)`` -> ``(C, *size)``: centre crop where larger, edge-replicate pad where smaller."""
    return torch.as_tensor(ResizeWithPadOrCrop(list(size), mode="replicate")(z))


class ValidationLoss:
    """Ignite handler: every ``interval`` epochs (and at the end) the validation denoising loss of ``network``
    (normally the EMA generator's module) on fixed centre crops of ``latents`` with fixed noise and timesteps, so
    curves of different runs compare. Stores ``engine.state.metrics["val_loss"]`` and appends
    ``{"epoch", "iteration", "val_loss"}`` to ``<output_dir>/val_loss.jsonl`` (rank 0)."""

    def __init__(self, network: nn.Module | EMATeacher, objective: DiffusionObjective, conditioner: Conditioner,
                 items: Sequence[Mapping[str, Any]], latent_space: LatentSpace, crop_size: Sequence[int],
                 output_dir: str | None = None, interval: int = 1, seed: int = 0, max_items: int = 16,
                 summary_writer: Any = None) -> None:
        self.network = network.module if isinstance(network, EMATeacher) else network
        self.objective = objective
        self.conditioner = conditioner
        self.interval = max(1, int(interval))
        self.seed = int(seed)
        self.path = Path(output_dir) / "val_loss.jsonl" if output_dir else None
        self.writer = summary_writer
        items = list(items)[:max_items]
        if not items:
            raise MeduetConfigError("ValidationLoss needs at least one validation latent")
        self.x = torch.stack([center_crop_or_pad(load_latent(it["latent"]), crop_size) for it in items])
        self.x = latent_space.scale(self.x)
        self.batch = {"domain_index": torch.tensor([int(it.get("domain_index", 0)) for it in items])}
        keys = conditioner.metadata_keys
        if keys:
            self.batch["metadata"] = torch.tensor(np.stack([  # diffusion_items carry the vector, raw items the keys
                np.asarray(it["metadata"] if "metadata" in it else metadata_vector(it, keys), dtype=np.float32)
                for it in items]))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        self._first = True

    def _keep_earlier(self, epoch: int) -> None:
        """First write of this process: drop rows of epochs >= ``epoch`` (a fresh run starts a new curve, a resumed
        run continues the old one without duplicates)."""
        if self.path is None or not self.path.exists():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in rows if int(json.loads(ln).get("epoch", 0)) < epoch]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    @torch.no_grad()
    def compute(self) -> float:
        dev = next(self.network.parameters()).device
        x = self.x.to(dev)
        cond = self.conditioner(x, {k: v.to(dev) for k, v in self.batch.items()})
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        was = self.network.training
        self.network.eval()
        try:
            return float(self.objective.validation_loss(self.network, x, cond, generator=gen))
        finally:
            self.network.train(was)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if epoch % self.interval and epoch != int(engine.state.max_epochs):
            return
        value = self.compute()
        engine.state.metrics["val_loss"] = value
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            if getattr(self, "_first", False):
                self._first = False
                self._keep_earlier(epoch)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"epoch": epoch, "iteration": int(engine.state.iteration),
                                        "val_loss": value}) + "\n")
            if self.writer is not None:
                self.writer.add_scalar("val_loss", value, int(engine.state.iteration))


def fit_factor_prior(conditioner: Conditioner, items: Sequence[Mapping[str, Any]], latent_space: LatentSpace,
                     crop_size: Sequence[int], path: str, crops_per_latent: int = 8, steps: int = 500,
                     per_site: bool = True, num_domains: int | None = None, seed: int = 0,
                     enabled: bool = True) -> str | None:
    """Fit the (content, style) factor prior on pooled factors of random crops of the training latents and write it
    atomically to ``path`` (``models/factor_prior.pt``); per-site (conditioned on ``domain_index``) by default.
    Does nothing (returns ``None``) unless the condition is ``factors`` and ``enabled``."""
    if conditioner.condition != "factors" or not enabled:
        return None
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return None  # rank 0 fits and writes it
    cropper = RandSpatialCrop(list(crop_size), random_size=False)
    cropper.set_random_state(seed)
    content, style, domains = [], [], []
    dev = next(conditioner.encoder.parameters()).device
    for it in items:
        z = load_latent(it["latent"])
        z = center_crop_or_pad(z, [max(int(s), int(c)) for s, c in zip(z.shape[1:], crop_size)])
        crops = torch.stack([torch.as_tensor(cropper(z)) for _ in range(crops_per_latent)]).float()
        f = conditioner.factors(latent_space.scale(crops.to(dev)))
        content.append(f["content"].cpu())
        if "style" in f:
            style.append(f["style"].cpu())
        domains += [int(it.get("domain_index", 0))] * crops_per_latent
    vectors = (torch.cat(content), torch.cat(style) if style else None)
    prior = train_factor_prior(vectors, torch.tensor(domains) if per_site else None, steps=steps, seed=seed,
                               num_domains=num_domains if per_site else None)
    atomic_save(prior.state_dict(), path)
    return path


class FactorPriorFit:
    """The factor-prior fit of a training run as a config component: ``fit()`` calls ``fit_factor_prior`` with the
    arguments given here (see there) and returns the path written, or None when there is nothing to fit."""

    def __init__(self, conditioner: Conditioner, items: Sequence[Mapping[str, Any]], latent_space: LatentSpace,
                 crop_size: Sequence[int], path: str, crops_per_latent: int = 8, steps: int = 500,
                 per_site: bool = True, num_domains: int | None = None, seed: int = 0, enabled: bool = True) -> None:
        require_bool(enabled, "prior#enabled")
        require_bool(per_site, "prior#per_site")
        self.args = (conditioner, items, latent_space, crop_size, path)
        self.kwargs = dict(crops_per_latent=crops_per_latent, steps=steps, per_site=per_site,
                           num_domains=num_domains, seed=seed, enabled=enabled)

    def fit(self) -> str | None:
        return fit_factor_prior(*self.args, **self.kwargs)

