"""Atomic file writes: a temporary file in the target folder, flushed to disk, then renamed over the target.

A killed writer leaves either the previous file or the complete new one, never a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json", "save_nifti", "jsonable"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is synced and renamed to ``path``.

    ``suffix`` lets writers that choose the format by extension (e.g. ``.nii.gz``) see the right one.
    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...), so records compare equal after a round trip."""
    return json.loads(json.dumps(value))


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> str:
    """Write ``data`` as JSON to ``path`` atomically (serialised first, so a ``TypeError`` leaves nothing behind);
    returns the absolute path written."""
    path = os.path.abspath(os.fspath(path))
    text = json.dumps(data, indent=indent) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def save_nifti(path: str | os.PathLike, array: Any, affine: Any) -> None:
    """Write ``array`` as NIfTI with ``affine`` (atomically)."""
    import nibabel as nib

    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)
