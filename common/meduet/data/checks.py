"""Input checks: every bad volume becomes a one-line :class:`~meduet.errors.MeduetInputError` naming the file.

Two levels:

* :func:`check_image` — file level, before any training starts (e.g. over a whole datalist with
  :func:`check_datalist_images`): existence, readability, 3D, finite values, non-constant, label on the
  image's grid with integer values.
* MONAI transforms for the data pipeline: :class:`CheckedLoadImaged` (``LoadImaged`` whose missing/unreadable
  file errors name the file) and :class:`CheckInputd` (array-level checks on the loaded MetaTensors, placed
  right after loading, before anything resamples the data).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, LoadImaged, MapTransform

from meduet.data.datalist import SAMPLE_HINT
from meduet.errors import MeduetInputError, find_meduet_error

__all__ = [
    "AFFINE_TOL",
    "check_image",
    "check_datalist_images",
    "find_input_error",
    "CheckedLoadImaged",
    "CheckInputd",
    "CheckModalityd",
    "dicom_modality",
]

#: largest absolute difference between two affines (mm) for them to count as the same grid
AFFINE_TOL = 1e-3
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".img.gz")


def _one_line(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _missing(path: str, what: str = "image") -> MeduetInputError:
    return MeduetInputError(
        f"{path}: {what} file does not exist; fix the path in the datalist or regenerate the sample data "
        f"with: {SAMPLE_HINT}"
    )


def _read_volume(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file (nibabel) or anything MONAI's LoadImage reads (DICOM series folder, NRRD, MHA, ...).

    Returns ``(array, affine)``: the array as stored, spatial axes first (x, y, z[, channels]); the affine (4, 4)
    maps voxel indices to RAS world coordinates in mm.
    """
    if not os.path.exists(path):
        raise _missing(path, what)
    fix = "re-export it as NIfTI (.nii.gz) or a DICOM series folder"
    try:
        if os.path.isfile(path) and path.lower().endswith(_NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        img = LoadImage(image_only=True)(path)
        return np.asarray(img), np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as e:  # nibabel/gzip/ITK raise many types for corrupt files; all mean "unreadable"
        kind = "DICOM series folder" if os.path.isdir(path) else "file"
        raise MeduetInputError(f"{path}: cannot read {what} {kind} ({_one_line(e)}); {fix}") from None


def _spatial(path: str, arr: np.ndarray, what: str, expected_channels: int | None) -> tuple[tuple[int, ...], int]:
    """Validate that ``arr`` (x, y, z[, c...]) is a 3D volume; returns (spatial shape, channel count)."""
    if arr.ndim < 3:
        raise MeduetInputError(
            f"{path}: {what} is {arr.ndim}D with shape {tuple(arr.shape)}, expected a 3D volume; "
            "convert the slice stack to one 3D file"
        )
    spatial = tuple(int(s) for s in arr.shape[:3])
    if min(spatial) < 2:
        raise MeduetInputError(
            f"{path}: {what} has shape {tuple(arr.shape)}, a single slice, expected a 3D volume; "
            "convert the slice stack to one 3D file"
        )
    extra = [int(s) for s in arr.shape[3:] if s != 1]
    if len(extra) > 1:
        raise MeduetInputError(
            f"{path}: {what} has shape {tuple(arr.shape)}, expected 3D (x, y, z) or 4D (x, y, z, channels)"
        )
    channels = extra[0] if extra else 1
    if expected_channels is not None and channels != expected_channels:
        raise MeduetInputError(
            f"{path}: {what} has {channels} channels (shape {tuple(arr.shape)}), expected {expected_channels}; "
            + _channel_fix(expected_channels)
        )
    return spatial, channels


def _channel_fix(expected: int) -> str:
    if expected == 1:
        return "split the 4D file into one 3D file per volume"
    return f"stack the {expected} channels along the 4th dimension"


def _values(path: str, arr: np.ndarray, what: str) -> None:
    """Reject NaN / Inf and constant volumes."""
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            raise MeduetInputError(
                f"{path}: {what} contains {n_nan} NaN and {n_inf} Inf voxels; "
                "replace them (e.g. by the background value) and run again"
            )
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise MeduetInputError(
            f"{path}: {what} is constant (every voxel is {lo.item():g}), an empty volume; "
            "check the export or remove the item from the datalist"
        )


def check_image(
    path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    expected_channels: int | None = None,
) -> dict[str, Any]:
    """Check one image (and optionally its label map) before it enters a pipeline.

    Args:
        path: a NIfTI file, another format MONAI reads, or a DICOM series folder.
        label_path: the label map that must lie on the image's grid (same spatial shape, affine within
            :data:`AFFINE_TOL`) and hold integer values only.
        expected_channels: required channel count; ``None`` accepts any. A trailing singleton 4th axis
            (x, y, z, 1) always counts as one channel.

    Returns:
        ``{"path", "shape" (x, y, z), "channels", "spacing" (mm, per axis), "affine" (4x4 nested list), "dtype"}``
        plus ``"label_path"`` and ``"label_values"`` (sorted ints) when a label is given.

    Raises:
        MeduetInputError: a single line naming the file, the problem and the fix.
    """
    path = os.path.abspath(os.fspath(path))
    arr, affine = _read_volume(path, "image")
    shape, channels = _spatial(path, arr, "image", expected_channels)
    _values(path, arr, "image")
    info: dict[str, Any] = {
        "path": path,
        "shape": shape,
        "channels": channels,
        "spacing": tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))),
        "affine": affine.tolist(),
        "dtype": str(arr.dtype),
    }
    if label_path is not None:
        label_path = os.path.abspath(os.fspath(label_path))
        lab, lab_aff = _read_volume(label_path, "label")
        lab_shape, _ = _spatial(label_path, lab, "label", 1)
        if lab_shape != shape:
            raise MeduetInputError(
                f"{label_path}: label shape {lab_shape} does not match image {path} shape {shape}; "
                "resample the label onto the image grid (nearest neighbour)"
            )
        diff = float(np.abs(lab_aff - affine).max())
        if diff > AFFINE_TOL:
            raise MeduetInputError(
                f"{label_path}: label affine differs from image {path} affine by up to {diff:.4g} mm "
                f"(tolerance {AFFINE_TOL}); resample the label onto the image grid or fix its header"
            )
        if lab.dtype.kind in "fc":
            if not np.isfinite(lab).all():
                raise MeduetInputError(f"{label_path}: label contains NaN/Inf; a label map holds class indices")
            if not np.array_equal(lab, np.round(lab)):
                raise MeduetInputError(
                    f"{label_path}: label has non-integer values; a label map holds class indices "
                    "(was it resampled with linear interpolation? use nearest neighbour)"
                )
        info["label_path"] = label_path
        info["label_values"] = [int(v) for v in np.unique(lab)]
    return info


def find_input_error(exc: BaseException | None) -> MeduetInputError | None:
    """The first :class:`MeduetInputError` along an exception's ``__cause__`` / ``__context__`` chain, or None.

    MONAI wraps exceptions raised inside transforms (``Dataset.__getitem__``, ``Compose``) into
    ``RuntimeError("applying transform ...")``; top-level code can use this to report the one-line input error.
    """
    err = find_meduet_error(exc)
    return err if isinstance(err, MeduetInputError) else None


def check_datalist_images(items: Sequence[Mapping[str, Any]], expected_channels: int | None = None) -> list[dict]:
    """Run :func:`check_image` on every resolved datalist item (``image`` and optional ``label``)."""
    return [check_image(it["image"], it.get("label"), expected_channels) for it in items]


# ----------------------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------------------


def _filename(x: Any, fallback: str) -> str:
    meta = getattr(x, "meta", None) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else fallback


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` whose errors for a missing or unreadable file are one-line ``MeduetInputError``\\ s.

    Loads each key on its own so the message names the file that failed. Accepts every ``LoadImaged``
    argument. String/path values are checked for existence first (a DICOM series folder counts).
    """

    def __call__(self, data, reader=None):
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            src = d[key]
            if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
                raise _missing(os.path.abspath(os.fspath(src)), f"'{key}'")
            try:
                out = self._loader(src, reader)
            except MeduetInputError:
                raise
            except MemoryError:
                raise
            except Exception as e:
                raise MeduetInputError(
                    f"{src}: cannot read '{key}' ({_one_line(e)}); "
                    "re-export it as NIfTI (.nii.gz) or a DICOM series folder"
                ) from None
            if self._loader.image_only:
                d[key] = out
            else:
                d[key] = out[0]
                meta_key = meta_key or f"{key}_{meta_key_postfix}"
                if meta_key in d and not self.overwriting:
                    raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
                d[meta_key] = out[1]
        return d


class CheckInputd(MapTransform):
    """Array-level input checks on channel-first MetaTensors, right after ``LoadImaged(ensure_channel_first=True)``.

    The first key is the image, further keys (e.g. ``label``) are label maps checked against it:

    * image: shape (C, X, Y, Z) — a 2D image or a 4D input with an unexpected channel count is rejected;
      values finite; not constant;
    * labels: shape (1, X, Y, Z) with the image's spatial shape, affine equal to the image's within
      :data:`AFFINE_TOL`, integer values.

    Errors are one-line :class:`~meduet.errors.MeduetInputError` naming ``meta["filename_or_obj"]``.
    The data pass through unchanged.

    Args:
        keys: image key first, then label keys. Missing label keys are allowed by default.
        expected_channels: required image channel count (``None`` accepts any).
        allow_missing_keys: skip keys absent from the item (items without a label).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        expected_channels: int | None = None,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.expected_channels = expected_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key = self.keys[0]
        image = d.get(image_key)
        if image is None:
            if self.allow_missing_keys:
                return d
            raise KeyError(image_key)
        img_name = _filename(image, f"<item '{image_key}'>")
        self._check_array(image, img_name, "image", self.expected_channels)
        img_aff = getattr(image, "affine", None)
        for key in self.key_iterator(d):
            if key == image_key:
                continue
            lab = d[key]
            name = _filename(lab, f"<item '{key}'>")
            self._check_array(lab, name, "label", 1, check_values=False)
            if tuple(lab.shape[1:]) != tuple(image.shape[1:]):
                raise MeduetInputError(
                    f"{name}: label shape {tuple(lab.shape[1:])} does not match image {img_name} shape "
                    f"{tuple(image.shape[1:])}; resample the label onto the image grid (nearest neighbour)"
                )
            lab_aff = getattr(lab, "affine", None)
            if img_aff is not None and lab_aff is not None:
                diff = float((torch.as_tensor(lab_aff, dtype=torch.float64)
                              - torch.as_tensor(img_aff, dtype=torch.float64)).abs().max())
                if diff > AFFINE_TOL:
                    raise MeduetInputError(
                        f"{name}: label affine differs from image {img_name} affine by up to {diff:.4g} mm "
                        f"(tolerance {AFFINE_TOL}); resample the label onto the image grid or fix its header"
                    )
            t = torch.as_tensor(lab)
            if t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    raise MeduetInputError(f"{name}: label contains NaN/Inf; a label map holds class indices")
                if not bool(torch.equal(t, torch.round(t))):
                    raise MeduetInputError(
                        f"{name}: label has non-integer values; a label map holds class indices "
                        "(was it resampled with linear interpolation? use nearest neighbour)"
                    )
        return d

    @staticmethod
    def _check_array(x: Any, name: str, what: str, expected_channels: int | None, check_values: bool = True) -> None:
        t = torch.as_tensor(x)
        if t.ndim != 4:
            spatial = t.ndim - 1
            raise MeduetInputError(
                f"{name}: {what} is {spatial}D (channel-first shape {tuple(t.shape)}), expected a 3D volume; "
                "convert the slice stack to one 3D file"
            )
        if min(t.shape[1:]) < 2:
            raise MeduetInputError(
                f"{name}: {what} has channel-first shape {tuple(t.shape)}, a single slice, expected a 3D volume"
            )
        if expected_channels is not None and t.shape[0] != expected_channels:
            raise MeduetInputError(
                f"{name}: {what} has {t.shape[0]} channels (channel-first shape {tuple(t.shape)}), "
                f"expected {expected_channels}; {_channel_fix(expected_channels)}"
            )
        if not check_values:
            return
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(t).sum())
                raise MeduetInputError(
                    f"{name}: {what} contains {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf voxels; "
                    "replace them (e.g. by the background value) and run again"
                )
        if t.numel() and bool(t.min() == t.max()):
            raise MeduetInputError(
                f"{name}: {what} is constant (every voxel is {t.flatten()[0].item():g}), an empty volume; "
                "check the export or remove the item from the datalist"
            )


#: a CT in Hounsfield units has values below this (fat, lung, air; a volume written through a soft-tissue window
#: still has its floor, e.g. -175); an MR (non-negative, or z-scored to a few units) has none
CT_MIN_BELOW = -50.0
#: an MR has no values below this (CT air is ~-1000 HU)
MR_MIN_ABOVE = -500.0


def dicom_modality(source: Any) -> str | None:
    """The ``Modality`` of a DICOM file or of the first file of a series folder (header only), or None."""
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if not f.startswith("."))
        path = os.path.join(path, files[0]) if files else ""
    if not path or path.lower().endswith(_NIFTI_SUFFIXES) or not os.path.isfile(path):
        return None
    try:
        import pydicom

        value = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality")
    except Exception:  # noqa: BLE001 - not a DICOM file: no header to read
        return None
    return str(value).upper() if value else None


class CheckModalityd(MapTransform):
    """The image is of the modality the workflow reads it as (before the CT window or MR percentiles are applied).

    A DICOM input's header ``Modality`` must be ``modality`` (CT or MR; other values are not checked). Without a
    header (NIfTI), the intensities decide: a CT in Hounsfield units has values below ``CT_MIN_BELOW``; an MR has
    nothing below ``MR_MIN_ABOVE``. Otherwise a one-line ``MeduetInputError`` names
    the file and the override (``--preprocessing_args#modality MR`` / ``CT``), so an MR never silently goes through
    the CT window (or the reverse). The data pass through unchanged.
    """

    def __init__(self, keys: KeysCollection, modality: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = str(modality).upper()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        image = d[key]
        name = _filename(image, f"<item '{key}'>")
        override = "--preprocessing_args#modality"
        header = dicom_modality(name)
        if header in ("CT", "MR"):
            if header != self.modality:
                raise MeduetInputError(f"{name}: its DICOM header says {header} but this workflow reads it as "
                                       f"{self.modality}; pass {override} {header}")
            return d
        arr = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        lo, hi = float(arr.min()), float(arr.max())
        if self.modality == "CT" and not lo < CT_MIN_BELOW:
            raise MeduetInputError(f"{name}: intensities {lo:.4g} to {hi:.4g} are not a CT in Hounsfield units "
                                   f"(nothing below {CT_MIN_BELOW:g} HU); an MR: pass {override} MR; a CT stored "
                                   "without its rescale: re-export it in HU")
        if self.modality == "MR" and lo < MR_MIN_ABOVE:
            raise MeduetInputError(f"{name}: intensities down to {lo:.4g} look like a CT in Hounsfield units, read "
                                   f"here as MR; pass {override} CT")
        return d
