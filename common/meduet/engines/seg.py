"""meduet_seg training: the network built from the upstream checkpoints, the preprocessing it inherits from its
VAE, the label-fraction and site selection of training cases, the record it carries, and the trainer (the shared
trainer base: bf16 autocast on CUDA, non-finite stop before any checkpoint of that state, gradient clipping,
per-iteration schedule)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.inferers import Inferer
from torch.utils.data import DataLoader

from meduet import records
from meduet.data import load_datalist
from meduet.engines.trainer import MeduetTrainer
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.latent import LatentSpace
from meduet.networks.encoder import PRETRAIN_KINDS, objective_of
from meduet.networks.meduet import MEDUET_PRESETS
from meduet.networks.seg import VIT_KEYS, MeduetSegNet, UNetSeg

__all__ = ["SegTrainer", "build_seg", "seg_preprocessing", "select_training_cases", "label_names", "seg_record"]


def build_seg(vae_ckpt: str | None, pretrain_ckpt: str | None, init: str = "meduet", vit_preset: str = "demo",
              out_channels: int = 2, features: str = "content", feature_size: int = 16,
              vae_architecture: Mapping[str, Any] | None = None, norm_name: str | tuple = "instance",
              res_block: bool = True) -> torch.nn.Module:
    """A ``MeduetSegNet`` whose VAE and ViT architectures come from the upstream checkpoints (the truth), with their
    weights copied: the VAE's from ``vae_ckpt`` (meduet_vae's ``model.pt``), the ViT's from ``pretrain_ckpt``
    (meduet_pretrain's; inits "meduet" / "mae"; ignored for "scratch", whose ViT follows the pretraining record if
    given, else ``vit_preset``). ``init="unet"``: MONAI's UNet baseline (``UNetSeg``; the checkpoints are not used)."""
    if init == "unet":
        return UNetSeg(out_channels, feature_size)
    vae_arch = dict(vae_architecture) if vae_architecture else None
    vae = records.load(vae_ckpt, expect="vae") if vae_ckpt else None
    if vae is not None:
        vae_arch = vae.architecture
    if vae_arch is None:
        raise MeduetConfigError("build_seg needs vae_ckpt (meduet_vae's model.pt) or a vae_architecture")
    vit = dict(MEDUET_PRESETS[vit_preset])
    state = record = None
    if pretrain_ckpt:
        state, record = records.read(pretrain_ckpt, expect=PRETRAIN_KINDS)
        vit = {k: v for k, v in record["architecture"].items() if k in VIT_KEYS}
        if vae is not None and record.get("latent_scale_factor") is not None:  # pretrained on this VAE's latents?
            LatentSpace.from_vae(vae).check_same(LatentSpace.from_record(record, str(pretrain_ckpt)), str(vae_ckpt),
                                                 str(pretrain_ckpt))
    elif init != "scratch":
        raise MeduetConfigError(f"init '{init}' needs pretrain_ckpt (meduet_pretrain's model.pt)")
    net = MeduetSegNet(vae_arch, vit, out_channels, init, features, feature_size, norm_name, res_block)
    if vae is not None:
        net.copy_vae(vae)
    if init != "scratch":
        net.copy_encoder(state, objective_of(record["kind"]))
    return net


class SegTrainer(MeduetTrainer):
    """``loss_function(network(image), label)`` per batch of ``{"image" (B, 1, ...), "label" (B, 1, ...)}``.

    Args: as ``MeduetTrainer`` plus ``loss_function`` (e.g. MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True)``). The output dict has ``image``, ``label``, ``pred`` (logits) and ``loss`` like MONAI's
    ``SupervisedTrainer``, so MONAI's metric handlers can read it.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: DataLoader,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: Callable,
                 lr_scheduler: Any = None, grad_clip: float | None = 1.0, epoch_length: int | None = None,
                 amp: bool = False, train_handlers: Sequence | None = None, inferer: Inferer | None = None,
                 **workflow_kwargs: Any) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
                         grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
                         inferer=inferer, **workflow_kwargs)
        self.loss_function = loss_function

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        dev = engine.state.device
        x = batchdata["image"].to(dev, non_blocking=engine.non_blocking)
        y = batchdata["label"].to(dev, non_blocking=engine.non_blocking)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.inferer(x, self.network)
            loss = self.loss_function(logits.float(), y)
        self.check_finite(engine, segmentation=loss)
        lr = self.optimizer_step(loss)
        return {"image": x, "label": y, "pred": logits.detach(), "loss": loss.detach(),
                "losses": {"loss": float(loss.detach()), "lr": lr}}


def seg_preprocessing(vae_meta: Mapping[str, Any], image_per_token: int, modality: str | None = None) -> dict[str, Any]:
    """The VAE's stored preprocessing (spacing, CT window / MR percentiles, foreground crop) with padding to a
    multiple of the image voxels per token, one input channel, and the modality override if given."""
    prep = dict(vae_meta.get("preprocessing") or {})
    if not prep:
        raise MeduetConfigError("the VAE checkpoint has no preprocessing record; retrain meduet_vae")
    if modality:
        prep["modality"] = modality
    prep["pad_multiple"] = int(image_per_token)
    prep["expected_channels"] = 1
    return prep


def select_training_cases(items: Sequence[Mapping[str, Any]], label_fraction: float = 1.0,
                          domains: Sequence[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled training cases: those with a ``label``, restricted to ``domains`` (None: all), then a random
    ``label_fraction`` of them (at least one), drawn per site so every site keeps its share. Deterministic in
    ``seed``."""
    if not 0.0 < float(label_fraction) <= 1.0:
        raise MeduetConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
    pool = [dict(it) for it in items if it.get("label")]
    if domains is not None:
        unknown = set(domains) - {it.get("domain") for it in pool}
        if unknown:
            raise MeduetConfigError(f"train_domains {sorted(unknown)} have no labelled training cases")
        pool = [it for it in pool if it.get("domain") in set(domains)]
    if not pool:
        raise MeduetInputError("no labelled training cases (items need a 'label')")
    want = max(1, int(math.ceil(label_fraction * len(pool))))
    rng = random.Random(seed)
    by_site: dict[Any, list[dict[str, Any]]] = {}
    for it in pool:
        by_site.setdefault(it.get("domain"), []).append(it)
    for group in by_site.values():
        rng.shuffle(group)
    # round-robin over sites so the subset keeps the site mix
    chosen: list[dict[str, Any]] = []
    groups = [by_site[k] for k in sorted(by_site, key=str)]
    while len(chosen) < want:
        for g in groups:
            if g and len(chosen) < want:
                chosen.append(g.pop())
    return chosen


def label_names(datalist: Mapping[str, Any], out_channels: int) -> dict[str, str]:
    """``{"0": "background", ...}`` from the datalist's ``labels`` (else ``class<i>``)."""
    labels = {str(k): str(v) for k, v in (datalist.get("labels") or {}).items()}
    return {str(i): labels.get(str(i), "background" if i == 0 else f"class{i}") for i in range(out_channels)}


def seg_record(datalist: str, training_cases: Sequence[Mapping[str, Any]], out_channels: int,
               preprocessing: Mapping[str, Any], init: str, label_fraction: float,
               roi_size: Sequence[int] | None = None) -> dict[str, Any]:
    """What a trained segmentation network carries in its record besides the architecture."""
    dl = load_datalist(datalist)
    return {
        "labels": label_names(dl, out_channels),
        "domains": dl.get("domains", []),
        "training_domains": sorted({str(it.get("domain")) for it in training_cases}),
        "training_cases": len(training_cases),
        "label_fraction": float(label_fraction),
        "init": init,
        "preprocessing": {k: v for k, v in preprocessing.items() if k != "expected_channels"},
        "roi_size": [int(r) for r in roi_size] if roi_size is not None else None,
    }
