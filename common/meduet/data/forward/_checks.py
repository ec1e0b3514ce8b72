"""Input checks shared by the forward models: each failure is one ``MeduetInputError`` line, "problem; fix"."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meduet.errors import MeduetInputError


def check_volume(x: torch.Tensor, name: str, spatial: Sequence[int | None], operator: str,
                 fix: str = "resize/crop it or build the operator for this shape") -> None:
    """``x`` must be a tensor ``(B, C, *spatial)`` (a ``None`` size matches any size)."""
    if not isinstance(x, torch.Tensor):
        raise MeduetInputError(f"{name} for {operator} is a {type(x).__name__}, not a torch.Tensor; "
                               "pass torch.as_tensor(...) shaped (B, C, ...)")
    want = tuple(None if s is None else int(s) for s in spatial)
    if x.ndim != 2 + len(want) or any(w is not None and w != s for w, s in zip(want, x.shape[2:])):
        dims = ", ".join("S" if w is None else str(w) for w in want)
        raise MeduetInputError(f"{name} for {operator} has shape {tuple(x.shape)}, expected (B, C, {dims}); {fix}")


def check_real(x: torch.Tensor, name: str, operator: str) -> None:
    """``x`` must be a real floating tensor (CT/PET images and sinograms)."""
    if x.is_complex():
        raise MeduetInputError(f"{name} for {operator} is complex ({x.dtype}); pass a real tensor "
                               "(e.g. x.abs() of a complex image)")
    if not x.is_floating_point():
        raise MeduetInputError(f"{name} for {operator} has integer dtype {x.dtype}; convert it with .float()")


def check_complex(y: torch.Tensor, name: str, operator: str) -> None:
    """``y`` must be complex (k-space)."""
    if not y.is_complex():
        raise MeduetInputError(f"{name} for {operator} is real ({y.dtype}) but k-space is complex; pass the "
                               "complex output of MRIForward (or torch.complex(real, imag))")


def check_finite(x: torch.Tensor, name: str) -> None:
    """No NaN/Inf (one synchronising reduction: called by the reconstructions, not by forward/adjoint)."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise MeduetInputError(f"{name} has {n_bad} NaN/Inf values; remove or replace them (e.g. torch.nan_to_num) "
                               "before reconstructing")


def check_non_negative(x: torch.Tensor, name: str, fix: str) -> None:
    """No negative value (PET counts and activity)."""
    if bool((x < 0).any()):
        raise MeduetInputError(f"{name} has {int((x < 0).sum())} negative values (min {float(x.min()):.4g}); {fix}")
