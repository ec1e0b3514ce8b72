"""The synthetic multi-site phantoms of the sample data (``meduet.data.sample``): random anatomy per subject (the
*content*: body, two organs, lesions as a label map) rendered by sites that differ in style only (contrast table,
blur, smooth multiplicative bias field, global intensity scale/offset, noise). Deterministic from a seed: every
random quantity has its own ``np.random.SeedSequence`` stream, so adding a site never changes the anatomy and the
rendering order never changes the noise.

Ageing (the longitudinal cohort of ``meduet.data.cohorts``): ``make_anatomy(rng, size, age=a)`` draws the same
subject as at any other age and applies one deterministic law to it: organ_a's radii are scaled by
``s_a = 1 + ORGAN_A_GROWTH * (a - AGE_PIVOT) / AGE_SPAN_YEARS`` (it grows) and organ_b's by
``s_b = 1 - ORGAN_B_SHRINK * (a - AGE_PIVOT) / AGE_SPAN_YEARS`` (it shrinks), about each organ's own centre, for
``a`` in ``AGE_RANGE``. Body, deformation, the organs' centres, orientations and radial perturbations, and the
lesions (centres fixed in organ_a's frame, so they move with it; radii fixed) are the same at every age, and every
organ's region at one age contains (organ_a) or lies inside (organ_b) its region at a younger age, so the volumes
are monotone in age. With 0.10 / 0.15 / 30 years, organ_b's volume (~ s_b^3) changes by 12-16 % per 10 years (at
64^3: >= 11 %, median 14 %, over 20 subjects) and by a factor 0.40 from 20 to 80 years; organ_a's grows by 1.8x."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SPACING_MM", "SiteStyle", "make_site_styles", "make_anatomy", "age_scales", "bias_field", "render",
           "ANATOMY", "STYLE", "RENDER", "SPLIT", "BIAS", "COHORT", "AGE_RANGE", "AGE_PIVOT", "AGE_SPAN_YEARS",
           "ORGAN_A_GROWTH", "ORGAN_B_SHRINK"]

SPACING_MM = 1.5

# Stream identifiers for np.random.SeedSequence([seed, STREAM, ...]).
ANATOMY, STYLE, RENDER, SPLIT, BIAS, COHORT = range(6)

#: the ageing law (``age_scales``): ages (years) it is defined for; a subject is accepted only when it is valid at
#: both ends, so every age in the range gives the same subject
AGE_RANGE = (20.0, 80.0)
#: the age at which both organs have their drawn size (scale 1)
AGE_PIVOT = 50.0
#: years over which the organ radii change by ``ORGAN_A_GROWTH`` / ``ORGAN_B_SHRINK``
AGE_SPAN_YEARS = 30.0
#: organ_a's radii grow by this fraction per ``AGE_SPAN_YEARS`` (0.9x at 20 years, 1.1x at 80)
ORGAN_A_GROWTH = 0.10
#: organ_b's radii shrink by this fraction per ``AGE_SPAN_YEARS`` (1.15x at 20 years, 0.85x at 80)
ORGAN_B_SHRINK = 0.15


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers (all on a normalised grid: axis coordinates in [-1, 1])
# ----------------------------------------------------------------------------------------------------------------
def _axes(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable axis coordinates in [-1, 1]: shapes (n,1,1), (1,n,1), (1,1,n), float32."""
    c = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    return c[:, None, None], c[None, :, None], c[None, None, :]


def _smooth_field(rng: np.random.Generator, axes, n_terms: int = 4, max_cycles: float = 1.2) -> np.ndarray:
    """A smooth random field on the grid, shape (n, n, n), float32, roughly unit variance.

    Sum of ``n_terms`` separable cosine products with random frequencies (at most ``max_cycles`` periods
    across the grid) and phases; separable terms keep it to one full-size multiply per term.
    """
    field = None
    for _ in range(n_terms):
        term = None
        for c in axes:
            w = np.float32(np.pi * rng.uniform(0.2, max_cycles))
            f = np.cos(w * c + np.float32(rng.uniform(0.0, 2.0 * np.pi)))
            term = f if term is None else term * f
        term = term * np.float32(rng.normal())
        field = term if field is None else field + term
    return (field * np.float32(2.0 / np.sqrt(n_terms))).astype(np.float32, copy=False)


def _rotation(rng: np.random.Generator, max_angle: float | None = None, axis: int | None = None) -> np.ndarray:
    """A random 3x3 rotation: uniform over SO(3), or about one ``axis`` by an angle in [-max_angle, max_angle]."""
    if axis is not None:
        a = rng.uniform(-max_angle, max_angle)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_q(w: Sequence[np.ndarray], centre, radii, rot: np.ndarray) -> np.ndarray:
    """Normalised squared radius ``sum_i ((R^T (w - c))_i / r_i)^2`` on the grid; <= 1 is inside."""
    d = [w[i] - np.float32(centre[i]) for i in range(3)]
    q = None
    for i in range(3):
        p = d[0] * np.float32(rot[0, i]) + d[1] * np.float32(rot[1, i]) + d[2] * np.float32(rot[2, i])
        t = (p * np.float32(1.0 / radii[i])) ** 2
        q = t if q is None else q + t
    return q


def age_scales(age: float) -> tuple[float, float]:
    """The ageing law: the factors ``(s_a, s_b)`` on organ_a's and organ_b's radii at ``age`` (years, within
    :data:`AGE_RANGE`): ``s_a = 1 + ORGAN_A_GROWTH (age - AGE_PIVOT) / AGE_SPAN_YEARS``,
    ``s_b = 1 - ORGAN_B_SHRINK (age - AGE_PIVOT) / AGE_SPAN_YEARS``; organ volumes scale about as ``s^3``."""
    age = float(age)
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise ValueError(f"age {age:g} is outside the ageing law's range {AGE_RANGE[0]:g}..{AGE_RANGE[1]:g} years")
    t = (age - AGE_PIVOT) / AGE_SPAN_YEARS
    return 1.0 + ORGAN_A_GROWTH * t, 1.0 - ORGAN_B_SHRINK * t


def _valid(counts: np.ndarray, n: int) -> bool:
    """A usable subject: a body, both organs of a minimal size, a lesion of at least 4 voxels."""
    return bool(counts[1] > 0.05 * n and min(counts[2], counts[3]) > 0.004 * n and counts[4] >= 4)


def make_anatomy(rng: np.random.Generator, size: int, age: float | None = None, lesions: bool = True) -> np.ndarray:
    """Draw one random subject: a label map of shape (size, size, size), uint8.

    Labels: 0 outside the body, 1 body, 2 organ_a, 3 organ_b, 4 lesion(s) inside organ_a. The body is a
    rotated ellipsoid, the organs are rotated ellipsoids with a smooth radial perturbation on opposite sides of
    the body, lesions are 1-3 small spheres centred inside organ_a; a smooth random displacement field deforms
    everything. Shapes are defined on a normalised grid, so a subject looks alike at every ``size``. Every
    label is guaranteed to be present (draws are repeated, deterministically, until it is).

    Args:
        rng: the subject's random stream (the sample data uses ``[seed, ANATOMY, subject_index]``).
        size: grid side in voxels.
        age: ``None`` (default): the subject as the sample data always drew it (lesion centres picked among
            organ_a's core voxels). A number of years in :data:`AGE_RANGE`: the same draws up to the lesions, then
            the ageing law of :func:`age_scales` (organ radii scaled about the organ centres; lesion centres drawn
            in organ_a's own frame, so they move with it; lesion radii fixed). The number of draws and whether an
            attempt is accepted (valid at both ends of ``AGE_RANGE``) do not depend on ``age``, so one stream at
            two ages gives the same subject, differing only by the law.
        lesions: ``False`` paints no lesion (label 4 absent; those voxels stay organ_a) but draws, and accepts,
            exactly as ``True`` does: the same subject without its lesions.
    """
    scales = None if age is None else age_scales(age)
    axes = _axes(size)
    voxel = 2.0 / (size - 1)  # one voxel in normalised units
    for _attempt in range(50):
        # global smooth deformation: warped coordinates w = x + d(x), |d| ~ 0.04
        w = [axes[i] + np.float32(0.04) * _smooth_field(rng, axes) for i in range(3)]
        body_c = rng.normal(0.0, 0.03, size=3)
        body_r = np.array([rng.uniform(0.76, 0.92), rng.uniform(0.58, 0.78), rng.uniform(0.84, 0.95)])
        body_rot = _rotation(rng, max_angle=0.3, axis=2)
        body = _ellipsoid_q(w, body_c, body_r, body_rot) <= 1.0

        organs = []
        for side, r_lo, r_hi in ((1.0, 0.27, 0.40), (-1.0, 0.19, 0.29)):  # organ_a (larger), organ_b
            v = np.array([side * rng.uniform(0.25, 0.42), rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25)])
            centre = body_c + body_rot @ (body_r * v)
            radii = rng.uniform(r_lo, r_hi, size=3)
            rot = _rotation(rng)
            q = _ellipsoid_q(w, centre, radii, rot)
            wobble = 1.0 + np.float32(rng.uniform(0.08, 0.18)) * np.tanh(_smooth_field(rng, axes, max_cycles=2.0))
            q /= wobble * wobble  # smooth radial perturbation of the ellipsoid: inside is q <= 1
            organs.append((q, centre, radii, rot))
        if scales is not None:
            label = _aged(rng, body, organs, w, voxel, scales, lesions)
            if label is not None:
                return label
            continue
        (q_a, *_), (q_b, *_) = organs
        label = body.astype(np.uint8)
        label[(q_b <= 1.0) & body] = 3
        label[(q_a <= 1.0) & body] = 2  # organ_a wins where the two overlap

        # lesion centres: organ_a voxels well inside the organ (q_a <= 0.4, i.e. within ~63 % of its radius)
        core = np.flatnonzero((q_a <= 0.4) & (label == 2))
        if core.size == 0:
            core = np.flatnonzero(label == 2)
        if core.size == 0:
            continue
        x, y, z = (a.ravel() for a in axes)
        lesion = np.zeros(label.shape, dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            r = max(rng.uniform(0.05, 0.10), 1.5 * voxel)
            i, j, k = np.unravel_index(core[int(rng.integers(core.size))], label.shape)
            d2 = (x[:, None, None] - x[i]) ** 2 + (y[None, :, None] - y[j]) ** 2 + (z[None, None, :] - z[k]) ** 2
            lesion |= d2 <= np.float32(r * r)
        label = _paint_lesion(label, lesion, lesions)
        if label is not None:
            return label
    raise RuntimeError(f"could not draw a phantom with all labels present at size {size}")  # pragma: no cover


def _paint_lesion(label: np.ndarray, lesion: np.ndarray, paint: bool, check: bool = True) -> np.ndarray | None:
    """``label`` with ``lesion & organ_a`` set to 4 (when ``paint``), or None when ``check`` and the subject, with its
    lesions, is not valid (so painting or not never changes which attempt is accepted)."""
    lesion &= label == 2
    counts = np.bincount(label.ravel(), minlength=5)
    n_lesion = int(np.count_nonzero(lesion))
    counts[2] -= n_lesion
    counts[4] += n_lesion
    if check and not _valid(counts, label.size):
        return None
    if paint:
        label[lesion] = 4
    return label


def _aged(rng, body, organs, w, voxel: float, scales: tuple[float, float], paint: bool) -> np.ndarray | None:
    """The aged label map of one attempt (see ``make_anatomy``), or None when the attempt is invalid at either end
    of ``AGE_RANGE``. Draws the lesions (count, then radius, direction, radial fraction each) before any test."""
    specs = []
    for _ in range(int(rng.integers(1, 4))):
        r = max(rng.uniform(0.05, 0.10), 1.5 * voxel)
        u = rng.normal(size=3)
        u *= np.sqrt(0.4) * rng.uniform() ** (1.0 / 3.0) / max(float(np.linalg.norm(u)), 1e-12)
        specs.append((r, u))  # centre: organ_a's ellipsoid coordinates u (|u| <= 0.63, cf. q_a <= 0.4 above)

    def at(s_a: float, s_b: float, paint_: bool, check: bool = True) -> np.ndarray | None:
        (q_a, c_a, r_a, rot_a), (q_b, *_) = organs
        label = body.astype(np.uint8)  # q <= s^2 is the ellipsoid with radii * s (q scales as 1 / radius^2)
        label[(q_b <= np.float32(s_b * s_b)) & body] = 3
        label[(q_a <= np.float32(s_a * s_a)) & body] = 2
        lesion = np.zeros(label.shape, dtype=bool)
        for r, u in specs:
            c = c_a + s_a * (rot_a @ (r_a * u))
            d2 = (w[0] - np.float32(c[0])) ** 2 + (w[1] - np.float32(c[1])) ** 2 + (w[2] - np.float32(c[2])) ** 2
            lesion |= d2 <= np.float32(r * r)
        return _paint_lesion(label, lesion, paint_, check)

    ends = [age_scales(a) for a in AGE_RANGE]
    if any(at(*s, False) is None for s in ends):
        return None
    return at(*scales, paint, check=False)  # accepted at both ends: every age gives this subject


# ----------------------------------------------------------------------------------------------------------------
# sites (style)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteStyle:
    """How one site renders a label map. ``hu`` holds the value per label class 0..4 (0 = air outside)."""

    name: str
    index: int
    hu: tuple[float, float, float, float, float]
    blur_sigma_mm: float
    bias_amplitude: float
    scale: float
    offset: float
    noise_std: float


def make_site_styles(seed: int, n_sites: int) -> list[SiteStyle]:
    """Draw ``n_sites`` distinct site styles (deterministic; site k does not depend on ``n_sites``).

    Tissue values lie in [-150, 230] HU so that the CT window [-175, 250] keeps them; the contrast order of the
    organs changes between sites. Each site's tissue table differs from every earlier site's by >= 30 HU in at
    least one class, so sites are always distinguishable.
    """
    rng = np.random.default_rng([seed, STYLE])
    styles: list[SiteStyle] = []
    for k in range(n_sites):
        for _ in range(1000):
            air = rng.uniform(-1024.0, -950.0)
            body = rng.uniform(-110.0, 20.0)
            organ_a = rng.uniform(40.0, 180.0)
            organ_b = rng.uniform(-60.0, 170.0)
            lesion = rng.uniform(-150.0, 230.0)
            hu = np.array([air, body, organ_a, organ_b, lesion])
            contrast_ok = abs(organ_b - body) >= 40 and abs(organ_b - organ_a) >= 30 and abs(lesion - organ_a) >= 40
            distinct = all(np.abs(hu[1:] - np.array(s.hu[1:])).max() >= 30.0 for s in styles)
            if contrast_ok and distinct:
                break
        styles.append(
            SiteStyle(
                name=f"site{k}",
                index=k,
                hu=tuple(round(float(v), 2) for v in hu),
                blur_sigma_mm=round(float(rng.uniform(0.0, 2.0)), 3),
                bias_amplitude=round(float(rng.uniform(0.01, 0.06)), 4),
                scale=round(float(rng.uniform(0.9, 1.1)), 4),
                offset=round(float(rng.uniform(-25.0, 25.0)), 2),
                noise_std=round(float(rng.uniform(4.0, 30.0)), 2),
            )
        )
    return styles


def bias_field(seed: int, site: SiteStyle, size: int) -> np.ndarray:
    """The site's smooth multiplicative bias field, shape (size,)*3, float32, values in 1 +- bias_amplitude."""
    field = _smooth_field(np.random.default_rng([seed, BIAS, site.index]), _axes(size), n_terms=3, max_cycles=0.8)
    field /= max(float(np.abs(field).max()), 1e-6)
    return np.float32(1.0) + np.float32(site.bias_amplitude) * field


def render(label: np.ndarray, site: SiteStyle, bias: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render a label map (X, Y, Z) in a site's style; returns float32 HU-like values of the same shape.

    Steps: contrast table lookup -> Gaussian blur (``blur_sigma_mm``) -> multiplicative bias on the attenuation
    ``(HU + 1024) * bias - 1024`` -> global ``scale`` / ``offset`` -> additive Gaussian noise (``noise_std``).
    """
    from scipy import ndimage

    img = np.asarray(site.hu, dtype=np.float32)[label]
    sigma = site.blur_sigma_mm / SPACING_MM
    if sigma > 0.05:
        img = ndimage.gaussian_filter(img, sigma, mode="nearest")
    img = (img + np.float32(1024.0)) * bias - np.float32(1024.0)
    img = img * np.float32(site.scale) + np.float32(site.offset)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(site.noise_std)
    return img
