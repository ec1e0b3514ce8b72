"""Small ignite handlers that MONAI does not have, usable from bundle configs (``attach(engine)``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

from meduet.errors import find_meduet_error
from meduet.io import folder_state, remove_new_outputs

__all__ = ["OneLineErrors", "ProgressBar", "EpochSeeder", "loss_terms"]

_TERMINATING = ("Current run is terminating due to exception", "Engine run is terminating due to exception")


class _DropTerminatingLogs(logging.Filter):
    """Drops ignite's "... terminating due to exception" log records while a ``MeduetError`` is being handled (the
    filter runs inside ignite's ``except`` block, so ``sys.exc_info`` is that exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith(_TERMINATING) and find_meduet_error(sys.exc_info()[1]) is not None)


class OneLineErrors:
    """Attach first (the first entry of a config's ``handlers`` list; ``MeduetTrainer`` attaches one itself): an
    exception is re-raised at once when ignite hands it to the ``EXCEPTION_RAISED`` handlers, so MONAI's
    ``StatsHandler`` does not log its traceback (twice: ignite raises it through two levels), and ignite's own
    "terminating due to exception" lines are dropped for our ``MeduetError`` exceptions. What reaches the user is
    the one line ``meduet.errors``' excepthook prints; any other exception keeps its full traceback (Python's).

    ``output_dir`` (inference evaluators): the files the failed run wrote there (new or changed since the engine
    started) are removed first, so a bad second item does not leave the first item's output looking like a result
    (:func:`meduet.io.remove_new_outputs`)."""

    def __init__(self, output_dir: str | os.PathLike | None = None) -> None:
        self.output_dir = output_dir
        self._before: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        if not any(isinstance(f, _DropTerminatingLogs) for f in engine.logger.filters):
            engine.logger.addFilter(_DropTerminatingLogs())
        if self.output_dir is not None:
            engine.add_event_handler(Events.STARTED, self._snapshot)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._raise)

    def _snapshot(self, engine: Engine) -> None:
        self._before = folder_state(self.output_dir)

    def _raise(self, engine: Engine, e: BaseException) -> None:
        if self.output_dir is not None:
            remove_new_outputs(self.output_dir, self._before)
        raise e


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
