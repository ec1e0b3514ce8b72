"""Errors users see: one line that names the file and the fix."""


class MeduetInputError(ValueError):
    """Bad input data (unreadable, not 3D, NaN/Inf, grid mismatch, unknown domain, ...)."""


class MeduetConfigError(ValueError):
    """A missing upstream checkpoint or an inconsistent configuration."""
