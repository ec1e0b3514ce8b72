"""Pretraining loop pieces for meduet_pretrain: a MONAI ``Trainer`` running the MeDUET (or masked-autoencoder)
objective on batches of latent crops, and the learning-rate schedule.

The objectives themselves live in ``meduet.losses.meduet``; this engine only scales the latents, calls the step
loss function, checks the loss is finite, steps the optimiser/schedule and updates the EMA teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.inferers import Inferer
from torch.utils.data import DataLoader

from meduet import records
from meduet.engines.checkpoint import unwrap
from meduet.engines.ema import EMATeacher
from meduet.engines.trainer import MeduetTrainer
from meduet.errors import MeduetConfigError, require_bool
from meduet.latent import LatentDatalist, LatentSpace, latent_record, load_latent
from meduet.losses.meduet_config import MAELossConfig, MeDUETLossConfig
from meduet.losses.meduet_step import mae_step_losses, meduet_step_losses
from meduet.metrics.disentanglement import fit_linear_eraser
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.mae import build_mae
from meduet.networks.meduet import build_meduet
from meduet.networks.windows import encode_latents
from meduet.records import with_meta

__all__ = ["PretrainTrainer", "ContentEraserFit", "content_eraser_fit", "meduet_network", "mae_network",
           "deployable_encoder", "optimizer_param_groups"]


def optimizer_param_groups(network: torch.nn.Module, weight_decay: float,
                           decay_bias_and_norm: bool = True) -> list[dict[str, Any]]:
    """train.yaml's optimiser parameter groups. ``decay_bias_and_norm=True`` (this project's default): one group,
    every parameter decayed by ``weight_decay``. ``False`` (the public MeDUET code's groups, timm's
    ``param_groups_weight_decay``): parameters with one dimension or less (biases, norm weights, the SiQC
    temperatures) and every ``*.bias`` get no weight decay; the rest get ``weight_decay``. Only parameters that
    require gradients enter the two groups."""
    if require_bool(decay_bias_and_norm, "decay_bias_and_norm"):
        return [{"params": list(unwrap(network).parameters()), "weight_decay": float(weight_decay)}]
    decay, no_decay = [], []
    for name, param in unwrap(network).named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def deployable_encoder(network: torch.nn.Module) -> PretrainedEncoder:
    """What meduet_pretrain's ``model.pt`` holds: the encoder part of the training network (latent ViT and, for
    MeDUET, the content/style heads) with its record; the whole network goes to ``training_network.pt``."""
    return records.part_of(unwrap(network), PretrainedEncoder)


def meduet_network(preset: str | Mapping[str, Any], latents: Mapping[str, Any], crop_size: Sequence[int],
                   overrides: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """train.yaml's network: MeDUET sized by ``preset`` (+ ``overrides``) with one domain class per site of the
    latent cache, carrying the record of the cache it is trained on (crop, objective, loss settings)."""
    loss = dict(loss or {})
    net = build_meduet(preset, num_domains=len(latents["domains"]), input_size=crop_size, **dict(overrides or {}))
    return with_meta(net, latent_record(latents, crop_size=crop_size, objective="meduet",
                                        rec_on=loss.get("rec_on", "hidden"), loss=loss))


def mae_network(preset: str | Mapping[str, Any], latents: Mapping[str, Any], crop_size: Sequence[int],
                overrides: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None,
                rec_on: str = "hidden") -> torch.nn.Module:
    """mae_baseline.yaml's network: the masked-autoencoder baseline with the same backbone, and its record."""
    net = build_mae(preset, input_size=crop_size, **dict(overrides or {}))
    return with_meta(net, latent_record(latents, crop_size=crop_size, objective="mae", rec_on=rec_on,
                                        loss=dict(loss or {})))


class PretrainTrainer(MeduetTrainer):
    """Latent self-supervised pretraining (MeDUET or the masked-autoencoder baseline) as an ignite engine.

    Args:
        device, max_epochs, train_data_loader, epoch_length: as MONAI's ``Trainer``; batches are dicts with
            ``latent`` ``(B, C, S, S, S)``, (for MeDUET) ``domain_index`` ``(B,)`` and, optionally, ``latent_aug``
            (intensity-augmented copies of the same crops, for the ``aug_content`` term). MeDUET pairs sample ``k``
            with ``k + B/2``, so ``B`` must be even.
        network: ``MeDUET`` or ``MaskedAutoencoder`` (possibly DDP-wrapped).
        optimizer: e.g. AdamW(lr 1e-4, betas (0.9, 0.95), weight decay 0.01).
        objective: ``"meduet"`` or ``"mae"``.
        loss_config: mapping for ``MeDUETLossConfig`` / ``MAELossConfig`` (weights, switches, start steps).
        teacher: the EMA teacher (MeDUET's MFTD/SiQC keys); updated after every optimiser step.
        latent_space: the VAE's latent space (``meduet.latent.LatentSpace``): the cached latents are scaled by it
            before the model sees them.
        lr_scheduler: stepped once per iteration.
        grad_clip: max gradient norm (``None``: no clipping).
        amp: bf16 autocast on CUDA (ignored on CPU).
        train_handlers: MONAI/ignite handlers.
        content_eraser: a ``ContentEraserFit`` (also the checkpointer's ``before_save``): the content head's site
            eraser is reset to identity when a run starts (after any resume), so training never sees a stale one.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        objective: str = "meduet",
        loss_config: Mapping[str, Any] | None = None,
        teacher: EMATeacher | None = None,
        latent_space: LatentSpace | None = None,
        lr_scheduler: Any = None,
        grad_clip: float | None = 1.0,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        content_eraser: ContentEraserFit | None = None,
        inferer: Inferer | None = None,
    ) -> None:
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
            grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers, inferer=inferer,
        )
        if content_eraser is not None:
            self.add_event_handler(Events.STARTED, content_eraser.reset)  # after the checkpointer's resume
        if objective not in ("meduet", "mae"):
            raise ValueError(f"objective must be 'meduet' or 'mae', got {objective!r}")
        if objective == "meduet" and teacher is None:
            raise ValueError("the MeDUET objective needs an EMA teacher (meduet.engines.ema.EMATeacher)")
        self.objective = objective
        cfg_cls = MeDUETLossConfig if objective == "meduet" else MAELossConfig
        self.loss_config = cfg_cls.from_mapping(dict(loss_config or {}))
        self.teacher = teacher
        self.latent_space = latent_space or LatentSpace(1.0)

    def _latents(self, engine: Trainer, batch: torch.Tensor) -> torch.Tensor:
        """A batch of cached latents on the device, as plain scaled float tensors."""
        x = batch.to(engine.state.device, non_blocking=engine.non_blocking)
        return self.latent_space.scale(x.as_tensor() if hasattr(x, "as_tensor") else x)

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = self._latents(engine, batchdata["latent"])
        step = int(engine.state.iteration) - 1  # ignite counts from 1 and has already incremented
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if self.objective == "meduet":
                if x.shape[0] % 2:
                    raise ValueError(f"MeDUET mixes pairs of samples: the batch size must be even, got {x.shape[0]}")
                domain = torch.as_tensor(batchdata["domain_index"]).long().to(engine.state.device).view(-1)
                x_aug = self._latents(engine, batchdata["latent_aug"]) if "latent_aug" in batchdata else None
                terms = meduet_step_losses(self.network, self.teacher, x, domain, step, self.loss_config,
                                           x_aug=x_aug)
            else:
                terms = mae_step_losses(self.network, x, self.loss_config)
        loss = terms["loss"]
        self.check_finite(engine, pretraining=loss)
        lr = self.optimizer_step(loss)
        losses = {k: float(v.detach()) for k, v in terms.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if self.teacher is not None:
            losses["teacher_momentum"] = float(self.teacher.update(self.network, step, self.total_steps))
        losses["lr"] = lr
        return {"loss": loss.detach(), "losses": losses}


def content_eraser_fit(network: torch.nn.Module, latent_datalist: str, settings: Mapping[str, Any],
                       device: str | torch.device | None = None) -> ContentEraserFit | None:
    """train.yaml's ``content_eraser`` (not in the paper): a ``ContentEraserFit`` when ``settings["enabled"]`` is
    true and ``settings["splits"]`` is not empty, else None (the content head stays as trained)."""
    enabled = require_bool(settings.get("enabled", False), "content_eraser#enabled")
    if not enabled or not settings.get("splits"):
        return None
    return ContentEraserFit(network, latent_datalist, settings["splits"], settings.get("shrinkage", 0.1),
                            settings.get("appearance_dims", 8), device=device)


class ContentEraserFit:
    """Fits the content head's linear site eraser (``meduet.networks.meduet.ContentEraser``) at the end of
    pretraining, in two parts composed into one affine map:

    1. sites: the pooled content of every latent of ``splits`` (whole latents by sliding windows of the
       pretraining crop, ``meduet.networks.windows.encode_latents``) with the identity eraser, then LEACE
       (``meduet.metrics.disentanglement.fit_linear_eraser``, covariance ``shrinkage``) of the items' sites;
    2. appearance: when items carry appearance-augmented copies (``latent_aug``, meduet_vae ``encode.yaml
       --augment_copies N``), the ``appearance_dims`` leading principal directions of how a case's (site-erased)
       pooled content moves between the case and its copies are projected out too. The seen sites span only
       ``sites - 1`` directions; the copies show how content follows intensity changes in general, which is how
       a site never seen in pretraining differs.

    Use it as ``TrainingCheckpointer(before_save=...)``: it acts only at the save after the last epoch, so the
    exported ``model.pt`` (and ``checkpoint.pt``) hold the fitted eraser, and it records what it was fitted on in
    ``network.meta["content_eraser"]``; give it to ``PretrainTrainer(content_eraser=...)`` too, which resets the
    eraser when a run starts. Splits the datalist lacks are skipped; with fewer than two sites the eraser stays
    identity (a warning says so). Every rank fits the same eraser (the computation is deterministic).
    """

    def __init__(self, network: torch.nn.Module, latent_datalist: str, splits: Sequence[str] = ("training",),
                 shrinkage: float = 0.1, appearance_dims: int = 8, device: str | torch.device | None = None) -> None:
        self.network = network
        self.latent_datalist = latent_datalist
        self.splits = list(splits)
        self.shrinkage = float(shrinkage)
        self.appearance_dims = int(appearance_dims)
        self.device = device
        self._fitted_at: int | None = None

    def _model(self) -> torch.nn.Module:
        return unwrap(self.network)

    def reset(self, engine: Trainer | None = None) -> None:
        model = self._model()
        model.factors.eraser.set(None, None)
        model.meta.pop("content_eraser", None)

    def __call__(self, engine: Trainer) -> None:
        if engine.state.epoch < engine.state.max_epochs or self._fitted_at == engine.state.iteration:
            return
        self.fit()
        self._fitted_at = engine.state.iteration

    def fit(self) -> dict[str, Any] | None:
        """Fit and install the eraser now; returns the record stored in ``meta["content_eraser"]`` (None if
        the splits hold fewer than two sites)."""
        model = self._model()
        self.reset()
        latents = LatentDatalist(self.latent_datalist)
        splits = [sp for sp in self.splits if sp in latents]
        items = [it for sp in splits for it in latents.items(sp)]
        sites = sorted({it["domain"] for it in items})
        if len(sites) < 2:
            logging.getLogger(__name__).warning(
                f"content eraser not fitted: splits {splits} of '{self.latent_datalist}' hold sites {sites}")
            return None
        was_training = model.training
        device = self.device or next(model.parameters()).device
        space = latents.space

        def pooled(paths: list[str], desc: str) -> np.ndarray:
            enc = encode_latents(model, [load_latent(p) for p in paths], space, device, desc=desc)  # no_grad
            return np.stack([e["content"].double().numpy() for e in enc])

        content = pooled([it["latent"] for it in items], "content eraser: sites")
        eraser = fit_linear_eraser(content, [it["domain"] for it in items], self.shrinkage)
        proj, dims, copies = eraser.proj, 0, 0
        with_copies = [(i, it["latent_aug"]) for i, it in enumerate(items) if it.get("latent_aug")]
        if with_copies and self.appearance_dims > 0:
            aug = pooled([p for _, ps in with_copies for p in ps], "content eraser: appearance")
            base = np.concatenate([np.repeat(content[i][None], len(ps), 0) for i, ps in with_copies])
            moves = eraser(aug) - eraser(base)  # how the site-erased content follows appearance changes
            _, sv, vt = np.linalg.svd(moves, full_matrices=False)
            v = vt[: min(self.appearance_dims, int((sv > 1e-8 * max(sv.max(), 1e-30)).sum()))]
            # compose c -> c - (c - m) A^T, then c' -> c' - (c' - m) V^T V, as one map c - (c - m) M^T
            eye = np.eye(proj.shape[0])
            proj = proj + v.T @ v @ (eye - proj)
            dims, copies = len(v), len(aug)
        model.train(was_training)
        model.factors.eraser.set(torch.from_numpy(eraser.mean), torch.from_numpy(proj))
        record = {"splits": splits, "cases": len(items), "sites": sites, "shrinkage": self.shrinkage,
                  "site_rank": eraser.rank, "appearance_copies": copies, "appearance_dims": dims}
        model.meta["content_eraser"] = record
        return record
