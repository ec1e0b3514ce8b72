"""Integrity of a packaged bundle: its files checked against its published checksums before they are used.

A bundle written by :mod:`meduet.deploy.package` carries ``checksums.sha256`` at its root (``sha256sum`` format:
``<hex>  <path relative to the bundle root>``) and a vendored copy of this library whose ``_packaged.json`` marks
it as packaged. Such a bundle is checked

* when its vendored ``meduet`` is imported (``verify_on_import``; every config imports ``meduet`` first), and
* whatever ``meduet`` is imported (an installed one, e.g. with ``--bundle_root`` from outside the bundle folder),
  whenever a checkpoint inside it is read: :func:`meduet.records.read_state_dict` (behind ``records.read``,
  ``records.require`` -- the inference configs' first run step -- and every stage's checkpoint loader) calls
  :func:`check_path`, which walks up from the checkpoint to the nearest folder holding ``checksums.sha256`` and
  ``meduet/_packaged.json`` (a few ``stat`` calls; nothing when there is none);
* on request, without running any config: ``python -m meduet.deploy.verify <bundle_dir>`` (:mod:`meduet.deploy.verify`).

Full verification refuses, with one line naming the file: a listed file that is missing or whose sha256 differs;
a file under the code-bearing folders (``meduet/``, ``configs/``, ``scripts/``) that the manifest does not list
("... is not part of the published bundle"). ``__pycache__/`` folders are ignored there: Python writes them itself
when it imports the vendored library or a bundle script. Unlisted files elsewhere (``runs/``, ``eval/``,
``models/checkpoint.pt`` written by training) are the user's and allowed.

Success writes the stamp ``.meduet_verified`` (JSON): the manifest's sha256, the ``(size, mtime_ns, ctime_ns)`` of
every listed file and of every file under the code-bearing folders (so also the set of those files), and the
"local" digests the user accepted. Later checks skip hashing only when all of that is unchanged; a file changed,
added or removed since -- or a new extraction over the folder -- makes the next check a full verification. The
change time is recorded besides size and mtime because mtime is settable (``unzip`` restores a zip's
timestamps, ``touch -r``), ctime is not; a changed ctime only costs one more full verification.

The bundle is the user's after download. Files this library's own checkpoint writer
(:func:`meduet.engines.checkpoint.atomic_save`, e.g. training overwriting ``models/model.pt``) writes into a
bundle that was intact just before are recorded in the stamp as accepted local digests (:func:`writing`); full
verification takes a file whose sha256 is the manifest's or its accepted local one. A file changed by anything
else is refused; to keep one's own edit, ``python -m meduet.deploy.verify <bundle_dir> --accept`` records the
current content of the differing and unlisted files as accepted (``MEDUET_SKIP_INTEGRITY=1`` skips every check).

What this protects against: corruption, a half-extracted or half-downloaded bundle, a zip whose files were changed
without its manifest, a file changed or added after the first check. Not against a zip rewritten together with
its manifest, nor against someone who can write into the folder and forge the stamp (it is no signature): check
the zip against the published ``SHA256SUMS`` before extracting (``python -m meduet.deploy.verify --zip <zip>
--sha256 <published>`` or MONAI's ``download_url(..., hash_val=..., hash_type="sha256")``). A config is code:
with an installed ``meduet`` the config's expressions run before its first checkpoint is read.

Only the standard library (and ``meduet.errors``) is used here: the check runs before anything else of the bundle is
imported. This module sits at the package's top level (not in ``meduet.deploy``) so that ``meduet.records`` and
``meduet.engines`` may import it (tests/unit/test_layers.py); ``meduet.deploy.integrity`` re-exports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meduet.errors import MeduetError

__all__ = ["MANIFEST", "STAMP", "PACKAGED_MARKER", "SKIP_ENV", "CODE_DIRS", "BundleIntegrityError", "sha256_file",
           "read_manifest", "write_manifest", "skipped", "bundle_root_of", "verify_bundle", "check_bundle",
           "check_path", "verify_on_import", "writing"]

MANIFEST = "checksums.sha256"
STAMP = ".meduet_verified"
PACKAGED_MARKER = "_packaged.json"
SKIP_ENV = "MEDUET_SKIP_INTEGRITY"
#: folders whose every file must be listed in the manifest (what Python or MONAI may execute)
CODE_DIRS = ("meduet", "configs", "scripts")
_IGNORED_DIR = "__pycache__"
_STAMP_FORMAT = 2


class BundleIntegrityError(MeduetError, RuntimeError):
    """A packaged bundle's files do not match its published checksums."""


def skipped() -> bool:
    """``MEDUET_SKIP_INTEGRITY`` set (to anything but ``0``): no check runs."""
    return os.environ.get(SKIP_ENV, "0") not in ("", "0")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _parse_manifest(text: str, where: str | Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise ValueError(f"{where}: malformed line {line!r} (expected '<sha256>  <path>')")
        entries[rel] = digest
    return entries


def read_manifest(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-format file."""
    return _parse_manifest(Path(path).read_text(), path)


def write_manifest(root: str | Path, files: list[str], out: str | Path) -> dict[str, str]:
    """Write the ``sha256sum`` manifest of ``files`` (paths relative to ``root``, sorted) to ``out``."""
    root = Path(root)
    digests = {rel: sha256_file(root / rel) for rel in sorted(files)}
    Path(out).write_text("".join(f"{d}  {rel}\n" for rel, d in digests.items()))
    return digests


def _is_packaged(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and (folder / "meduet" / PACKAGED_MARKER).is_file()


def bundle_root_of(path: str | Path) -> Path | None:
    """The nearest folder above ``path`` holding ``checksums.sha256`` and ``meduet/_packaged.json``, or None."""
    for folder in Path(os.path.abspath(path)).parents:
        if _is_packaged(folder):
            return folder
    return None


# ----------------------------------------------------------------------------------------------------------------
# what the stamp records
# ----------------------------------------------------------------------------------------------------------------
def _manifest(root: Path) -> tuple[str, dict[str, str]]:
    """The manifest's sha256 and entries; a missing or malformed manifest is a ``BundleIntegrityError``."""
    path = root / MANIFEST
    try:
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), _parse_manifest(data.decode("utf-8"), path)
    except (OSError, ValueError) as e:
        reason = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({e})"
        raise BundleIntegrityError(f"{root}: {MANIFEST} {reason}, so this bundle cannot be verified; download it "
                                   "again") from None


def _code_files(root: Path) -> list[str]:
    """Every file under the code-bearing folders (``__pycache__`` folders left out), relative, sorted."""
    found: list[str] = []
    for top in CODE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if d != _IGNORED_DIR]
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            found += [f"{rel_dir}/{name}" for name in filenames]
    return sorted(found)


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _snapshot(root: Path, listed: Iterable[str]) -> dict[str, list[int] | None]:
    return {rel: _stat(root / rel) for rel in sorted(set(listed) | set(_code_files(root)))}


def _read_stamp(root: Path) -> dict | None:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(stamp, dict) and stamp.get("format") == _STAMP_FORMAT and isinstance(stamp.get("files"), dict)
    return stamp if ok else None


def _write_stamp(root: Path, stamp: dict) -> None:
    """Best effort: a read-only bundle is simply verified in full every time."""
    tmp = root / f"{STAMP}.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stamp, sort_keys=True))
        os.replace(tmp, root / STAMP)
    except OSError:
        tmp.unlink(missing_ok=True)


def _stamp_matches(root: Path) -> bool:
    """The fast path: the stamp's manifest hash and every recorded (size, mtime, ctime) and file set still hold."""
    stamp = _read_stamp(root)
    if stamp is None:
        return False
    try:
        digest, entries = _manifest(root)
    except BundleIntegrityError:
        return False
    return stamp.get("manifest") == digest and stamp["files"] == _snapshot(root, entries)


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def _failure(root: Path, bad: list[str]) -> BundleIntegrityError:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return BundleIntegrityError(
        f"bundle {root} failed its checksum check: {bad[0]}{more}; download it again (and its large files: "
        f"python -m monai.bundle download_large_files --bundle_path {root}); if you changed these files yourself, "
        f"accept them with python -m meduet.deploy.verify {root} --accept (or set {SKIP_ENV}=1)")


def verify_bundle(root: str | Path, skip: tuple[str, ...] = (), accept: bool = False,
                  accepted: list[str] | None = None) -> int:
    """Full verification of ``root`` (hashing every listed file); return how many listed files were checked.

    Refuses a listed file that is missing or differs from both its manifest digest and its accepted local digest,
    and a file under the code-bearing folders that the manifest does not list (or whose content is not the accepted
    one). ``skip``: manifest entries not to check (e.g. large files not downloaded yet; no stamp is written then).
    ``accept``: record the current content of differing and unlisted files as accepted instead of refusing them
    (their names are appended to ``accepted``). Raises :class:`BundleIntegrityError` with one line naming the first
    bad file, the number of others, and the fix; success writes the stamp.
    """
    root = Path(root)
    digest, entries = _manifest(root)
    stamp = _read_stamp(root) or {}
    before = stamp.get("local", {}) if stamp.get("manifest") == digest else {}
    snapshot = _snapshot(root, entries)  # before hashing: a file changed meanwhile is verified again next time
    bad: list[str] = []
    local: dict[str, str] = {}
    checked = 0

    def take(rel: str, actual: str, refusal: str) -> None:
        if actual == before.get(rel) or accept:
            local[rel] = actual
            if accepted is not None and actual != before.get(rel):
                accepted.append(rel)
        else:
            bad.append(f"{rel} {refusal}")

    for rel, expected in entries.items():
        if rel in skip:
            continue
        checked += 1
        if not (root / rel).is_file():
            bad.append(f"{rel} is missing")
        elif (actual := sha256_file(root / rel)) != expected:
            take(rel, actual, "differs from the published file")
    for rel in _code_files(root):
        if rel not in entries:
            actual = sha256_file(root / rel) if accept or rel in before else ""
            take(rel, actual, "is not part of the published bundle")
    if bad:
        raise _failure(root, bad)
    if not skip:
        _write_stamp(root, {"format": _STAMP_FORMAT, "manifest": digest, "files": snapshot, "local": local})
    return checked


def check_bundle(root: str | Path) -> None:
    """Verify ``root`` unless its stamp shows nothing changed since the last verification (or checks are skipped)."""
    root = Path(root)
    if skipped() or _stamp_matches(root):
        return
    verify_bundle(root)


def check_path(path: str | Path) -> Path | None:
    """Check the packaged bundle ``path`` belongs to, if any (its root is returned); cheap when nothing changed."""
    if skipped():
        return None
    root = bundle_root_of(path)
    if root is not None:
        check_bundle(root)
    return root


def _verify_command_running() -> bool:
    """``python -m meduet.deploy.verify`` (or the older ``meduet.deploy.integrity``) checks the bundle itself, with
    ``--accept`` if asked: importing the vendored package on the way must not refuse first."""
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("meduet.deploy.verify", "meduet.deploy.integrity") for a, b in zip(argv, argv[1:]))


def verify_on_import(package_dir: str | Path) -> None:
    """Called by a packaged ``meduet/__init__.py``: check the bundle that vendors it."""
    package_dir = Path(package_dir)
    marker = package_dir / PACKAGED_MARKER
    if not marker.is_file() or skipped() or _verify_command_running():
        return
    check_bundle(package_dir.parent)
    if os.environ.get("MEDUET_VERBOSE_INTEGRITY"):
        info = json.loads(marker.read_text())
        print(f"verified {info.get('name')} v{info.get('version')} at {package_dir.parent}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# this library's own writes into a bundle
# ----------------------------------------------------------------------------------------------------------------
def _tracked(rel: str, entries: dict[str, str]) -> bool:
    parts = rel.split("/")
    return rel in entries or (parts[0] in CODE_DIRS and _IGNORED_DIR not in parts[:-1])


def _intact(root: Path) -> bool:
    if _stamp_matches(root):
        return True
    if skipped():  # the user asked for no hashing
        return False
    try:
        verify_bundle(root)
    except BundleIntegrityError:
        return False
    return True


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around this library's write of ``path``: when ``path`` is a tracked file (listed, or under a code-bearing
    folder) of a packaged bundle that was intact just before, its new content is recorded in the stamp as accepted,
    so the user's own training does not make the bundle's next check fail. Nothing is recorded when the write fails
    or the bundle was not intact (its next check refuses, as for any other change)."""
    root = bundle_root_of(path)
    intact = False
    if root is not None:
        try:
            _, entries = _manifest(root)
        except BundleIntegrityError:
            entries = None
        rel = Path(os.path.abspath(path)).relative_to(root).as_posix()
        intact = entries is not None and _tracked(rel, entries) and _intact(root)
    yield
    if not intact:
        return
    stamp = _read_stamp(root)
    if stamp is None:
        return
    target = root / rel
    actual = sha256_file(target)
    local = dict(stamp.get("local") or {})
    if actual == entries.get(rel):
        local.pop(rel, None)
    else:
        local[rel] = actual
    stamp["local"] = local
    stamp["files"] = {**stamp["files"], rel: _stat(target)}
    _write_stamp(root, stamp)
