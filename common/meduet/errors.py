"""Errors users see: one line that names the file and the fix.

Importing ``meduet`` installs a ``sys.excepthook`` that, for an uncaught exception whose cause chain contains one
of these errors (MONAI's config parser and transforms wrap errors several times), prints just that one line
instead of the whole traceback. Set ``MEDUET_TRACEBACK=1`` to see full tracebacks.
"""

from __future__ import annotations

import os
import re
import sys
from types import TracebackType
from typing import Any


class MeduetError(Exception):
    """Base of the errors whose message is meant for users as it is."""


class MeduetInputError(MeduetError, ValueError):
    """Bad input data (unreadable, not 3D, NaN/Inf, grid mismatch, unknown domain, ...)."""


class MeduetConfigError(MeduetError, ValueError):
    """A missing upstream checkpoint or an inconsistent configuration."""


def fire_bool_hint(key: str) -> str:
    """How to pass a bool on ``monai.bundle run``'s command line (python-fire reads ``false`` as a string)."""
    return f"on the command line: --{key} True or --{key} False, capitalised, so that python-fire passes a bool"


def require_bool(value: Any, key: str) -> bool:
    """``value`` if it is a bool, else a one-line ``MeduetConfigError`` naming ``key``: python-fire (``monai.bundle
    run``) passes ``--key false`` as the string 'false', which Python reads as true."""
    if not isinstance(value, bool):
        raise MeduetConfigError(f"{key} must be True or False, got {value!r} ({fire_bool_hint(key)})")
    return value


def find_meduet_error(exc: BaseException | None) -> MeduetError | None:
    """The first ``MeduetError`` in an exception's ``__cause__``/``__context__`` chain, or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MeduetError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    err: BaseException | None = find_meduet_error(value)
    failed_import = _failed_meduet_import(value) if err is None else None
    if (err is None and failed_import is None) or os.environ.get("MEDUET_TRACEBACK", "0") not in ("", "0"):
        _previous_hook(etype, value, tb)
        return
    print(f"{type(err).__name__}: {err}" if err is not None else _original_line(failed_import), file=sys.stderr)


def _original_line(exc: BaseException) -> str:
    """The original error's own line (``BundleIntegrityError: ...``), which MONAI's ``OptionalImportError`` quotes as
    the last line of an "Original traceback"; its first line if there is none."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    match = re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)$", lines[-1]) if lines else None
    return f"{match.group(1)}: {match.group(2)}" if match else f"{type(exc).__name__}: {lines[0] if lines else exc}"


def _failed_meduet_import(exc: BaseException | None) -> BaseException | None:
    """MONAI's ``optional_import`` turns a failing ``import meduet`` (e.g. a packaged bundle that fails its checksum
    check) into an ``OptionalImportError`` that only quotes the original message: find it in the chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "OptionalImportError" and str(exc).startswith("import meduet"):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Make uncaught MeduetErrors print as one line (idempotent)."""
    if sys.excepthook is not _excepthook:
        global _previous_hook
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
