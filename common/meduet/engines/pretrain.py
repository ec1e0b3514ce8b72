"""Pretraining loop pieces for meduet_pretrain: a MONAI ``Trainer`` running the MeDUET (or masked-autoencoder)
objective on batches of latent crops, and the learning-rate schedule.

The objectives themselves live in ``meduet.losses.meduet``; this engine only scales the latents, calls the step
loss function, checks the loss is finite, steps the optimiser/schedule and updates the EMA teacher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.transforms import MapTransform, Randomizable
from torch.utils.data import DataLoader

from meduet.engines.ema import EMATeacher
from meduet.engines.trainer import MeduetTrainer
from meduet.losses.meduet import MAELossConfig, MeDUETLossConfig, mae_step_losses, meduet_step_losses

__all__ = [
    "PretrainTrainer",
    "ContentEraserFit",
    "warmup_cosine_schedule",
    "read_latent_datalist",
    "LoadAugmentedLatentsd",
    "PickAugmentedLatentd",
    "pretrain_transforms",
]


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_ratio`` x the base rate at ``total_steps``.

    Stepped once per iteration.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        latent_scale_factor: multiplies the cached latents (the VAE's 1/std) before the model sees them.
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
        latent_scale_factor: float = 1.0,
        lr_scheduler: Any = None,
        grad_clip: float | None = 1.0,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        content_eraser: ContentEraserFit | None = None,
    ) -> None:
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
            grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
        )
        if content_eraser is not None:
            from ignite.engine import Events

            self.add_event_handler(Events.STARTED, content_eraser.reset)  # after the checkpointer's resume
        if objective not in ("meduet", "mae"):
            raise ValueError(f"objective must be 'meduet' or 'mae', got {objective!r}")
        if objective == "meduet" and teacher is None:
            raise ValueError("the MeDUET objective needs an EMA teacher (meduet.engines.ema.EMATeacher)")
        self.objective = objective
        cfg_cls = MeDUETLossConfig if objective == "meduet" else MAELossConfig
        self.loss_config = cfg_cls.from_mapping(dict(loss_config or {}))
        self.teacher = teacher
        self.latent_scale_factor = float(latent_scale_factor)

    def _latents(self, engine: Trainer, batch: torch.Tensor) -> torch.Tensor:
        """A batch of cached latents on the device, as plain float tensors times the VAE's scale factor."""
        x = batch.to(engine.state.device, non_blocking=engine.non_blocking)
        return (x.as_tensor() if hasattr(x, "as_tensor") else x).float() * self.latent_scale_factor

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


class ContentEraserFit:
    """Fits the content head's linear site eraser (``meduet.networks.meduet.ContentEraser``) at the end of
    pretraining, in two parts composed into one affine map:

    1. sites: the pooled content of every latent of ``splits`` (whole latents by sliding windows of the
       pretraining crop, ``meduet.engines.pretrain_tasks.encode_latents``) with the identity eraser, then LEACE
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
        from meduet.engines.checkpoint import unwrap

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
        import logging

        import numpy as np

        from meduet.engines.pretrain_tasks import encode_latents, load_latent
        from meduet.metrics.disentanglement import fit_linear_eraser

        model = self._model()
        self.reset()
        latents = read_latent_datalist(self.latent_datalist)
        splits = [sp for sp in self.splits if sp in latents]
        items = [it for sp in splits for it in read_latent_datalist(self.latent_datalist, sp)]
        sites = sorted({it["domain"] for it in items})
        if len(sites) < 2:
            logging.getLogger(__name__).warning(
                f"content eraser not fitted: splits {splits} of '{self.latent_datalist}' hold sites {sites}")
            return None
        was_training = model.training
        device = self.device or next(model.parameters()).device
        scale = float(latents["latent_scale_factor"])

        def pooled(paths: list[str], desc: str) -> np.ndarray:
            enc = encode_latents(model, [load_latent(p) for p in paths], scale, device, desc=desc)  # no_grad
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


ENCODE_HINT = (
    "make it with meduet_vae's encode workflow: python -m monai.bundle run --config_file "
    "\"['bundles/meduet_vae/configs/encode.yaml','bundles/meduet_vae/configs/presets/demo.yaml']\""
)


def read_latent_datalist(path: str, split: str | None = None, optional_splits: Sequence[str] = ()) -> Any:
    """Read meduet_vae's latent datalist: the whole dict, or with ``split`` that split's items with absolute
    ``latent`` paths and a ``domain_index``, followed by the items of those ``optional_splits`` the datalist has
    (e.g. the sample data's unlabeled ``pretraining`` pool). A missing cache is a one-line error naming the command
    that makes it."""
    import json
    import os

    from meduet.errors import MeduetConfigError, MeduetInputError

    if not os.path.isfile(path):
        raise MeduetConfigError(f"latent datalist '{path}' does not exist; {ENCODE_HINT}")
    with open(path) as f:
        data = json.load(f)
    if "latent_channels" not in data or "domains" not in data:
        raise MeduetInputError(f"{path}: not a latent datalist written by meduet_vae's encode.yaml; {ENCODE_HINT}")
    if split is None:
        return data
    if split not in data:
        raise MeduetInputError(f"{path}: has no split '{split}'")
    items = _latent_items(path, data, split)
    for extra in optional_splits:
        if extra in data and extra != split:
            items += _latent_items(path, data, extra)
    return items


def _latent_items(path: str, data: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    import os

    from meduet.errors import MeduetInputError

    base = os.path.dirname(os.path.abspath(path))
    domains = list(data["domains"])
    items = []
    for i, item in enumerate(data[split]):
        latent = os.path.join(base, item["latent"])
        if not os.path.isfile(latent):
            raise MeduetInputError(f"{path}: item {i} of '{split}': latent file '{latent}' does not exist; {ENCODE_HINT}")
        if item.get("domain") not in domains:
            raise MeduetInputError(f"{path}: item {i} of '{split}': domain {item.get('domain')!r} not in {domains}")
        row = {**item, "latent": latent, "domain_index": domains.index(item["domain"])}
        if item.get("latent_aug"):
            row["latent_aug"] = [os.path.join(base, p) for p in item["latent_aug"]]
            for p in row["latent_aug"]:
                if not os.path.isfile(p):
                    raise MeduetInputError(f"{path}: item {i} of '{split}': augmented latent '{p}' does not exist; "
                                           f"{ENCODE_HINT}")
        items.append(row)
    return items


# ----------------------------------------------------------------------------------------------------------------
# data: latent crops, optionally paired with an intensity-augmented copy of the same crop
# ----------------------------------------------------------------------------------------------------------------
class LoadAugmentedLatentsd:
    """Deterministic part of the pairing: loads every augmented copy listed in ``item[list_key]`` (absolute
    paths, as :func:`read_latent_datalist` gives them) into ``item["<key>_copies"]`` ``(n, C, *spatial)``; an
    item without copies gets its own latent as the single copy (``aug_content`` is then 0 for it)."""

    def __init__(self, key: str = "latent", list_key: str = "latent_aug") -> None:
        self.key, self.list_key = key, list_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from meduet.data import CheckedLoadImaged
        from meduet.errors import MeduetInputError

        d = dict(data)
        ref = torch.as_tensor(d[self.key])
        load = CheckedLoadImaged(["z"], image_only=True, ensure_channel_first=True)
        copies = []
        for p in d.get(self.list_key) or []:
            z = torch.as_tensor(load({"z": p})["z"]).float()
            if z.shape != ref.shape:
                raise MeduetInputError(f"{p}: augmented latent of shape {tuple(z.shape)} for a latent of "
                                       f"{tuple(ref.shape)}; re-run meduet_vae's encode.yaml")
            copies.append(z)
        d[f"{self.key}_copies"] = torch.stack(copies) if copies else ref.float().unsqueeze(0).clone()
        d.pop(self.list_key, None)
        return d


class PickAugmentedLatentd(Randomizable, MapTransform):
    """Random part of the pairing: ``item[out_key]`` = one of ``item["<key>_copies"]``, chosen at random, as a
    MetaTensor on the latent's grid, so the crop/flip/rotation transforms that follow treat both keys alike.
    (Randomizable: CacheDataset caches only what comes before it; ``EpochSeeder`` re-seeds it.)"""

    def __init__(self, key: str = "latent", out_key: str = "latent_aug") -> None:
        MapTransform.__init__(self, [key])
        self.key, self.out_key = key, out_key
        self._pick = 0

    def randomize(self, data: Any = None) -> None:
        self._pick = int(self.R.randint(int(data)))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        copies = d.pop(f"{self.key}_copies")
        self.randomize(len(copies))
        ref = d[self.key]
        pick = copies[self._pick]
        d[self.out_key] = MetaTensor(pick, meta=dict(ref.meta)) if isinstance(ref, MetaTensor) else pick
        return d


def pretrain_transforms(crop_size: Sequence[int], crops_per_latent: int = 1, augmented_pairs: bool = False):
    """The pretraining chain: load the latent, random crop(s), flips, rot90; with ``augmented_pairs`` also an
    intensity-augmented copy of the same latent (``latent_aug``), cropped and turned exactly like ``latent``.
    Items keep only ``latent``, ``domain_index`` (and ``latent_aug``)."""
    import monai.transforms as mt

    from meduet.data import CheckedLoadImaged, InputCheckedCompose, get_train_crop_transforms

    steps: list[Any] = [CheckedLoadImaged(["latent"], image_only=True, ensure_channel_first=True),
                        mt.EnsureTyped(["latent"], dtype=torch.float32)]
    keys = ["latent"]
    if augmented_pairs:
        steps += [LoadAugmentedLatentsd(), PickAugmentedLatentd()]
        keys.append("latent_aug")
    steps += list(get_train_crop_transforms(crop_size, keys=keys, num_samples=crops_per_latent).transforms)
    # only what the step uses, so that items with and without e.g. a label (the unlabeled pretraining pool) or
    # other metadata share a batch
    steps.append(mt.SelectItemsd([*keys, "domain_index"], allow_missing_keys=True))
    return InputCheckedCompose(steps)
