"""MeDUET bundles: shared library imported by every bundle in ``bundles/``."""

__version__ = "0.1.0"
