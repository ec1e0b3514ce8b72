"""The loop pieces every meduet trainer shares, on top of MONAI's ``Trainer`` (an ignite engine):
one main optimiser with gradient clipping and a per-iteration LR schedule, bf16 autocast on CUDA, and a stop on a
non-finite loss before anything of that state is saved."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.inferers import Inferer, SimpleInferer
from torch.utils.data import DataLoader

from meduet.engines.handlers import OneLineErrors
from meduet.errors import MeduetConfigError, require_bool

__all__ = ["MeduetTrainer", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; raised before any checkpoint of that state is written."""


def _first_of_tuple(transform: Any) -> Any:
    def wrapped(output: Any) -> Any:
        value = transform(output)
        return value[0] if isinstance(value, tuple) and len(value) == 1 else value

    return wrapped


def _scalar_tracking_output(handler: Any) -> None:
    """``--tracking mlflow`` adds MONAI's ``MLFlowHandler`` reading ``from_engine(['loss'], first=True)``, which on
    our dict outputs (not decollated lists) gives a 1-tuple ``(loss,)``: make it log the loss itself."""
    from monai.handlers import MLFlowHandler

    if isinstance(handler, MLFlowHandler) and callable(getattr(handler, "output_transform", None)):
        handler.output_transform = _first_of_tuple(handler.output_transform)


class MeduetTrainer(Trainer):
    """Base trainer: subclasses implement ``_iteration`` with ``autocast``, ``check_finite`` and ``optimizer_step``.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers: as MONAI's ``Trainer``.
        network: the trained network (possibly DDP-wrapped).
        optimizer: its optimiser.
        lr_scheduler: stepped once per iteration (``None``: constant rate).
        grad_clip: max gradient norm (``None``/0: no clipping).
        amp: bf16 autocast on CUDA (ignored on CPU).
        inferer: how a training step runs the network on a batch (MONAI's ``train#inferer`` property; default
            ``SimpleInferer``, i.e. ``network(x)``). Trainers whose objective calls the network with its own
            arguments (MeDUET's pairs, a diffusion objective's timesteps) keep it for the property only.
        workflow_kwargs: more ``monai.engines.Workflow`` arguments (key metrics, ``non_blocking``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        grad_clip: float | None = 1.0,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        inferer: Inferer | None = None,
        **workflow_kwargs: Any,
    ) -> None:
        require_bool(amp, "amp")
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            raise MeduetConfigError(f"max_epochs must be a positive integer, got {max_epochs!r}; fix the config key or "
                                    "the --max_epochs override")
        if epoch_length is None and hasattr(train_data_loader, "__len__") and len(train_data_loader) == 0:
            dataset = getattr(train_data_loader, "dataset", None)
            n = len(dataset) if hasattr(dataset, "__len__") else 0
            batch = getattr(train_data_loader, "batch_size", None)
            raise MeduetConfigError(f"the training data ({n} items) make no batch of batch_size {batch} (an incomplete "
                                    f"last batch is dropped); set batch_size to at most {n} or add training data")
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=[OneLineErrors(), *(train_handlers or ())],  # first: our errors stay one line
            amp=False,  # MONAI's amp is fp16 + GradScaler; we use bf16 autocast, which needs no scaler
            decollate=False,
            **workflow_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.inferer = inferer or SimpleInferer()
        self.use_bf16 = bool(amp) and self.state.device.type == "cuda"
        #: optimiser steps of the whole run (max_epochs x epoch_length), known once the run starts (schedules, EMA)
        self.total_steps = 1
        self.add_event_handler(Events.STARTED, self._count_steps)
        for handler in train_handlers or ():
            _scalar_tracking_output(handler)

    def _count_steps(self, engine: Trainer) -> None:
        self.total_steps = max(1, int(engine.state.max_epochs) * int(engine.state.epoch_length or 1))

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.state.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def check_finite(self, engine: Trainer, **terms: torch.Tensor) -> None:
        """Raise ``NonFiniteLossError`` naming the terms that are NaN/Inf."""
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(
                f"non-finite {', '.join(bad)} loss at epoch {engine.state.epoch} iteration {engine.state.iteration}; "
                "stopped before saving, the last good checkpoint is kept (lower the learning rate or check the input)"
            )

    def optimizer_step(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter] | None = None) -> float:
        """Backward, clip (``parameters``, default the network's), step the optimiser and the schedule.

        Returns the learning rate this step used."""
        loss.backward()
        if self.grad_clip:
            params = self.network.parameters() if parameters is None else parameters
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return lr
