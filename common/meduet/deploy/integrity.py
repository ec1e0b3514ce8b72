"""Checksums of a packaged bundle, checked before anything in it is used.

A bundle written by :mod:`meduet.deploy.package` carries ``checksums.sha256`` at its root (``sha256sum`` format:
``<hex>  <path relative to the bundle root>``) and a vendored copy of this library whose ``_packaged.json`` marks
it as packaged. Every bundle config imports ``meduet`` before it builds or loads anything, and a packaged
``meduet`` verifies its bundle on import (:func:`verify_on_import`): a file that is missing or differs from the
published one makes the import fail with one line naming the file, so a tampered or half-extracted download is
refused before its configs, weights or code are used.

The check runs once per extraction: success writes ``.meduet_verified`` holding the manifest's hash and the
manifest file's modification time, which a copy made by unzipping cannot predict. After that, the bundle is the
user's: fine-tuning may overwrite ``models/model.pt``. A new download (new extraction) is checked again.

This guards against corruption and against a zip whose files were changed without the manifest; a zip rewritten
together with its manifest is caught by the zip's published sha256 (``dist/SHA256SUMS``), checked by MONAI's
``download_url(..., hash_val=..., hash_type="sha256")`` before extraction (see the repository README).

Only the standard library (and ``meduet.errors``) is used here: the check runs before anything else of the bundle is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from meduet.errors import MeduetError

MANIFEST = "checksums.sha256"
STAMP = ".meduet_verified"
PACKAGED_MARKER = "_packaged.json"
SKIP_ENV = "MEDUET_SKIP_INTEGRITY"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-format file."""
    entries: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise ValueError(f"{path}: malformed line {line!r} (expected '<sha256>  <path>')")
        entries[rel] = digest
    return entries


def write_manifest(root: str | Path, files: list[str], out: str | Path) -> dict[str, str]:
    """Write the ``sha256sum`` manifest of ``files`` (paths relative to ``root``, sorted) to ``out``."""
    root = Path(root)
    digests = {rel: sha256_file(root / rel) for rel in sorted(files)}
    Path(out).write_text("".join(f"{d}  {rel}\n" for rel, d in digests.items()))
    return digests


class BundleIntegrityError(MeduetError, RuntimeError):
    """A packaged bundle's files do not match its published checksums."""


def verify_bundle(root: str | Path, skip: tuple[str, ...] = ()) -> int:
    """Check every file of ``root/checksums.sha256``; return how many were checked.

    ``skip``: manifest entries not to check (e.g. large files not downloaded yet). Raises
    :class:`BundleIntegrityError` with one line naming the first bad file, the number of others, and the fix.
    """
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise BundleIntegrityError(f"{root}: {MANIFEST} is missing, so this bundle cannot be verified; "
                                   "download it again")
    bad: list[str] = []
    checked = 0
    for rel, digest in read_manifest(manifest).items():
        if rel in skip:
            continue
        p = root / rel
        if not p.is_file():
            bad.append(f"{rel} is missing")
        elif sha256_file(p) != digest:
            bad.append(f"{rel} differs from the published file")
        checked += 1
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BundleIntegrityError(
            f"bundle {root} failed its checksum check: {bad[0]}{more}; nothing was loaded. Download it again "
            f"(and its large files: python -m monai.bundle download_large_files --bundle_path {root}); "
            f"set {SKIP_ENV}=1 only if you changed these files yourself")
    return checked


def _stamp_value(root: Path) -> str:
    manifest = root / MANIFEST
    st = manifest.stat()
    return f"{sha256_file(manifest)} {st.st_mtime_ns} {st.st_size}\n"


def verify_on_import(package_dir: str | Path) -> None:
    """Called by a packaged ``meduet/__init__.py``: verify the bundle that vendors it, once per extraction."""
    package_dir = Path(package_dir)
    marker = package_dir / PACKAGED_MARKER
    if not marker.is_file() or os.environ.get(SKIP_ENV, "0") not in ("", "0"):
        return
    info = json.loads(marker.read_text())
    root = package_dir.parent
    stamp = root / STAMP
    try:
        if stamp.is_file() and stamp.read_text() == _stamp_value(root):
            return
    except OSError:
        pass
    verify_bundle(root)
    try:  # best effort: a read-only bundle is simply verified on every import
        tmp = stamp.with_name(stamp.name + f".tmp{os.getpid()}")
        tmp.write_text(_stamp_value(root))
        os.replace(tmp, stamp)
    except OSError:
        pass
    if os.environ.get("MEDUET_VERBOSE_INTEGRITY"):
        print(f"verified {info.get('name')} v{info.get('version')} at {root}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m meduet.deploy.integrity <bundle_root>``: check a bundle's files against its manifest."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("bundle_root")
    args = p.parse_args(argv)
    try:
        n = verify_bundle(args.bundle_root)
    except BundleIntegrityError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.bundle_root}: {n} files match {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
