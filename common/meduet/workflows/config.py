"""Typed configs: the base of every workflow's typed config (a dataclass whose fields are checked against their
annotations when a bundle config builds it, so ``--max_cases abc`` is one line naming the key rather than a traceback
later), and :func:`check_keys`, the same check for the top-level keys of the train and inference configs, which
build MONAI components directly (``--batch_size abc`` would otherwise fail inside a DataLoader)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from meduet.errors import MeduetConfigError, fire_bool_hint

__all__ = ["WorkflowConfig", "check_types", "check_keys", "KEY_KINDS"]

_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_UNIONS = (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or tp in (dict,):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:
        return isinstance(value, (str, Path))
    if tp is torch.device:
        return isinstance(value, (str, torch.device))
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return len(args) != 1 or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return True  # anything else (callables, modules, ...) is not checked


def check_types(config: Any) -> None:
    """One-line ``MeduetConfigError`` for the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tp = hints.get(f.name, Any)
        if not _matches(value, tp):
            hint = f" ({fire_bool_hint(f.name)})" if tp is bool and isinstance(value, str) else ""
            raise MeduetConfigError(f"{type(config).__module__.removeprefix('meduet.workflows.')}: '{f.name}' must be "
                                    f"{_describe(tp)}, got {value!r}; fix the config key or command-line override that "
                                    f"sets it{hint}")


@dataclasses.dataclass
class WorkflowConfig:
    """Dataclass base: fields are checked against their annotations on construction."""

    def __post_init__(self) -> None:
        check_types(self)


# What each top-level key of the bundles' train/inference configs must hold; one table for every bundle.
_KINDS_BY_NAME: dict[str, tuple[str, ...]] = {
    "a positive integer": ("batch_size", "max_epochs", "val_interval", "crops_per_latent", "crops_per_volume",
                           "decoder_batch_size", "decoder_epochs", "num_per_site", "feature_size", "out_channels",
                           "latent_channels", "content_dim", "style_dim", "num_angles", "iterations",
                           "metric_interval"),
    "an integer >= 0": ("num_workers", "warmup_epochs", "adv_warmup_iterations", "lr_warmup_iterations", "seed",
                        "decode_overlap", "patch_min_overlap", "num_domains", "mlem_iterations", "mask_seed"),
    "a number >= 0": ("learning_rate", "d_learning_rate", "decoder_learning_rate", "weight_decay", "grad_clip",
                      "kl_weight", "adv_weight", "perceptual_weight", "encoder_lr_scale", "guidance_scale",
                      "total_counts", "subject_learning_rate"),
    "a number in [0, 1]": ("ema_decay", "cond_dropout", "label_fraction", "flip_prob", "rot90_prob", "patch_overlap",
                           "train_fraction"),
    "a positive integer, a list of 3 positive integers, or null": ("roi_size", "crop_size", "patch_size",
                                                                   "image_size"),
    "True or False": ("resume", "amp", "content_map", "zero_terminal_snr", "init_from_pretrained",
                      "decay_bias_and_norm", "paper_weights_required", "allow_missing_paper_weights",
                      "write_dicom_seg", "output_hounsfield"),
}
KEY_KINDS: dict[str, str] = {key: kind for kind, keys in _KINDS_BY_NAME.items() for key in keys}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


_FITS = {
    "a positive integer": lambda v: _is_int(v) and v > 0,
    "an integer >= 0": lambda v: _is_int(v) and v >= 0,
    "a number >= 0": lambda v: _is_number(v) and v >= 0,
    "a number in [0, 1]": lambda v: _is_number(v) and 0 <= v <= 1,
    "a positive integer, a list of 3 positive integers, or null": lambda v: v is None or (_is_int(v) and v > 0) or (
        isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)),
    "True or False": lambda v: isinstance(v, bool),
}


def check_keys(**values: Any) -> bool:
    """One-line ``MeduetConfigError`` for the first ``key=value`` that does not hold what :data:`KEY_KINDS` says
    (``--batch_size abc``, ``--roi_size abc``, ``--learning_rate -1``), naming the key and the override to fix;
    ``True`` when all fit. A bundle config calls it first in its run lists, before any component is built. A key
    not in the table is a programming error (``KeyError``), so a config cannot list a key nobody checks."""
    for key, value in values.items():
        kind = KEY_KINDS[key]
        if value is None and key == "seed":
            continue
        if not _FITS[kind](value):
            hint = f" ({fire_bool_hint(key)})" if kind == "True or False" and isinstance(value, str) else ""
            raise MeduetConfigError(f"'{key}' must be {kind}, got {value!r}; fix the config key or the command-line "
                                    f"override --{key}{hint}")
    return True
