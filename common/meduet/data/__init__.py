"""Data layer: datalists, input checks, MONAI transform chains and the sample data generator.

Public names are imported lazily (PEP 562), so ``python -m meduet.data.sample`` and datalist tools do not pay
for importing MONAI/torch; ``from meduet.data import get_load_transforms`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # datalist.py (standard library only)
    "SPLITS": "datalist",
    "load_datalist": "datalist",
    "get_split": "datalist",
    "write_datalist": "datalist",
    "resolve_path": "datalist",
    "case_name": "datalist",
    "read_domains": "datalist",
    # checks.py
    "check_image": "checks",
    "check_datalist_images": "checks",
    "find_input_error": "checks",
    "CheckInputd": "checks",
    "CheckedLoadImaged": "checks",
    # transforms.py
    "InputCheckedCompose": "transforms",
    "get_load_transforms": "transforms",
    "get_train_crop_transforms": "transforms",
    "get_appearance_augment": "transforms",
    "SyntheticSiteAugment": "transforms",
    "foreground_above": "transforms",
    # sample.py
    "generate_sample_data": "sample",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from meduet.data.checks import (
        CheckedLoadImaged,
        CheckInputd,
        check_datalist_images,
        check_image,
        find_input_error,
    )
    from meduet.data.datalist import (SPLITS, case_name, get_split, load_datalist, read_domains, resolve_path,
                                      write_datalist)
    from meduet.data.sample import generate_sample_data
    from meduet.data.transforms import (
        InputCheckedCompose,
        SyntheticSiteAugment,
        foreground_above,
        get_appearance_augment,
        get_load_transforms,
        get_train_crop_transforms,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meduet.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meduet.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
