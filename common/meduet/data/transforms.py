"""MONAI transform chains for dictionary items ``{"image": path, "label": path (optional), ...}``.

Loading chain (:func:`get_load_transforms`), matching the MeDUET preprocessing::

    CheckedLoadImaged (channel first, MetaTensor)  -> CheckInputd -> Orientationd("RAS")
    -> Spacingd (image bilinear, label nearest)    -> intensity to [0, 1]
       CT: window [-175, 250] HU, clipped;  MR: percentiles [0.5, 99.5], clipped, per channel
    -> CropForegroundd (optional)                  -> DivisiblePadd(k)  -> EnsureTyped

Training augmentation (:func:`get_train_crop_transforms`): random spatial crop(s), flips on the three axes,
a random 90-degree rotation in a random plane.

Every step keeps the MetaTensor affine up to date (crops and pads shift the origin, flips and rotations change
the axes), so predictions can be written back on the right world grid. The first key is the image; any other
key is a label map (nearest-neighbour resampling, no intensity change) and may be missing from an item.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureTyped,
    OneOf,
    Orientationd,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    Randomizable,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
    Transform,
)
from monai.transforms import Spacingd as _MonaiSpacingd

from meduet.data.checks import CheckedLoadImaged, CheckInputd, CheckModalityd, find_input_error
from meduet.errors import MeduetConfigError, MeduetInputError

__all__ = [
    "Spacingd",
    "InputCheckedCompose",
    "foreground_above",
    "get_load_transforms",
    "get_train_crop_transforms",
    "get_appearance_augment",
    "SyntheticSiteAugment",
]

#: intensity threshold (after scaling to [0, 1]) above which a voxel counts as foreground, per modality
DEFAULT_FOREGROUND_THRESHOLD = {"MR": 0.02}  # on the normalised image; CT crops the body in HU (``ct_body_hu``)


class InputCheckedCompose(Compose):
    """``Compose`` that re-raises an input error as the plain one-line ``MeduetInputError``.

    MONAI wraps every exception raised inside a transform into ``RuntimeError("applying transform ...")``;
    this class unwraps it again so users see ``MeduetInputError: <file>: <problem>; <fix>``. All other
    exceptions propagate unchanged. (A MONAI ``Dataset`` wraps once more around the whole chain; use
    :func:`meduet.data.checks.find_input_error` at the top level to report such errors.)
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except MeduetInputError:
            raise
        except Exception as e:
            err = find_input_error(e)
            if err is None:
                raise
            raise err from None


class Spacingd(_MonaiSpacingd):
    """MONAI's ``Spacingd`` that tolerates non-dict entries named ``<key>_*`` beside the image.

    MONAI's ``Spacingd`` copies the image's meta into every ``<key>_*`` entry of the item as if each were a
    meta dict; MONAI Label puts the request's file name in ``image_path`` (a string), which then fails with
    "'str' object has no attribute 'update'". Such entries are set aside during the call and put back unchanged.
    Inversion is MONAI's (``Invertd`` works as before)."""

    def __call__(self, data, lazy=None):
        d = dict(data)
        aside = {k: d.pop(k) for k in list(d) if isinstance(k, str) and not isinstance(d[k], dict)
                 and any(k.startswith(f"{key}_") for key in self.keys)}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x > threshold


def foreground_above(threshold: float):
    """A picklable ``select_fn`` for ``CropForegroundd``: voxels strictly above ``threshold`` are foreground."""
    return partial(_above, threshold=float(threshold))


def _crop_foreground(keys: Sequence[str], image_key: str, threshold: float) -> CropForegroundd:
    return CropForegroundd(
        keys,
        source_key=image_key,
        select_fn=foreground_above(threshold),
        margin=0,
        allow_smaller=True,
        start_coord_key=None,  # the crop is recorded in the MetaTensor (affine, applied_operations)
        end_coord_key=None,
        allow_missing_keys=True,
    )


def _modality(modality: str) -> str:
    m = str(modality).upper()
    if m in ("MR", "MRI"):
        return "MR"
    if m == "CT":
        return "CT"
    raise MeduetConfigError(f"modality {modality!r} is not supported; use 'CT' or 'MR'")


def get_load_transforms(
    modality: str = "CT",
    keys: Sequence[str] = ("image", "label"),
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    ct_window: Sequence[float] = (-175.0, 250.0),
    mr_percentiles: Sequence[float] = (0.5, 99.5),
    crop_foreground: bool = True,
    pad_multiple: int | None = 4,
    check: bool = True,
    expected_channels: int | None = None,
    foreground_threshold: float | None = None,
    ct_body_hu: float = -500.0,
    modality_check: bool = False,
) -> InputCheckedCompose:
    """Load, check, reorient, resample, normalise, crop and pad one item.

    Args:
        modality: ``"CT"`` (fixed HU window) or ``"MR"`` (per-image percentiles).
        keys: image key first, then label keys (nearest-neighbour); label keys may be missing from items.
        spacing: target voxel size in mm (x, y, z); ``None`` keeps the file's spacing.
        ct_window: HU range mapped to [0, 1] for CT (values outside are clipped).
        mr_percentiles: lower/upper intensity percentiles mapped to [0, 1] for MR (clipped), per channel.
        crop_foreground: crop all keys to the bounding box of image voxels above ``foreground_threshold``.
        pad_multiple: pad every spatial size up to a multiple of this (symmetric, zeros); ``None``/1 skips.
        check: insert :class:`~meduet.data.checks.CheckInputd` right after loading.
        expected_channels: channel count the image must have (``None`` accepts any).
        foreground_threshold: on the [0, 1] image, after normalisation; default for MR 0.02. For CT the default
            (``None``) crops *before* the window, to the voxels above ``ct_body_hu``.
        modality_check: insert :class:`~meduet.data.checks.CheckModalityd` after loading: a DICOM header of the other
            modality, or intensities that cannot be this modality (an MR read as CT), are a one-line error naming
            the override. The inference configs switch it on (they have no datalist that states the modality).
        ct_body_hu: CT body threshold in HU (default -500, half-way between air and soft tissue). A threshold at
            the window's floor (-175 HU) sits close to the body's own value, so a scanner's blur or noise moves
            the crop by voxels: the field of view would then tell the site apart (on the sample phantoms the crop
            size alone predicted the site). Half-way between air and tissue the blurred edge stays put.

    Returns:
        A compose mapping ``{"image": path, "label": path, ...}`` to the same dict with
        ``image``: float32 MetaTensor (C, X, Y, Z) in [0, 1] and ``label``: MetaTensor (1, X, Y, Z) of class
        indices (float32), both in RAS orientation with the affine of the resampled/cropped/padded grid.
        Other keys (``domain``, ``domain_index``, ...) pass through.
    """
    modality = _modality(modality)
    keys = tuple(keys)
    if not keys:
        raise MeduetConfigError("get_load_transforms: keys must name at least the image key")
    image_key, label_keys = keys[0], keys[1:]
    steps = [CheckedLoadImaged(keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True)]
    if check:
        steps.append(CheckInputd(keys, expected_channels=expected_channels, allow_missing_keys=True))
    if modality_check:
        steps.append(CheckModalityd([image_key], modality))
    # labels=None: axis names come from the MetaTensor's space (RAS for NIfTI/DICOM read by MONAI)
    steps.append(Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=True))
    if spacing is not None:
        steps.append(
            Spacingd(
                keys,
                pixdim=tuple(float(s) for s in spacing),
                mode=("bilinear",) + ("nearest",) * len(label_keys),
                allow_missing_keys=True,
            )
        )
    ct_body_crop = crop_foreground and modality == "CT" and foreground_threshold is None
    if ct_body_crop:
        steps.append(_crop_foreground(keys, image_key, float(ct_body_hu)))
    if modality == "CT":
        a_min, a_max = (float(v) for v in ct_window)
        steps.append(ScaleIntensityRanged(image_key, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    else:
        lower, upper = (float(v) for v in mr_percentiles)
        steps.append(
            ScaleIntensityRangePercentilesd(
                image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        )
    if crop_foreground and not ct_body_crop:
        thr = DEFAULT_FOREGROUND_THRESHOLD[modality] if foreground_threshold is None else foreground_threshold
        steps.append(_crop_foreground(keys, image_key, thr))
    if pad_multiple is not None and pad_multiple > 1:
        steps.append(DivisiblePadd(keys, k=int(pad_multiple), allow_missing_keys=True))
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True))
    return InputCheckedCompose(steps)


def get_train_crop_transforms(
    roi_size: Sequence[int],
    keys: Sequence[str] = ("image", "label"),
    num_samples: int = 1,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.5,
    seed: int | None = None,
    pad_mode: str = "constant",
) -> Compose:
    """Random crops plus flips / 90-degree rotations, applied identically to every key of an item.

    Args:
        roi_size: crop size (X, Y, Z) in voxels; smaller volumes are zero-padded up to it first.
        keys: keys to crop and augment together (label keys may be missing from items).
        num_samples: crops per item; with more than one the chain returns a list of ``num_samples`` dicts.
        flip_prob: probability of a flip, independently for each of the three axes.
        rot90_prob: probability of a rotation by k * 90 degrees (k in 1..3) in one plane picked at random
            among (x, y), (x, z), (y, z). Non-cubic crops change shape under rotation; use a cubic ``roi_size``
            when samples are batched.
        seed: seeds every random transform of the chain (``Compose.set_random_state``) for reproducibility.
        pad_mode: how volumes smaller than ``roi_size`` are padded (``"constant"``: zeros; ``"replicate"``: edge
            values, e.g. for latents, whose zero is not "empty").

    Returns:
        A ``Compose``: item -> item (``num_samples == 1``) or list of items, each with tensors (C, *roi_size)
        whose MetaTensor affines follow the crop, flips and rotation.
    """
    keys = tuple(keys)
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise MeduetConfigError(f"roi_size must be three positive ints, got {roi_size!r}")
    if num_samples < 1:
        raise MeduetConfigError(f"num_samples must be >= 1, got {num_samples}")
    steps = [SpatialPadd(keys, spatial_size=roi, mode=pad_mode, allow_missing_keys=True)]
    if num_samples > 1:
        steps.append(
            RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=num_samples, random_size=False,
                                    allow_missing_keys=True)
        )
    else:
        steps.append(RandSpatialCropd(keys, roi_size=roi, random_size=False, allow_missing_keys=True))
    steps += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis, allow_missing_keys=True) for axis in range(3)]
    steps.append(
        OneOf(
            [
                RandRotate90d(keys, prob=rot90_prob, max_k=3, spatial_axes=axes, allow_missing_keys=True)
                for axes in ((0, 1), (0, 2), (1, 2))
            ]
        )
    )
    chain = Compose(steps)
    if seed is not None:
        chain.set_random_state(seed=seed)
    return chain


def get_appearance_augment(strength: float = 1.0) -> Compose:
    """Random appearance changes of a preprocessed image ``(C, X, Y, Z)`` in [0, 1] that leave the anatomy in
    place: a random monotone intensity curve (histogram shift) and gamma, smooth multiplicative bias field,
    global scale/offset, blur and noise, clipped back to [0, 1] -- the kinds of differences scanners and
    protocols of different sites make. ``strength`` scales every range (0 = identity).

    Used by meduet_vae's ``encode.yaml`` (``augment_copies``) to cache appearance-augmented copies of the
    training latents for meduet_pretrain's ``aug_content`` term. Seed it with ``set_random_state``.
    """
    from monai.transforms import (
        Lambda,
        RandAdjustContrast,
        RandBiasField,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandHistogramShift,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    a = float(strength)
    if a < 0:
        raise MeduetConfigError(f"augmentation strength must be >= 0, got {strength}")
    always, often = (1.0, 0.5) if a else (0.0, 0.0)  # strength 0: no transform fires
    sigma = (0.25, 0.25 + a)
    return Compose([
        RandHistogramShift(num_control_points=(4, 8), prob=always),
        RandAdjustContrast(gamma=(max(0.1, 1 - 0.5 * a), 1 + 1.0 * a), prob=always),
        RandBiasField(degree=3, coeff_range=(0.0, 0.25 * a), prob=often),
        RandScaleIntensity(factors=0.25 * a, prob=often),
        RandShiftIntensity(offsets=0.1 * a, prob=often),
        RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=often),
        RandGaussianNoise(mean=0.0, std=0.04 * a, prob=often),
        Lambda(lambda x: x.clamp(0.0, 1.0)),
    ])


class SyntheticSiteAugment(Randomizable, Transform):
    """Render a preprocessed image ``(C, X, Y, Z)`` in [0, 1] as if a new site had scanned it: the image is split
    into ``num_tissues`` intensity classes (1-D k-means of the Gaussian-smoothed intensities, per channel) and
    every class but the darkest (air/background keeps its value) is repainted with its own random value from
    ``value_range``, so the tissues keep their places but not their *order* of brightness; then a random blur
    (``blur_sigma`` in voxels), a global scale (``scale``) and Gaussian noise (std drawn from ``noise_std``),
    clipped to [0, 1].

    Unlike :func:`get_appearance_augment` (monotone curves: the tissues' order is kept) this moves each tissue
    on its own, as a different contrast or protocol does. meduet_vae's ``encode.yaml --augment_kind
    synthetic_site`` caches such copies for meduet_pretrain's ``w_cross_appearance`` term (not in the paper; the
    measurements are in meduet_pretrain's docs). Seed it with ``set_random_state``.
    """

    def __init__(self, num_tissues: int = 5, value_range: Sequence[float] = (0.1, 0.95),
                 smooth_sigma: float = 1.0, blur_sigma: Sequence[float] = (0.0, 1.2),
                 scale: Sequence[float] = (0.9, 1.1), noise_std: Sequence[float] = (0.005, 0.04),
                 kmeans_iterations: int = 15) -> None:
        if int(num_tissues) < 2:
            raise MeduetConfigError(f"SyntheticSiteAugment: num_tissues must be >= 2, got {num_tissues}")
        for name, pair in (("value_range", value_range), ("blur_sigma", blur_sigma), ("scale", scale),
                           ("noise_std", noise_std)):
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] < 0:
                raise MeduetConfigError(f"SyntheticSiteAugment: {name} must be (low, high) with 0 <= low <= "
                                        f"high, got {pair}")
        self.num_tissues = int(num_tissues)
        self.value_range = tuple(float(v) for v in value_range)
        self.smooth_sigma = float(smooth_sigma)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.scale = tuple(float(v) for v in scale)
        self.noise_std = tuple(float(v) for v in noise_std)
        self.kmeans_iterations = int(kmeans_iterations)

    def randomize(self, data: Any = None) -> None:  # draws happen in __call__, one set per channel
        pass

    def tissue_classes(self, channel: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y, Z)`` -> (class index per voxel, 0 = darkest, ``(X, Y, Z)`` int; class centres ``(K,)``
        ascending)."""
        from scipy import ndimage

        img = np.asarray(channel, dtype=np.float64)
        smooth = ndimage.gaussian_filter(img, self.smooth_sigma) if self.smooth_sigma > 0 else img
        v = smooth.reshape(-1)
        sample = v[:: max(1, v.size // 200_000)]
        centres = np.quantile(sample, np.linspace(0.05, 0.95, self.num_tissues))
        for j in range(1, self.num_tissues):  # a centre equal to an earlier one (a tissue filling several
            if np.abs(centres[:j] - centres[j]).min() < 1e-6:  # quantiles) moves to the farthest intensity
                centres[j] = sample[np.abs(sample[:, None] - centres[None, :j]).min(axis=1).argmax()]
        for _ in range(self.kmeans_iterations):
            lab = np.abs(v[:, None] - centres[None]).argmin(axis=1)
            counts = np.bincount(lab, minlength=self.num_tissues)
            sums = np.bincount(lab, weights=v, minlength=self.num_tissues)
            centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        order = np.argsort(centres)
        rank = np.empty_like(order)
        rank[order] = np.arange(self.num_tissues)
        lab = np.abs(v[:, None] - centres[None]).argmin(axis=1)
        return rank[lab].reshape(img.shape), centres[order]

    def __call__(self, img: Any) -> torch.Tensor:
        from scipy import ndimage

        x = torch.as_tensor(img).float()
        if x.ndim != 4:
            raise MeduetInputError(f"SyntheticSiteAugment: expected a (C, X, Y, Z) image, got shape {tuple(x.shape)}")
        out = np.empty(tuple(x.shape), dtype=np.float32)
        for c in range(x.shape[0]):
            lab, centres = self.tissue_classes(x[c].cpu().numpy())
            table = self.R.uniform(*self.value_range, size=self.num_tissues)
            table[0] = centres[0]  # the darkest class (air, background) stays dark
            y = table[lab]
            sigma = self.R.uniform(*self.blur_sigma)
            if sigma > 0:
                y = ndimage.gaussian_filter(y, sigma)
            y = y * self.R.uniform(*self.scale) + self.R.uniform(*self.noise_std) * self.R.standard_normal(y.shape)
            out[c] = np.clip(y, 0.0, 1.0)
        return torch.from_numpy(out)
