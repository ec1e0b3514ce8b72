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
    ) -> None:
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
            grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
        )
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


ENCODE_HINT = (
    "make it with meduet_vae's encode workflow: python -m monai.bundle run --config_file "
    "\"['bundles/meduet_vae/configs/encode.yaml','bundles/meduet_vae/configs/presets/demo.yaml']\""
)


def read_latent_datalist(path: str, split: str | None = None) -> Any:
    """Read meduet_vae's latent datalist: the whole dict, or with ``split`` that split's items with absolute
    ``latent`` paths and a ``domain_index``. A missing cache is a one-line error naming the command that makes it."""
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
    intensity-augmented copy of the same latent (``latent_aug``), cropped and turned exactly like ``latent``."""
    import monai.transforms as mt

    from meduet.data import CheckedLoadImaged, InputCheckedCompose, get_train_crop_transforms

    steps: list[Any] = [CheckedLoadImaged(["latent"], image_only=True, ensure_channel_first=True),
                        mt.EnsureTyped(["latent"], dtype=torch.float32)]
    keys = ["latent"]
    if augmented_pairs:
        steps += [LoadAugmentedLatentsd(), PickAugmentedLatentd()]
        keys.append("latent_aug")
    steps += list(get_train_crop_transforms(crop_size, keys=keys, num_samples=crops_per_latent).transforms)
    return InputCheckedCompose(steps)
