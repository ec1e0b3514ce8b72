"""MeDUET bundles: shared library imported by every bundle in ``bundles/``."""

from meduet.errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()
