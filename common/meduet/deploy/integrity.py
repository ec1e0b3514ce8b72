"""Checksums of a packaged bundle: kept under this name for the vendored ``meduet/__init__.py`` and older callers.

The checks live in :mod:`meduet.integrity` (at the package's top level, so that ``meduet.records`` and
``meduet.engines`` may import them); the command is :mod:`meduet.deploy.verify`
(``python -m meduet.deploy.integrity <bundle_dir>`` runs the same command). This module does not import that
command at module level: a packaged ``meduet/__init__.py`` imports this module, and ``python -m
meduet.deploy.verify`` must find its module not yet imported.
"""

from __future__ import annotations

from meduet.integrity import (
    CODE_DIRS,
    MANIFEST,
    PACKAGED_MARKER,
    SKIP_ENV,
    STAMP,
    BundleIntegrityError,
    bundle_root_of,
    check_bundle,
    check_path,
    read_manifest,
    sha256_file,
    verify_bundle,
    verify_on_import,
    write_manifest,
    writing,
)

__all__ = ["CODE_DIRS", "MANIFEST", "PACKAGED_MARKER", "SKIP_ENV", "STAMP", "BundleIntegrityError",
           "bundle_root_of", "check_bundle", "check_path", "read_manifest", "sha256_file", "verify_bundle",
           "verify_on_import", "write_manifest", "writing"]

if __name__ == "__main__":
    from meduet.deploy.verify import main

    raise SystemExit(main())
