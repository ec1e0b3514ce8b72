"""meduet_seg training engine: supervised segmentation with the shared trainer base (bf16 autocast on CUDA,
non-finite stop before any checkpoint of that state, gradient clipping, per-iteration schedule)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from torch.utils.data import DataLoader

from meduet.engines.trainer import MeduetTrainer

__all__ = ["SegTrainer"]


class SegTrainer(MeduetTrainer):
    """``loss_function(network(image), label)`` per batch of ``{"image" (B, 1, ...), "label" (B, 1, ...)}``.

    Args: as ``MeduetTrainer`` plus ``loss_function`` (e.g. MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True)``). The output dict has ``image``, ``label``, ``pred`` (logits) and ``loss`` like MONAI's
    ``SupervisedTrainer``, so MONAI's metric handlers can read it.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: DataLoader,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: Callable,
                 lr_scheduler: Any = None, grad_clip: float | None = 1.0, epoch_length: int | None = None,
                 amp: bool = False, train_handlers: Sequence | None = None, **workflow_kwargs: Any) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, lr_scheduler=lr_scheduler,
                         grad_clip=grad_clip, epoch_length=epoch_length, amp=amp, train_handlers=train_handlers,
                         **workflow_kwargs)
        self.loss_function = loss_function

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        dev = engine.state.device
        x = batchdata["image"].to(dev, non_blocking=engine.non_blocking)
        y = batchdata["label"].to(dev, non_blocking=engine.non_blocking)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.network(x)
            loss = self.loss_function(logits.float(), y)
        self.check_finite(engine, segmentation=loss)
        lr = self.optimizer_step(loss)
        return {"image": x, "label": y, "pred": logits.detach(), "loss": loss.detach(),
                "losses": {"loss": float(loss.detach()), "lr": lr}}
