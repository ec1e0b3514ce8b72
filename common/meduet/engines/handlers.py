"""Small ignite handlers that MONAI does not have, usable from bundle configs (``attach(engine)``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["ProgressBar", "EpochSeeder", "loss_terms"]


class ProgressBar:
    """A tqdm progress bar per epoch showing the loss terms (``output_transform(engine.state.output)``).

    Off when ``MEDUET_PROGRESS=0`` or when ``enabled`` is false.
    """

    def __init__(self, output_transform: Callable[[Any], dict[str, float]] | None = None, desc: str = "",
                 enabled: bool = True) -> None:
        self.output_transform = output_transform
        self.desc = desc
        self.enabled = enabled and os.environ.get("MEDUET_PROGRESS", "1") != "0"

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as _Bar

        bar = _Bar(persist=True, desc=self.desc or None, file=sys.stderr, dynamic_ncols=True)
        bar.attach(engine, output_transform=self.output_transform)


class EpochSeeder:
    """Re-seed the random transforms of a dataset at every epoch start from ``(seed, epoch)``.

    Data augmentation then depends on the epoch number only, not on how many epochs ran in this process,
    so a run resumed from a checkpoint sees exactly the crops an uninterrupted run would have seen.
    """

    def __init__(self, transform: Any, seed: int = 0) -> None:
        self.transform = transform
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # state.epoch is already incremented at EPOCH_STARTED; mix it into the seed (kept in uint32)
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + int(engine.state.epoch)) % (2**32))


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The scalar loss terms of one iteration (for TensorBoard / MLflow / progress bars)."""
    return dict(output["losses"])
