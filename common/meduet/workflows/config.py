"""The base of every workflow's typed config: a dataclass whose fields are checked against their annotations when a
bundle config builds it, so ``--max_cases abc`` is one line naming the key rather than a traceback later."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from meduet.errors import MeduetConfigError, fire_bool_hint

__all__ = ["WorkflowConfig", "check_types"]

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
