"""Atomic, resumable checkpoints that load with ``torch.load(weights_only=True)``.

Two files per bundle, both written through a temporary file and ``os.replace`` so a killed run never leaves a
half-written checkpoint:

- ``models/checkpoint.pt``: everything needed to resume (networks, optimisers, schedulers, engine
  epoch/iteration, RNG states), written every ``save_interval`` epochs;
- ``models/model.pt``: the network's flat state dict, what ``monai.bundle.load``, MONAI's
  ``CheckpointLoader`` and MONAI Label expect (the next stage's facts travel in its ``_extra_state``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from meduet import integrity, records
from meduet.errors import MeduetConfigError, require_bool
from meduet.io import atomic_path

__all__ = ["atomic_save", "load_checkpoint", "rng_state", "set_rng_state", "TrainingCheckpointer", "unwrap"]

logger = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file in the same folder, renamed over ``path`` once complete.

    Written into a packaged bundle that passed its checksum check (e.g. fine-tuning overwriting its
    ``models/model.pt``), the new file is recorded as the user's own (``meduet.integrity.writing``), so the bundle's
    next check accepts it."""
    with integrity.writing(path), atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, what: str = "checkpoint", fix: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a one-line error naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise MeduetConfigError(f"{what} '{path}' does not exist" + (f"; {fix}" if fix else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MeduetConfigError(f"{what} '{path}' cannot be loaded safely ({msg})" + (f"; {fix}" if fix else "")) from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class TrainingCheckpointer:
    """Ignite handler: save ``checkpoint.pt`` + ``model.pt`` atomically, and resume from ``checkpoint.pt``.

    Args:
        save_dir: folder of the two files (a bundle's ``models/``).
        save_dict: named objects with ``state_dict``/``load_state_dict`` (networks, optimisers, schedulers,
            EMA models, the trainer engine itself is added automatically); ``None`` entries are skipped.
        model_key: which entry of ``save_dict`` is exported as ``model.pt``.
        save_interval: save every N epochs (and always at the end of training).
        resume: when ``checkpoint.pt`` exists at start, restore everything from it and continue.
        before_save: called with the engine right before writing (e.g. to refresh latent statistics).
        model_name, checkpoint_name: file names.
        extra_model_names: more files that receive the same exported network (e.g. a stage snapshot).
        export: what ``model.pt`` holds, made from the network (e.g. meduet_pretrain's deployable encoder,
            ``meduet.engines.pretrain.deployable_encoder``); default the network itself.
        network_name: a file that receives the whole network when ``export`` gives a part of it (e.g.
            ``training_network.pt``).
        rank: only rank 0 writes in distributed runs (all ranks resume).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        model_key: str = "model",
        save_interval: int = 1,
        resume: bool = True,
        before_save: Callable[[Engine], None] | None = None,
        model_name: str = "model.pt",
        checkpoint_name: str = "checkpoint.pt",
        extra_model_names: Sequence[str] = (),
        export: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        network_name: str | None = None,
        rank: int | None = None,
    ) -> None:
        if model_key not in save_dict:
            raise MeduetConfigError(f"TrainingCheckpointer: model_key '{model_key}' not in save_dict {list(save_dict)}")
        self.save_dir = Path(save_dir)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}  # e.g. no teacher for a baseline
        self.model_key = model_key
        self.save_interval = max(1, int(save_interval))
        self.resume = require_bool(resume, "resume")
        self.before_save = before_save
        self.model_path = self.save_dir / model_name
        self.checkpoint_path = self.save_dir / checkpoint_name
        self.extra_model_paths = [self.save_dir / n for n in extra_model_names]
        self.export = export
        self.network_path = self.save_dir / network_name if network_name else None
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.rank = rank
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._maybe_resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self._save_final)

    def _objects(self, engine: Engine) -> dict[str, Any]:
        return {**self.save_dict, "engine": engine}

    def _maybe_resume(self, engine: Engine) -> None:
        if not (self.resume and self.checkpoint_path.is_file()):
            return
        ckpt = load_checkpoint(self.checkpoint_path, "training checkpoint", "delete it to start from scratch")
        for name, obj in self._objects(engine).items():
            if name not in ckpt:
                raise MeduetConfigError(
                    f"training checkpoint '{self.checkpoint_path}' has no '{name}' (saved from another config?); "
                    "delete it to start from scratch or set resume=false"
                )
            if name == "engine":
                # keep the configured max_epochs: resuming may extend a run
                engine.state.epoch = int(ckpt["engine"]["epoch"])
                engine.state.iteration = int(ckpt["engine"]["iteration"])
            else:
                target = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
                target.load_state_dict(ckpt[name])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        self.resumed_from = engine.state.epoch
        logger.info(f"resumed from {self.checkpoint_path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def save(self, engine: Engine, complete: bool = False) -> None:
        """Write ``checkpoint.pt`` and the model files; their record says ``complete`` only at the run's end."""
        if self.before_save is not None:
            self.before_save(engine)
        if self.rank != 0:
            return
        ckpt: dict[str, Any] = {}
        for name, obj in self._objects(engine).items():
            if name == "engine":
                ckpt["engine"] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
            else:
                target = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
                ckpt[name] = target.state_dict()
        ckpt["rng"] = rng_state()
        atomic_save(ckpt, self.checkpoint_path)
        network = unwrap(self.save_dict[self.model_key])
        if self.network_path is not None:
            atomic_save(network.state_dict(), self.network_path)
        self._export(engine, complete)

    def _export(self, engine: Engine, complete: bool) -> None:
        network = unwrap(self.save_dict[self.model_key])
        exported = records.stamp_training((self.export(network) if self.export is not None else network).state_dict(),
                                          engine.state.epoch, engine.state.max_epochs, complete)
        for path in (self.model_path, *self.extra_model_paths):
            atomic_save(exported, path)

    def _save_final(self, engine: Engine) -> None:
        """At the end of the run: the model files say ``complete`` (the checkpoint is written again only when the
        last epoch's save did not already write it)."""
        if engine.state.epoch % self.save_interval != 0 or self.resumed_from == engine.state.epoch:
            self.save(engine, complete=True)
        elif self.rank == 0:
            self._export(engine, complete=True)
