"""Measurement files: raw MRI k-space, CT sinograms and PET counts on disk, each beside an acquisition JSON that says
how they were measured, read back as torch tensors with their forward model (``meduet.data.forward``).

The acquisition JSON (one object; unknown keys are an error, so a typo does not silently fall back to a default)::

    {"modality": "mri", "image_shape": [64, 64, 64], "spacing": [1.5, 1.5, 1.5],
     "mask": "cartesian", "acceleration": 4, "center_fraction": 0.08, "pattern": "1d", "seed": 0}
    {"modality": "mri", "image_shape": [64, 64, 64], "mask": "radial", "spokes": 32}
    {"modality": "mri", "image_shape": [64, 64, 64], "mask_file": "mask.npy"}     (bool (S1, S2, S3), relative
                                                                                    to the JSON's folder)
    {"modality": "ct", "image_shape": [64, 64, 64], "num_angles": 60, "num_detectors": 91}
    {"modality": "pet", "image_shape": [64, 64, 64], "num_angles": 60, "total_counts": 1e6}

``image_shape`` is required; ``affine`` (4x4, the image grid's voxel-to-world matrix, RAS as in NIfTI) defaults to
``diag(spacing, 1)``, ``spacing`` (mm) to the affine's column norms or 1; ``num_detectors`` to the projector's default
(covers the slice's diagonal); ``pattern`` (``"1d"`` lines along ``S2`` or ``"2d"`` points of the phase-encode plane),
``center_fraction`` (0.08) and ``seed`` (0) are the Cartesian mask's (``meduet.data.forward.cartesian_mask``);
``total_counts`` is used only by ``simulate``. Axes and conventions are those of ``meduet.data.forward`` (readout
along ``S1``, centred k-space; axial slices ``(S1, S2)`` stacked along ``S3``).

The measurement file holds one array of ``Acquisition.measurement_shape()`` (``(S1, S2, S3)`` k-space,
``(num_angles, num_detectors, S3)`` sinogram / counts; leading axes of size 1 are allowed) as ``.npy``, ``.npz``
(key ``"data"``) or NIfTI (``.nii`` / ``.nii.gz``; its affine is ignored: the image grid is the acquisition's).
k-space is stored with a complex dtype in every format (complex64 / complex128, NIfTI's COMPLEX64 / COMPLEX128
types), never as a trailing real/imaginary axis: the dtype alone then tells a complex/real mix-up, and a sinogram
whose last axis happens to be 2 is never misread. CT sinograms and PET counts are real.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet.data.forward import MRIForward, ParallelBeamCT, PETForward, cartesian_mask, fbp, mlem, radial_mask
from meduet.data.forward import simulate_counts
from meduet.errors import MeduetInputError
from meduet.io import atomic_path

__all__ = ["MODALITIES", "Acquisition", "Measurement", "acquisition_from_dict", "read_acquisition", "read_measurement",
           "write_measurement", "simulate"]

MODALITIES = ("mri", "ct", "pet")
MASKS = ("cartesian", "radial")
_COMMON = ("modality", "image_shape", "affine", "spacing")
_KEYS = {"mri": _COMMON + ("mask", "acceleration", "center_fraction", "pattern", "seed", "spokes", "mask_file"),
         "ct": _COMMON + ("num_angles", "num_detectors"),
         "pet": _COMMON + ("num_angles", "num_detectors", "total_counts")}
_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz")


def _where(source: str) -> str:
    return f"acquisition JSON {source}" if source else "acquisition"


def _num(value: Any, key: str, source: str, low: float, integer: bool = False, above: bool = False) -> float:
    """``value`` as a number ``>= low`` (``> low`` with ``above``), else a one-line error naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if above else value >= low) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise MeduetInputError(f"{_where(source)}: '{key}' must be {kind} {'>' if above else '>='} {low:g}, got "
                               f"{value!r}; fix '{key}'")
    return float(value)


def _default_detectors(s1: int, s2: int) -> int:
    """``ParallelBeamCT``'s default detector count (covers the slice's diagonal, parity of ``S1``)."""
    n = int(math.ceil(math.hypot(s1, s2) - 1e-9))
    return n + (n - s1) % 2


@dataclass(frozen=True)
class Acquisition:
    """How a measurement was acquired (see the module docstring for the JSON form). Checked on construction:
    one-line ``MeduetInputError`` naming ``source`` (the JSON path) and the key to fix. ``mask_file`` is kept as an
    absolute path; ``affine`` as a 4x4 tuple of tuples, ``spacing`` / ``image_shape`` as 3-tuples."""

    modality: str
    image_shape: tuple[int, int, int]
    affine: Any = None
    spacing: Any = None
    mask: str | None = None
    acceleration: float | None = None
    center_fraction: float = 0.08
    pattern: str = "1d"
    seed: int = 0
    spokes: int | None = None
    mask_file: str | None = None
    num_angles: int | None = None
    num_detectors: int | None = None
    total_counts: float | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        src, put = self.source, lambda k, v: object.__setattr__(self, k, v)
        if self.modality not in MODALITIES:
            raise MeduetInputError(f"{_where(src)}: unknown modality {self.modality!r}; set \"modality\" to one of "
                                   f"{', '.join(MODALITIES)}")
        shape = self.image_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise MeduetInputError(f"{_where(src)}: 'image_shape' must be three sizes [S1, S2, S3], got {shape!r}; "
                                   "fix 'image_shape'")
        put("image_shape", tuple(int(_num(s, "image_shape", src, 1, integer=True)) for s in shape))
        put("affine", self._affine(src))
        if self.modality == "mri":
            self._check_mri(src, put)
        else:
            if self.num_angles is None:
                raise MeduetInputError(f"{_where(src)}: {self.modality} needs 'num_angles' (projection angles over "
                                       "[0, pi)); add it")
            put("num_angles", int(_num(self.num_angles, "num_angles", src, 1, integer=True)))
            if self.num_detectors is None:  # pinned, so equal geometries compare equal
                put("num_detectors", _default_detectors(*self.image_shape[:2]))
            put("num_detectors", int(_num(self.num_detectors, "num_detectors", src, 1, integer=True)))
            if self.total_counts is not None:
                put("total_counts", _num(self.total_counts, "total_counts", src, 0, above=True))
        other = ("num_angles", "num_detectors", "total_counts") if self.modality == "mri" else \
            ("mask", "acceleration", "spokes", "mask_file")
        stray = [k for k in other if getattr(self, k) is not None]
        if stray:
            raise MeduetInputError(f"{_where(src)}: {stray} do not apply to {self.modality}; remove them")

    def _affine(self, src: str) -> tuple[tuple[float, ...], ...]:
        spacing = None
        if self.spacing is not None:
            sp = self.spacing
            if not isinstance(sp, (list, tuple)) or len(sp) != 3:
                raise MeduetInputError(f"{_where(src)}: 'spacing' must be three sizes in mm, got {sp!r}; fix 'spacing'")
            spacing = tuple(_num(s, "spacing", src, 0, above=True) for s in sp)
        if self.affine is None:
            affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
        else:
            try:
                affine = np.asarray(self.affine, dtype=np.float64)
            except (TypeError, ValueError):
                affine = np.zeros(0)
            if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise MeduetInputError(f"{_where(src)}: 'affine' must be a finite invertible 4x4 matrix (rows), got "
                                       f"{self.affine!r}; fix 'affine' or remove it (default diag(spacing))")
        norms = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        if spacing is not None and not np.allclose(norms, spacing, rtol=1e-3):
            raise MeduetInputError(f"{_where(src)}: 'spacing' {list(spacing)} disagrees with the affine's voxel sizes "
                                   f"{[round(n, 6) for n in norms]}; remove 'spacing' or fix it")
        object.__setattr__(self, "spacing", norms)
        return tuple(tuple(float(v) for v in row) for row in affine)

    def _check_mri(self, src: str, put: Any) -> None:
        if self.mask_file is not None:
            if self.mask is not None or self.acceleration is not None or self.spokes is not None:
                raise MeduetInputError(f"{_where(src)}: give either 'mask_file' or 'mask' with its settings, not "
                                       "both; remove one")
            path = Path(self.mask_file)
            base = Path(src).parent if src else Path.cwd()
            put("mask_file", str(path if path.is_absolute() else (base / path).resolve()))
            return
        if self.mask not in MASKS:
            raise MeduetInputError(f"{_where(src)}: 'mask' must be one of {', '.join(MASKS)} (or give 'mask_file'), "
                                   f"got {self.mask!r}; fix 'mask'")
        if self.mask == "cartesian":
            if self.acceleration is None:
                raise MeduetInputError(f"{_where(src)}: a cartesian mask needs 'acceleration' (e.g. 4); add it")
            put("acceleration", _num(self.acceleration, "acceleration", src, 1))
            cf = _num(self.center_fraction, "center_fraction", src, 0, above=True)
            if cf >= 1:
                raise MeduetInputError(f"{_where(src)}: 'center_fraction' must be in (0, 1), got {cf!r}; fix it")
            put("center_fraction", cf)
            if self.pattern not in ("1d", "2d"):
                raise MeduetInputError(f"{_where(src)}: 'pattern' must be '1d' or '2d', got {self.pattern!r}; fix it")
            put("seed", int(_num(self.seed, "seed", src, 0, integer=True)))
        else:
            if self.spokes is None or self.acceleration is not None:
                raise MeduetInputError(f"{_where(src)}: a radial mask takes 'spokes' (e.g. 32) and no "
                                       "'acceleration'; fix the keys")
            put("spokes", int(_num(self.spokes, "spokes", src, 1, integer=True)))

    @property
    def is_complex(self) -> bool:
        """True when the measurement is complex (MRI k-space)."""
        return self.modality == "mri"

    @property
    def affine_array(self) -> np.ndarray:
        """``affine`` as a float64 ``(4, 4)`` array."""
        return np.asarray(self.affine, dtype=np.float64)

    def measurement_shape(self) -> tuple[int, int, int]:
        """``(S1, S2, S3)`` for MRI k-space; ``(num_angles, num_detectors, S3)`` for a CT / PET sinogram."""
        s1, s2, s3 = self.image_shape
        if self.modality == "mri":
            return (s1, s2, s3)
        return (int(self.num_angles), int(self.num_detectors), s3)

    def sampling_mask(self) -> torch.Tensor:
        """MRI: the bool k-space mask ``(S1, S2, S3)`` (from ``mask_file`` or drawn from the settings)."""
        if self.modality != "mri":
            raise MeduetInputError(f"{_where(self.source)}: {self.modality} has no k-space mask; use operator()")
        if self.mask_file is None:
            if self.mask == "cartesian":
                return cartesian_mask(self.image_shape, float(self.acceleration), self.center_fraction, self.seed,
                                      self.pattern)
            return radial_mask(self.image_shape, int(self.spokes))
        try:
            mask = np.load(self.mask_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MeduetInputError(f"mask_file {self.mask_file} of {_where(self.source)} is unreadable "
                                   f"({type(exc).__name__}); save the mask with numpy.save") from None
        if mask.shape != self.image_shape or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
            raise MeduetInputError(f"mask_file {self.mask_file} holds {mask.dtype} {mask.shape}, not a boolean mask of "
                                   f"image_shape {self.image_shape}; save the k-space sampling mask as bool")
        return torch.from_numpy(np.ascontiguousarray(mask != 0))

    def operator(self) -> MRIForward | ParallelBeamCT | PETForward:
        """The forward model: ``MRIForward`` (k-space mask), ``ParallelBeamCT`` or ``PETForward`` (on the CPU)."""
        if self.modality == "mri":
            return MRIForward(self.sampling_mask())
        cls = ParallelBeamCT if self.modality == "ct" else PETForward
        return cls(self.image_shape[:2], int(self.num_angles), self.measurement_shape()[1])

    def to_json(self, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """The acquisition as a JSON object (a dict; ``read_acquisition`` of it gives an equal ``Acquisition``):
        the keys that apply to the modality; ``mask_file`` relative to ``base_dir`` when given, else absolute."""
        out: dict[str, Any] = {"modality": self.modality, "image_shape": list(self.image_shape),
                               "spacing": list(self.spacing), "affine": [list(r) for r in self.affine]}
        if self.modality == "mri":
            if self.mask_file is not None:
                out["mask_file"] = os.path.relpath(self.mask_file, base_dir) if base_dir is not None else self.mask_file
            elif self.mask == "cartesian":
                out.update(mask="cartesian", acceleration=self.acceleration, center_fraction=self.center_fraction,
                           pattern=self.pattern, seed=self.seed)
            else:
                out.update(mask="radial", spokes=self.spokes)
        else:
            out.update(num_angles=self.num_angles, num_detectors=self.measurement_shape()[1])
            if self.modality == "pet" and self.total_counts is not None:
                out["total_counts"] = self.total_counts
        return out


def acquisition_from_dict(data: Any, source: str = "") -> Acquisition:
    """An ``Acquisition`` from a parsed JSON object (one-line errors for a non-object, unknown or missing keys)."""
    if not isinstance(data, dict):
        raise MeduetInputError(f"{_where(source)} is a JSON {type(data).__name__}, not an object; write "
                               "{\"modality\": ..., \"image_shape\": [...], ...}")
    for key in ("modality", "image_shape"):
        if key not in data:
            raise MeduetInputError(f"{_where(source)} has no '{key}'; add it (modality: {', '.join(MODALITIES)})")
    if data["modality"] not in MODALITIES:
        raise MeduetInputError(f"{_where(source)}: unknown modality {data['modality']!r}; set \"modality\" to one of "
                               f"{', '.join(MODALITIES)}")
    unknown = sorted(set(data) - set(_KEYS[data["modality"]]))
    if unknown:
        raise MeduetInputError(f"{_where(source)}: unknown keys {unknown} for {data['modality']}; remove them (known: "
                               f"{', '.join(_KEYS[data['modality']])})")
    return Acquisition(**data, source=source)


def read_acquisition(path: str | os.PathLike) -> Acquisition:
    """Read and check an acquisition JSON (see the module docstring); ``mask_file`` is resolved against its folder."""
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MeduetInputError(f"acquisition JSON {path} is unreadable ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); pass an existing JSON file") from None
    return acquisition_from_dict(data, source=path)


def _suffix(path: str) -> str:
    low = path.lower()
    for s in _SUFFIXES:
        if low.endswith(s):
            return s
    raise MeduetInputError(f"measurement file {path} has an unknown extension; use one of {', '.join(_SUFFIXES)}")


def _check_array(array: np.ndarray, acq: Acquisition, where: str) -> torch.Tensor:
    """Check a measurement array against ``acq`` -> ``(1, 1, *measurement_shape)`` complex64 / float32 tensor."""
    want = acq.measurement_shape()
    what = {"mri": "k-space", "ct": "sinogram", "pet": "counts"}[acq.modality]
    src = acq.source or "the acquisition"
    if array.dtype.kind not in "biufc":
        raise MeduetInputError(f"{where} holds {array.dtype} data, not numbers; store the {what} as a numeric array")
    shape = tuple(array.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if acq.is_complex and array.dtype.kind != "c" and shape == (*want, 2):
        raise MeduetInputError(f"{where} is real with a trailing axis of 2 (real, imaginary?); store k-space as "
                               "complex (e.g. numpy.complex64(a[..., 0] + 1j * a[..., 1]))")
    if shape != want:
        raise MeduetInputError(f"{where} has shape {tuple(array.shape)} but {src} describes {what} of shape {want}; "
                               "pass the measurement that goes with this acquisition JSON (or fix the JSON)")
    if acq.is_complex and array.dtype.kind != "c":
        raise MeduetInputError(f"{where} is real ({array.dtype}) but MRI k-space is complex; store the complex "
                               "k-space (complex64), not its magnitude or a reconstructed image")
    if not acq.is_complex and array.dtype.kind == "c":
        raise MeduetInputError(f"{where} is complex ({array.dtype}) but a {acq.modality.upper()} {what} is real; store "
                               "the real measurement (or set modality 'mri' if it is k-space)")
    data = np.asarray(array, dtype=np.complex64 if acq.is_complex else np.float32).reshape(1, 1, *want)
    if not np.isfinite(data).all():
        raise MeduetInputError(f"{where} has {int((~np.isfinite(data)).sum())} NaN/Inf values; remove or replace them "
                               "(a re-export of the raw data usually fixes it)")
    if acq.modality == "pet" and (data < 0).any():
        raise MeduetInputError(f"{where} has {int((data < 0).sum())} negative counts; pass the measured counts, not a "
                               "corrected or background-subtracted sinogram")
    return torch.from_numpy(np.ascontiguousarray(data))


@dataclass
class Measurement:
    """A measurement and how it was acquired.

    Attributes:
        data: ``(1, 1, *acquisition.measurement_shape())``: complex64 k-space (mri), float32 sinogram (ct) or
            counts (pet).
        acquisition: the ``Acquisition``.
        path: the file it was read from (``None`` when made in memory).
    """

    data: torch.Tensor
    acquisition: Acquisition
    path: str | None = None
    _operator: Any = field(default=None, init=False, repr=False, compare=False)

    def operator(self) -> MRIForward | ParallelBeamCT | PETForward:
        """The acquisition's forward model (built once per measurement)."""
        if self._operator is None:
            self._operator = self.acquisition.operator()
        return self._operator

    @torch.no_grad()
    def classical(self, mlem_iterations: int = 20) -> torch.Tensor:
        """The classical reconstruction, real float32 ``(1, 1, S1, S2, S3)``: zero-filled magnitude ``|A^H y|``
        (mri), ramp-filtered back-projection (ct), MLEM from a uniform start (pet; in the counts' units, i.e. the
        activity times ``total_counts / sum(A x)``)."""
        op, y = self.operator(), self.data
        if self.acquisition.modality == "mri":
            out = op.zero_filled(y)
        elif self.acquisition.modality == "ct":
            out = fbp(y, op)
        else:
            out = mlem(y, op, mlem_iterations)
        return out.float()


def read_measurement(path: str | os.PathLike, acquisition_path: str | os.PathLike) -> Measurement:
    """Read a measurement file (``.npy``, ``.npz`` key ``"data"``, ``.nii`` / ``.nii.gz``) and its acquisition JSON;
    one-line ``MeduetInputError`` naming the file and the fix for: unreadable, shape not that of the JSON, complex
    where real is expected or the reverse, NaN/Inf, negative counts (pet)."""
    acq = read_acquisition(acquisition_path)
    path = os.path.abspath(os.fspath(path))
    where = f"measurement file {path}"
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "data" not in npz.files:
                    raise MeduetInputError(f"{where} has no array 'data' (has {npz.files}); save it with "
                                           "numpy.savez(path, data=...)")
                array = npz["data"]
        else:
            import nibabel as nib

            array = np.asanyarray(nib.load(path).dataobj)
    except MeduetInputError:
        raise
    except Exception as exc:  # nibabel / numpy raise many types for a bad or missing file
        raise MeduetInputError(f"{where} is unreadable ({type(exc).__name__}); pass an existing {suffix} file "
                               "written by numpy / nibabel") from None
    return Measurement(_check_array(np.asarray(array), acq, where), acq, path)


def write_measurement(path: str | os.PathLike, data: torch.Tensor | np.ndarray, acquisition: Acquisition,
                      acquisition_path: str | os.PathLike) -> Measurement:
    """Write ``data`` (``measurement_shape()`` or ``(1, 1, *measurement_shape())``) to ``path`` (format by extension)
    and the acquisition to ``acquisition_path``, each atomically; both are checked first (a bad measurement writes
    nothing). NIfTI files get an identity affine (the image grid is the acquisition's). Returns the ``Measurement``
    as ``read_measurement`` would give it."""
    path, acquisition_path = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(acquisition_path))
    suffix = _suffix(path)
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    tensor = _check_array(array, acquisition, f"measurement for {path}")
    text = json.dumps(acquisition.to_json(base_dir=os.path.dirname(acquisition_path)), indent=2) + "\n"
    out = tensor[0, 0].numpy()
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, out)
        elif suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, data=out)
        else:
            import nibabel as nib

            nib.save(nib.Nifti1Image(out, np.eye(4)), tmp)
    with atomic_path(acquisition_path, suffix=".json") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Measurement(tensor, read_acquisition(acquisition_path), path)


def simulate(image: torch.Tensor | np.ndarray, acquisition: Acquisition, seed: int = 0) -> torch.Tensor:
    """The measurement of a clean image: ``(1, 1, *measurement_shape())``.

    ``image`` is ``(S1, S2, S3)`` or ``(1, 1, S1, S2, S3)`` on the acquisition's grid, real and finite. MRI: the
    noise-free masked k-space (complex64; the mask comes from the acquisition, not from ``seed``); CT: the noise-free
    sinogram (float32); PET: Poisson counts at the acquisition's ``total_counts`` drawn with ``seed`` (the image must
    be non-negative).
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).detach().cpu()
    if x.ndim == 3:
        x = x[None, None]
    if tuple(x.shape) != (1, 1, *acquisition.image_shape):
        raise MeduetInputError(f"image to simulate has shape {tuple(x.shape)} but {_where(acquisition.source)} has "
                               f"image_shape {acquisition.image_shape}; resample the image to the acquisition's grid")
    if x.is_complex() and not acquisition.is_complex:
        raise MeduetInputError(f"image to simulate is complex ({x.dtype}) but {acquisition.modality} images are real; "
                               "pass a real image (e.g. its magnitude)")
    x = x.to(torch.complex64) if x.is_complex() else x.float()
    if not bool(torch.isfinite(x).all()):
        raise MeduetInputError("image to simulate has NaN/Inf values; replace them (torch.nan_to_num) first")
    op = acquisition.operator()
    with torch.no_grad():
        if acquisition.modality == "pet":
            if acquisition.total_counts is None:
                raise MeduetInputError(f"{_where(acquisition.source)} has no 'total_counts'; add the expected total "
                                       "counts (e.g. 1e6) to simulate PET")
            return simulate_counts(x, op, acquisition.total_counts, seed=seed).float()
        y = op(x)
    return y.to(torch.complex64) if acquisition.is_complex else y.float()
