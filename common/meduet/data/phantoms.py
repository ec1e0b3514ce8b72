"""The synthetic multi-site phantoms of the sample data (``meduet.data.sample``): random anatomy per subject (the
*content*: body, two organs, lesions as a label map) rendered by sites that differ in style only (contrast table,
blur, smooth multiplicative bias field, global intensity scale/offset, noise). Deterministic from a seed: every
random quantity has its own ``np.random.SeedSequence`` stream, so adding a site never changes the anatomy and the
rendering order never changes the noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SPACING_MM", "SiteStyle", "make_site_styles", "make_anatomy", "bias_field", "render", "ANATOMY", "STYLE",
           "RENDER",
           "SPLIT", "BIAS"]

SPACING_MM = 1.5

# Stream identifiers for np.random.SeedSequence([seed, STREAM, ...]).
ANATOMY, STYLE, RENDER, SPLIT, BIAS = range(5)


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


def make_anatomy(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one random subject: a label map of shape (size, size, size), uint8.

    Labels: 0 outside the body, 1 body, 2 organ_a, 3 organ_b, 4 lesion(s) inside organ_a. The body is a
    rotated ellipsoid, the organs are rotated ellipsoids with a smooth radial perturbation on opposite sides of
    the body, lesions are 1-3 small spheres centred inside organ_a; a smooth random displacement field deforms
    everything. Shapes are defined on a normalised grid, so a subject looks alike at every ``size``. Every
    label is guaranteed to be present (draws are repeated, deterministically, until it is).
    """
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
            q = _ellipsoid_q(w, centre, radii, _rotation(rng))
            wobble = 1.0 + np.float32(rng.uniform(0.08, 0.18)) * np.tanh(_smooth_field(rng, axes, max_cycles=2.0))
            q /= wobble * wobble  # smooth radial perturbation of the ellipsoid: inside is q <= 1
            organs.append((q, (q <= 1.0) & body))
        (q_a, organ_a), (_, organ_b) = organs

        label = body.astype(np.uint8)
        label[organ_b] = 3
        label[organ_a] = 2  # organ_a wins where the two overlap

        # lesion centres: organ_a voxels well inside the organ (q_a <= 0.4, i.e. within ~63 % of its radius)
        core = np.flatnonzero((q_a <= 0.4) & (label == 2))
        if core.size == 0:
            core = np.flatnonzero(label == 2)
        if core.size == 0:
            continue
        x, y, z = (a.ravel() for a in axes)
        for _ in range(int(rng.integers(1, 4))):
            r = max(rng.uniform(0.05, 0.10), 1.5 * voxel)
            i, j, k = np.unravel_index(core[int(rng.integers(core.size))], label.shape)
            lesion = (x[:, None, None] - x[i]) ** 2 + (y[None, :, None] - y[j]) ** 2 + (z[None, None, :] - z[k]) ** 2
            label[(lesion <= np.float32(r * r)) & (label == 2)] = 4

        counts = np.bincount(label.ravel(), minlength=5)
        if counts[1] > 0.05 * label.size and min(counts[2], counts[3]) > 0.004 * label.size and counts[4] >= 4:
            return label
    raise RuntimeError(f"could not draw a phantom with all labels present at size {size}")  # pragma: no cover


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
