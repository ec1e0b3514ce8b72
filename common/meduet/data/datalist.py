"""Datalists: MONAI decathlon-style JSON with a domain (site) per item.

Format (paths relative to the datalist file)::

    {
      "name": "...", "modality": "CT",
      "domains": ["site0", "site1", ...],          # index order used by every domain classifier
      "heldout_domains": ["site4"],                 # optional, subset of "domains"
      "labels": {"0": "background", ...},           # optional
      "training":   [{"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "domain": "site0"}, ...],
      "validation": [...],
      "test":       [...]
    }

:func:`load_datalist` validates the file and returns the same structure with every ``image`` / ``label``
resolved to an absolute path and a ``domain_index`` (position of ``domain`` in ``domains``) added to every
item. Extra keys (``subject``, ``spacing``, ...) are kept unchanged. Every problem is reported as a one-line
:class:`~meduet.errors.MeduetInputError` that names the datalist, the item and the fix.

This module imports only the standard library so that it is cheap to import from command-line tools.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from meduet.errors import MeduetInputError
from meduet.io import write_json

__all__ = ["SPLITS", "SAMPLE_HINT", "load_datalist", "get_split", "write_datalist", "resolve_path"]

#: Split keys a datalist may hold, in the order they are validated (``pretraining``: unlabeled images for
#: self-supervised pretraining only; ``longitudinal``: the sample data's cohort, several visits per subject).
SPLITS: tuple[str, ...] = ("training", "validation", "test", "pretraining", "longitudinal")

#: The command that (re)creates the default sample data; quoted in error messages.
SAMPLE_HINT = "python -m meduet.data.sample --out data/sample"


def resolve_path(base_dir: str, rel: str) -> str:
    """Return ``rel`` as an absolute, normalised path; relative paths are taken from ``base_dir``."""
    rel = os.path.expanduser(rel)
    if not os.path.isabs(rel):
        rel = os.path.join(base_dir, rel)
    return os.path.normpath(rel)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise MeduetInputError(
            f"{path}: datalist file does not exist; pass the path of a datalist JSON "
            f"or generate the sample data with: {SAMPLE_HINT}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = " ".join(str(e).split())
        raise MeduetInputError(
            f"{path}: datalist is not readable JSON ({type(e).__name__}: {msg}); fix the file or regenerate it"
        ) from None


def _check_domains(path: str, raw: dict) -> list[str]:
    domains = raw.get("domains")
    if (
        not isinstance(domains, list)
        or not domains
        or not all(isinstance(d, str) and d for d in domains)
    ):
        raise MeduetInputError(
            f"{path}: top-level 'domains' must be a non-empty list of site names (strings), "
            f"got {domains!r}; add e.g. \"domains\": [\"site0\", \"site1\"]"
        )
    dupes = sorted({d for d in domains if domains.count(d) > 1})
    if dupes:
        raise MeduetInputError(f"{path}: 'domains' lists {dupes} more than once; each site name must be unique")
    heldout = raw.get("heldout_domains", [])
    if not isinstance(heldout, list) or any(d not in domains for d in heldout):
        raise MeduetInputError(
            f"{path}: 'heldout_domains' must be a list of names from 'domains' {domains}, got {heldout!r}"
        )
    return domains


def _resolve_item(
    path: str, base_dir: str, split: str, idx: int, item: Any, domains: list[str], check_files: bool
) -> dict:
    where = f"{path}: item {idx} of '{split}'"
    if not isinstance(item, dict):
        raise MeduetInputError(
            f"{where}: expected an object like {{\"image\": ..., \"domain\": ...}}, got {type(item).__name__}"
        )
    out = dict(item)
    image = item.get("image")
    if not isinstance(image, str) or not image:
        raise MeduetInputError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    out["image"] = resolve_path(base_dir, image)
    if "label" in item:
        label = item["label"]
        if label is None:  # an explicit null means "no label"; MONAI's allow_missing_keys wants no key
            del out["label"]
        elif not isinstance(label, str) or not label:
            raise MeduetInputError(f"{where}: 'label' must be a path string when present, got {label!r}")
        else:
            out["label"] = resolve_path(base_dir, label)
    domain = item.get("domain")
    if domain not in domains:
        raise MeduetInputError(
            f"{where}: domain {domain!r} is not one of the datalist's domains {domains}; "
            "fix the item's 'domain' or add the site to the top-level 'domains' list"
        )
    out["domain_index"] = domains.index(domain)
    if check_files:
        for key in ("image", "label"):
            if key in out and not os.path.exists(out[key]):
                raise MeduetInputError(
                    f"{where}: {key} file '{out[key]}' does not exist; "
                    f"fix the path or regenerate the sample data with: {SAMPLE_HINT}"
                )
    return out


def load_datalist(path: str | os.PathLike, split: str | None = None, check_files: bool = True) -> dict:
    """Read and validate a datalist JSON.

    Args:
        path: the datalist file.
        split: validate and resolve only this split (``"training"``, ``"validation"``, ``"test"``, or any other
            list-valued key); ``None`` validates every split of :data:`SPLITS` that is present.
        check_files: also check that every referenced image/label exists (a file or a DICOM directory).

    Returns:
        A deep copy of the JSON object in which the items of the validated splits have absolute ``image`` /
        ``label`` paths and an added ``domain_index`` (int). Top-level and per-item extra keys are kept.

    Raises:
        MeduetInputError: one line naming the datalist (and item) and the fix.
    """
    path = os.path.abspath(os.fspath(path))
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise MeduetInputError(f"{path}: a datalist must be a JSON object with 'domains' and split lists")
    domains = _check_domains(path, raw)
    base_dir = os.path.dirname(path)
    if split is None:
        splits = [s for s in SPLITS if s in raw]
    else:
        if split not in raw:
            present = [k for k, v in raw.items() if isinstance(v, list) and k not in ("domains", "heldout_domains")]
            raise MeduetInputError(f"{path}: has no split '{split}'; splits present: {present}")
        splits = [split]
    out = copy.deepcopy(raw)
    for s in splits:
        items = raw[s]
        if not isinstance(items, list):
            raise MeduetInputError(f"{path}: '{s}' must be a list of items, got {type(items).__name__}")
        out[s] = [_resolve_item(path, base_dir, s, i, it, domains, check_files) for i, it in enumerate(items)]
    return out


def get_split(path: str | os.PathLike, split: str, check_files: bool = True) -> list[dict]:
    """Return the validated, resolved items of one split of a datalist (see :func:`load_datalist`); an empty split
    is a one-line error (every workflow that reads a split needs items in it: an empty one would fail later inside
    a sampler or a loader with a message that names neither the datalist nor the split)."""
    items = load_datalist(path, split=split, check_files=check_files)[split]
    if not items:
        raise MeduetInputError(f"{path}: split '{split}' has no items; add items to it, or choose another split of "
                               "this datalist with the workflow's split key (e.g. --train_split, --val_split, "
                               "--data_split)")
    return items


def write_datalist(path: str | os.PathLike, data: dict) -> str:
    """Write ``data`` as JSON to ``path`` atomically (``meduet.io.write_json``): a killed writer leaves either the
    previous file or the new one, never a truncated file. Returns the absolute path written."""
    return write_json(path, data)


def case_name(item: dict) -> str:
    """A file-name-safe case id: the item's image file name without its extension."""
    name = os.path.basename(os.path.normpath(str(item["image"])))
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_domains(path: str | os.PathLike) -> list[str]:
    """The checked ``domains`` of a datalist file (one-line error when they are malformed), or ``[]`` when there is
    no such file (data given another way, e.g. by MONAI Label)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    return _check_domains(path, _read_json(path))
