"""Atomic file writes: a temporary file in the target folder, flushed to disk, then renamed over the target.

A killed writer leaves either the previous file or the complete new one, never a truncated file. A run that writes
several files (one per case, then a datalist or a metrics file) and fails part-way removes what it wrote:
:func:`outputs_removed_on_error` (a context manager, or :func:`removes_partial_outputs` on a workflow's ``run``), so a
bad second item does not leave the first item's output behind looking like a result.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json", "save_nifti", "jsonable", "folder_state", "remove_new_outputs",
           "outputs_removed_on_error", "removes_partial_outputs"]


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


def folder_state(folder: str | os.PathLike) -> dict[str, int]:
    """``{path relative to folder: mtime_ns}`` of every file (and ``-1`` for every folder) under ``folder``; empty
    when it does not exist."""
    root = Path(folder)
    state: dict[str, int] = {}
    if not root.is_dir():
        return state
    state["."] = -1
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            state[str(rel / d)] = -1
        for f in filenames:
            try:
                state[str(rel / f)] = (Path(dirpath) / f).stat().st_mtime_ns
            except OSError:
                pass
    return state


def remove_new_outputs(folder: str | os.PathLike, before: dict[str, int]) -> list[str]:
    """Remove the files under ``folder`` that are not in ``before`` (:func:`folder_state` taken when the run
    started) or were modified since, then the folders the run created that are left empty. Returns the removed
    files (relative paths). Best effort: a file that cannot be removed is left."""
    root = Path(folder)
    removed = []
    for rel, mtime in folder_state(root).items():
        if mtime != -1 and before.get(rel) != mtime:
            try:
                (root / rel).unlink()
                removed.append(rel)
            except OSError:
                pass
    new_dirs = sorted((rel for rel, m in folder_state(root).items() if m == -1 and rel not in before),
                      key=lambda r: -len(Path(r).parts))
    for rel in new_dirs:
        try:
            (root / rel).rmdir()  # only when empty
        except OSError:
            pass
    return removed


@contextmanager
def outputs_removed_on_error(folder: str | os.PathLike) -> Iterator[None]:
    """Inside the block, files written under ``folder`` are the run's outputs: if the block raises, they are removed
    (:func:`remove_new_outputs`) and the exception goes on."""
    before = folder_state(folder)
    try:
        yield
    except BaseException:
        remove_new_outputs(folder, before)
        raise


def removes_partial_outputs(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a workflow's ``run(config)``: a failure removes what it wrote under ``config.output_dir``."""

    @functools.wraps(run)
    def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
        with outputs_removed_on_error(config.output_dir):
            return run(config, *args, **kwargs)

    return wrapper
