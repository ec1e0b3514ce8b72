"""Check a downloaded bundle without running any of its configs.

    python -m meduet.deploy.verify --zip meduet_seg_v0.2.0.zip --sha256 <published>     # before extracting
    python -m meduet.deploy.verify models/meduet_seg                                    # an extracted bundle
    python -m meduet.deploy.verify models/meduet_seg --zip meduet_seg_v0.2.0.zip --sha256 <published>
    python -m meduet.deploy.verify models/meduet_seg --accept                           # keep your own edits

``--zip`` with ``--sha256``: the zip's sha256 must be the published one (from ``SHA256SUMS`` or
``<zip>.sha256``), checked before anything else. That is the real guard: a zip rewritten together with its
manifest passes the manifest check. Given a bundle folder as well, the folder's ``checksums.sha256`` must be the
zip's, which ties the extracted files to the published hash.

``<bundle_dir>``: every file the bundle's ``checksums.sha256`` lists must be there with its sha256, and every file
under ``meduet/``, ``configs/`` and ``scripts/`` must be listed (:func:`meduet.integrity.verify_bundle`; files
this library's checkpoint writer put there, e.g. a fine-tuned ``models/model.pt``, are accepted). ``--accept``
records the current content of the files that differ or are not listed as your own (the check stays on for the
rest). Exit status 0 with one summary line, 1 with the one-line reason.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from meduet.integrity import MANIFEST, BundleIntegrityError, sha256_file, verify_bundle

__all__ = ["check_zip", "main"]


def check_zip(zip_path: str | Path, published: str) -> str:
    """Raise :class:`BundleIntegrityError` unless the zip's sha256 is ``published``; return the zip's manifest
    text (its ``<name>/checksums.sha256``, empty if it has none)."""
    zip_path = Path(zip_path)
    try:
        actual = sha256_file(zip_path)
    except OSError as e:
        raise BundleIntegrityError(f"{zip_path} cannot be read ({e.strerror or e})") from None
    if actual != published:
        raise BundleIntegrityError(f"{zip_path} has sha256 {actual}, not the published {published}: it is not "
                                   "the published file; do not extract it, download it again")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(f"/{MANIFEST}")]
            return zf.read(names[0]).decode("utf-8") if names else ""
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleIntegrityError(f"{zip_path} is not a readable zip ({e}) although its sha256 is the published "
                                   "one; the published file itself is damaged") from None


def _published(value: str) -> str:
    """A sha256 given as ``<hex>`` or as a ``SHA256SUMS`` line ``<hex>  <name>``."""
    hexd = (value.split() or [""])[0].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise argparse.ArgumentTypeError(f"{value!r} is not a sha256 (64 hexadecimal digits)")
    return hexd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meduet.deploy.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle_dir", nargs="?", help="an extracted bundle (the folder holding checksums.sha256)")
    p.add_argument("--zip", default=None, help="the downloaded zip (with --sha256)")
    p.add_argument("--sha256", type=_published, default=None, help="the zip's published sha256 (SHA256SUMS)")
    p.add_argument("--accept", action="store_true",
                   help="record the current content of differing or unlisted files as your own")
    args = p.parse_args(argv)
    if (args.zip is None) != (args.sha256 is None):
        p.error("--zip and --sha256 go together: the zip and its published sha256")
    if args.bundle_dir is None and args.zip is None:
        p.error("give a bundle folder, or --zip <file> --sha256 <published>, or both")
    done: list[str] = []
    try:
        if args.zip is not None:
            zipped = check_zip(args.zip, args.sha256)
            done.append(f"{Path(args.zip).name} has the published sha256")
            if args.bundle_dir is not None:
                own = Path(args.bundle_dir) / MANIFEST
                if not own.is_file() or own.read_text() != zipped:
                    raise BundleIntegrityError(f"{args.bundle_dir}: {MANIFEST} is not the one in {args.zip}: this "
                                               "folder was not extracted from the published zip; extract it again")
        if args.bundle_dir is not None:
            accepted: list[str] = []
            n = verify_bundle(args.bundle_dir, accept=args.accept, accepted=accepted)
            mine = f" ({len(accepted)} accepted as your own: {', '.join(accepted)})" if accepted else ""
            done.insert(0, f"{args.bundle_dir}: {n} files match {MANIFEST}, none unlisted under meduet/, configs/, "
                           f"scripts/{mine}")
    except BundleIntegrityError as e:
        print(e, file=sys.stderr)
        return 1
    print("; ".join(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
