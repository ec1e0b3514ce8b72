"""Generation quality for meduet_diffusion's evaluate workflow: FID and MMD over a configurable 3D feature
extractor, and MS-SSIM diversity. The formulas are MONAI's (``FIDMetric``'s Frechet distance, ``MMDMetric``,
``MultiScaleSSIMMetric``); this module only chooses inputs and settings. The feature extractors are in
``meduet.metrics.features``.

Small-sample behaviour (documented choices):

* ``fid``: with fewer samples than feature dimensions the covariances are singular and ``sqrtm`` of their product
  can turn complex or non-finite; a ridge of ``ridge * mean(diag)`` is added to both covariances (default 1e-6,
  which moves a typical FID by < 1e-5 relative) and the result is clamped at 0. At least 2 samples per set.
* ``mmd``: MONAI's unbiased estimator needs the same number of samples on both sides (>= 2): the larger set is cut
  to the size of the smaller one (first ``n``). Its kernel is the dot product of ``y_mapping(x)``; with
  ``kernel="rbf"`` (default) ``y_mapping`` is a fixed random Fourier feature map, so the estimate is the squared
  MMD under a Gaussian kernel (bandwidth: median pairwise distance of the pooled samples), which sees differences
  in spread and shape, not only in the mean (``kernel="linear"`` is MONAI's plain form = mean difference). The
  unbiased estimate can be slightly negative when the two sets come from one distribution.
* ``ms_ssim_diversity``: MS-SSIM needs the coarsest scale to hold the kernel. The default is 3 scales with a 7^3
  Gaussian window (sigma 1.5) and the first three of Wang et al.'s weights renormalised,
  ``(0.0448, 0.2856, 0.3001) / 0.6305``: it fits every volume from 28^3 up (32^3 -> scales 32/16/8, 48^3 ->
  48/24/12), so 32^3-48^3 generations are scored with one setting. Smaller volumes (e.g. raw latents) fall back to
  smaller windows, then fewer scales (``ms_ssim_settings``); the settings used are reported.
* ``outline_agreement``: is a decoded volume shaped like a scan? Its ``foreground_mask`` (voxels above the volume's
  Otsu threshold, largest connected component, holes filled) is the body where the body stands out from the air
  more than the organs from the body (on the phantoms: sites 0 and 3, IoU 1.0 with the body label, 0.89-0.95 on the
  demo VAE's decodings), and the brightest organs where the body is near the window's floor (sites 1, 2, 4, 5).
  Either way real and generated volumes are masked by the same rule: a sample scores the IoU of its mask with the
  closest real mask, the real set scores the same against other subjects' masks (the value real-looking samples
  reach). It sees the coarse extent of the brightest region only: an untrained generator's noise scores well below
  the real scans (0.36 vs 0.66 at demo size), but a blob of the right size scores as high as a scan with a clean
  body outline, so it is read with pictures, not instead of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from monai.metrics.fid import compute_frechet_distance

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.metrics.features import FeatureExtractor, Volumes, as_list

__all__ = [
    "fid",
    "mmd",
    "ms_ssim_settings",
    "ms_ssim_diversity",
    "foreground_mask",
    "outline_agreement",
    "generation_report",
]

#: MS-SSIM scale weights of Wang et al. (MONAI's default); the first ``L`` are used, renormalised.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------
def _features(x: torch.Tensor, what: str, min_n: int = 2) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim < 2 or x.shape[0] < min_n:
        raise MeduetInputError(f"{what} needs at least {min_n} samples as (N, F), got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).double()
    if not torch.isfinite(x).all():
        raise MeduetInputError(f"{what} has NaN/Inf values")
    return x


def fid(real_feats: torch.Tensor, fake_feats: torch.Tensor, ridge: float = 1e-6) -> float:
    """Frechet distance between the Gaussians fitted to ``real_feats (N, F)`` and ``fake_feats (M, F)``.

    MONAI's ``compute_frechet_distance`` (the formula of ``FIDMetric``) on the sample means and covariances, with
    ``ridge * mean(diag)`` added to both covariances so that ``N, M < F`` stays finite and real (see module doc);
    ``ridge=0`` is ``FIDMetric`` exactly. Symmetric in its arguments; clamped at 0. Needs ``N, M >= 2``.
    """
    real, fake = _features(real_feats, "FID real features"), _features(fake_feats, "FID fake features")
    if real.shape[1] != fake.shape[1]:
        raise MeduetInputError(f"FID features differ in size: {real.shape[1]} vs {fake.shape[1]}")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T).reshape(real.shape[1], -1), torch.cov(fake.T).reshape(fake.shape[1], -1)
    if ridge > 0:
        scale = 0.5 * (cov_r.diagonal().mean() + cov_f.diagonal().mean()).clamp_min(1e-12)
        eye = torch.eye(real.shape[1], dtype=real.dtype) * (ridge * scale)
        cov_r, cov_f = cov_r + eye, cov_f + eye
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*disp.*deprecated", category=DeprecationWarning)
        value = compute_frechet_distance(mu_f, cov_f, mu_r, cov_r)
    return max(0.0, float(value.real if torch.is_complex(value) else value))


def _rff_mapping(dim: int, bandwidth: float, num_features: int, seed: int):
    """``x (N, dim) -> sqrt(2/K) cos(x W / bandwidth + b) (N, K)``: random Fourier features whose dot products
    approximate the Gaussian kernel ``exp(-|x - y|^2 / (2 bandwidth^2))`` (Rahimi & Recht, 2007)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, num_features, generator=g, dtype=torch.float64) / bandwidth
    b = torch.rand(num_features, generator=g, dtype=torch.float64) * (2 * math.pi)

    def mapping(x: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0 / num_features) * torch.cos(x.reshape(x.shape[0], -1).double() @ w + b)

    return mapping


def mmd(real: torch.Tensor, fake: torch.Tensor, kernel: str = "rbf", bandwidth: float | None = None,
        num_features: int = 2048, seed: int = 0) -> float:
    """Unbiased squared maximum mean discrepancy (MONAI ``MMDMetric``) between two samples.

    ``real (N, ...)``, ``fake (M, ...)``: feature vectors ``(N, F)`` (what ``generation_report`` passes) or
    volumes ``(N, C, H, W, D)`` (flattened per sample). The larger set is cut to ``min(N, M)`` (MONAI needs equal
    counts, >= 2). ``kernel="rbf"``: Gaussian kernel through a random Fourier feature ``y_mapping`` with
    ``num_features`` features (``seed`` fixes them) and ``bandwidth`` (default: median pairwise distance of the
    pooled samples); it costs ``F * num_features`` memory, so use it on features, not on large flattened volumes.
    ``kernel="linear"``: MONAI's dot product (compares means only). ~0 for one distribution (may be slightly
    negative), larger for different ones.
    """
    r, f = _features(real, "MMD real sample"), _features(fake, "MMD fake sample")
    if r.shape[1] != f.shape[1]:
        raise MeduetInputError(f"MMD samples differ in size: {r.shape[1]} vs {f.shape[1]} values per sample")
    n = min(r.shape[0], f.shape[0])
    r, f = r[:n], f[:n]
    if kernel == "linear":
        mapping = None
    elif kernel == "rbf":
        if bandwidth is None:
            pooled = torch.cat([r, f])
            d = torch.cdist(pooled, pooled)
            iu = torch.triu_indices(len(pooled), len(pooled), offset=1)
            bandwidth = float(d[iu[0], iu[1]].median())
            if not bandwidth > 0:
                bandwidth = 1.0
        mapping = _rff_mapping(r.shape[1], float(bandwidth), int(num_features), seed)
    else:
        raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
    return float(MMDMetric(y_mapping=mapping)(r, f))


def ms_ssim_settings(spatial_shape: Sequence[int]) -> dict[str, Any]:
    """MS-SSIM window and scale weights for volumes of ``spatial_shape``: 3 scales with a 7^3 window when the
    volume allows it (min side >= 28), else smaller windows (5, 3), then fewer scales (2, 1 = plain SSIM).

    A setting fits when the coarsest scale holds the window (``side // 2^(L-1) >= k``) and MONAI's own size check
    passes (``side // max(1, L-1)^2 > k - 1``). Returns ``{"kernel_size": k, "weights": [...], "scales": L}``
    (the first ``L`` of Wang et al.'s weights, renormalised to sum 1).
    """
    side = int(min(spatial_shape))
    for scales in (3, 2, 1):
        for k in (7, 5, 3):
            if side // 2 ** (scales - 1) >= k and side // max(1, scales - 1) ** 2 > k - 1:
                w = torch.tensor(_MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
                return {"kernel_size": k, "weights": (w / w.sum()).tolist(), "scales": scales}
    raise MeduetInputError(f"volumes of shape {tuple(spatial_shape)} are too small for MS-SSIM (min side >= 3)")


def _common_crop(items: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(C, ...)`` volumes, centre-cropping them to their common (smallest) spatial shape if they differ."""
    shape = [min(int(v.shape[d]) for v in items) for d in range(1, items[0].ndim)]
    out = []
    for v in items:
        idx = [slice(None)] + [slice((int(s) - t) // 2, (int(s) - t) // 2 + t) for s, t in zip(v.shape[1:], shape)]
        out.append(v[tuple(idx)])
    return torch.stack(out)


def ms_ssim_diversity(volumes: Volumes, data_range: float | None = None, kernel_size: int | None = None,
                      weights: Sequence[float] | None = None, kernel_sigma: float = 1.5, max_pairs: int | None = 256,
                      seed: int = 0, chunk: int = 16) -> float:
    """Mean MS-SSIM over distinct pairs of ``volumes (N, C, H, W, D)`` (N >= 2; a sequence of ``(C, H, W, D)`` of
    different sizes is centre-cropped to the common shape). Lower = more diverse; identical volumes give 1.

    MONAI ``MultiScaleSSIMMetric`` with ``kernel_size``/``weights`` from ``ms_ssim_settings`` unless given.
    ``data_range``: the intensity range (1.0 for images in [0, 1]); default ``max - min`` over all volumes (pass the
    real set's range to compare real and generated diversity on one scale). With more than ``max_pairs`` pairs a
    random subset (``seed``) is scored; ``chunk`` pairs go through MONAI at a time.
    """
    vols = _common_crop(as_list(volumes, "volume")).float()
    n = vols.shape[0]
    if n < 2:
        raise MeduetInputError("MS-SSIM diversity needs at least 2 volumes")
    if not torch.isfinite(vols).all():
        raise MeduetInputError("MS-SSIM diversity: volumes have NaN/Inf values")
    auto = ms_ssim_settings(vols.shape[2:])
    kernel_size = auto["kernel_size"] if kernel_size is None else int(kernel_size)
    weights = auto["weights"] if weights is None else list(weights)
    if data_range is None:
        data_range = float(vols.max() - vols.min()) or 1.0
    i, j = torch.triu_indices(n, n, offset=1)
    if max_pairs is not None and len(i) > max_pairs:
        keep = torch.randperm(len(i), generator=torch.Generator().manual_seed(seed))[:max_pairs].sort().values
        i, j = i[keep], j[keep]
    metric = MultiScaleSSIMMetric(spatial_dims=vols.ndim - 2, data_range=float(data_range), kernel_size=kernel_size,
                                  kernel_sigma=kernel_sigma, weights=weights, reduction="mean")
    for s in range(0, len(i), max(1, int(chunk))):
        metric(y_pred=vols[i[s: s + chunk]], y=vols[j[s: s + chunk]])
    return float(metric.aggregate())


def foreground_mask(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    """The Otsu foreground of a volume ``(H, W, D)`` (or ``(1, H, W, D)``) as a boolean mask: voxels above its Otsu
    threshold, the largest connected component, holes filled. A constant volume has none (all False)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    v = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    v = v[0] if v.ndim == 4 and v.shape[0] == 1 else v
    if v.ndim != 3:
        raise MeduetInputError(f"foreground_mask needs a 3D volume, got shape {tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise MeduetInputError("foreground_mask got NaN/Inf voxels")
    if float(v.max() - v.min()) < 1e-6:
        return np.zeros(v.shape, dtype=bool)
    labels, n = ndimage.label(v > threshold_otsu(v))
    if n == 0:
        return np.zeros(v.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == sizes.argmax())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def outline_agreement(fake_images: Volumes, real_images: Volumes,
                      real_groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Outline agreement of generated with real decoded volumes (same grid; module docstring).

    Each generated volume scores the IoU of its ``foreground_mask`` with the closest real one
    (``outline_iou_fake``: their mean, ``outline_iou_fake_each``). The real set scores each real volume against the
    real volumes of *other* ``real_groups`` (e.g. subjects, so a subject scanned at several sites is not its own
    match; default: every other volume): ``outline_iou_real``, what samples shaped like the test scans reach (None
    with fewer than two groups). ``foreground_fraction_*``: the masks' mean share of the volume.
    """
    fake = [foreground_mask(v) for v in as_list(fake_images, "volume")]
    real = [foreground_mask(v) for v in as_list(real_images, "volume")]
    if any(f.shape != real[0].shape for f in fake + real):
        raise MeduetInputError("outline_agreement: generated and real volumes must share one grid, got shapes "
                               f"{sorted({f.shape for f in fake + real})}")
    groups = list(range(len(real))) if real_groups is None else list(real_groups)
    if len(groups) != len(real):
        raise MeduetConfigError(f"real_groups has {len(groups)} entries for {len(real)} real volumes")
    fake_each = [max(_iou(f, r) for r in real) for f in fake]
    real_each = [max((_iou(r, o) for o, g in zip(real, groups) if g != gr), default=None)
                 for r, gr in zip(real, groups)]
    real_each = [v for v in real_each if v is not None]
    return {"outline_iou_fake": float(np.mean(fake_each)), "outline_iou_fake_each": [float(v) for v in fake_each],
            "outline_iou_real": float(np.mean(real_each)) if real_each else None,
            "foreground_fraction_fake": float(np.mean([f.mean() for f in fake])),
            "foreground_fraction_real": float(np.mean([r.mean() for r in real]))}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def generation_report(real_latents: Volumes, fake_latents: Volumes, extractor: FeatureExtractor,
                      real_images: Volumes | None = None, fake_images: Volumes | None = None,
                      mmd_kwargs: Mapping[str, Any] | None = None,
                      ms_ssim_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """FID, MMD and MS-SSIM diversity of generated vs real volumes, as a JSON-able dict.

    Args:
        real_latents, fake_latents: ``(N, C, S1, S2, S3)`` / ``(M, C, ...)`` latents (or sequences of
            ``(C, ...)``), in the space ``extractor`` expects (``EncoderFeatures.inputs``).
        extractor: a ``FeatureExtractor``; one with ``space == "image"`` needs ``real_images`` and ``fake_images``
            (what the VAE decodes, ``(N, 1, H, W, D)``).
        real_images, fake_images: decoded volumes; when both are given, diversity is measured on them, else on the
            latents.
        mmd_kwargs, ms_ssim_kwargs: passed to ``mmd`` / ``ms_ssim_diversity``.

    Returns ``{"fid", "fid_features" (extractor.name), "feature_dim", "mmd", "mmd_kernel",
    "ms_ssim_diversity_fake", "ms_ssim_diversity_real", "ms_ssim_space" ("image"/"latent"), "ms_ssim_kernel_size",
    "ms_ssim_weights", "n_real", "n_fake"}``. Diversity uses the real set's intensity range for both sets.
    """
    have_images = real_images is not None and fake_images is not None
    if extractor.space == "image":
        if not have_images:
            raise MeduetConfigError(f"{extractor.name} features are computed on images: pass real_images and "
                                    "fake_images (the VAE's decodings)")
        real_in, fake_in = real_images, fake_images
    else:
        real_in, fake_in = real_latents, fake_latents
    real_f, fake_f = extractor(real_in), extractor(fake_in)
    mmd_kwargs = dict(mmd_kwargs or {})
    report: dict[str, Any] = {
        "fid": fid(real_f, fake_f),
        "fid_features": extractor.name,
        "feature_dim": int(real_f.shape[1]),
        "mmd": mmd(real_f, fake_f, **mmd_kwargs),
        "mmd_kernel": mmd_kwargs.get("kernel", "rbf"),
    }
    space = "image" if have_images else "latent"
    real_v = _common_crop(as_list(real_images if have_images else real_latents, "volume")).float()
    fake_v = _common_crop(as_list(fake_images if have_images else fake_latents, "volume")).float()
    kw = dict(ms_ssim_kwargs or {})
    kw.setdefault("data_range", float(real_v.max() - real_v.min()) or 1.0)
    settings = ms_ssim_settings([min(a, b) for a, b in zip(real_v.shape[2:], fake_v.shape[2:])])
    kw.setdefault("kernel_size", settings["kernel_size"])
    kw.setdefault("weights", settings["weights"])
    report.update({
        "ms_ssim_diversity_fake": ms_ssim_diversity(fake_v, **kw),
        "ms_ssim_diversity_real": ms_ssim_diversity(real_v, **kw),
        "ms_ssim_space": space,
        "ms_ssim_kernel_size": int(kw["kernel_size"]),
        "ms_ssim_weights": [float(w) for w in kw["weights"]],
        "n_real": len(as_list(real_in, "volume")),
        "n_fake": len(as_list(fake_in, "volume")),
    })
    return report
