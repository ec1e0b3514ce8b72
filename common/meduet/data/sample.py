"""Sample data that needs no download: multi-site CT-like phantoms and the packaged MNI152 brain.

Command line::

    python -m meduet.data.sample --out data/sample [--seed 0] [--size 64] [--subjects 24] [--sites 6]
                                 [--pretrain-subjects 0] [--no-brain] [--brain-size 64] [--force]

Writes::

    <out>/sample.json                         generator parameters (a re-run with the same ones does nothing)
    <out>/phantoms/datalist.json              domains site0..site{K-1}, last third held out of training
    <out>/phantoms/images/<subject>_<site>.nii.gz   float32 CT-like volume (HU), 1.5 mm isotropic, RAS affine
    <out>/phantoms/labels/<subject>.nii.gz          uint8 label map, same grid: 0 bg, 1 body, 2 organ_a,
                                                    3 organ_b, 4 lesion
    <out>/brain/datalist.json                 MR, one item (domain "mni152")
    <out>/brain/images/mni152_t1.nii.gz       nilearn's MNI ICBM152 T1 (values in [0, 1]), cube around the brain
    <out>/brain/labels/mni152_t1.nii.gz       uint8: 0 background, 1 grey matter, 2 white matter

Phantoms: *content* is the label map (random body / two organs / lesions per subject); *style* is the site.
A site renders a label map through its own contrast table (HU per class), blur, smooth multiplicative bias
field, global intensity scale/offset and Gaussian noise; nothing about the anatomy depends on the site.
Training and validation subjects are rendered once, each by one seen site (balanced over seen sites);
test subjects are rendered by every site (seen and held out), so the same anatomy exists in all styles.
``--pretrain-subjects N`` adds the split ``pretraining``: N further subjects, each rendered once by a seen site
(balanced), listed *without labels* -- the unlabeled multi-site pool that self-supervised pretraining is for
(meduet_pretrain trains on it; the VAE and the segmentation never see it). Adding it changes no other file.

Everything is deterministic from ``--seed`` (independent of thread scheduling). The output is generated in a
hidden temporary folder next to ``--out`` and renamed into place, so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from meduet.data.datalist import load_datalist, write_datalist
from meduet.errors import MeduetInputError

__all__ = [
    "LABELS",
    "BRAIN_LABELS",
    "SiteStyle",
    "make_site_styles",
    "make_anatomy",
    "render",
    "assign_splits",
    "phantom_affine",
    "load_mni152",
    "generate_sample_data",
    "main",
]

GENERATOR_VERSION = 1
SPACING_MM = 1.5
LABELS = {"0": "background", "1": "body", "2": "organ_a", "3": "organ_b", "4": "lesion"}
BRAIN_LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
#: a voxel is tissue when max(P(GM), P(WM)) reaches this; then the larger of the two wins
BRAIN_TISSUE_THRESHOLD = 0.3
#: world position (mm) of the phantom grid centre: a RAS grid with a non-zero origin
PHANTOM_CENTRE_MM = (0.0, 20.0, -120.0)

# Stream identifiers for np.random.SeedSequence([seed, STREAM, ...]): every random quantity has its own stream,
# so e.g. adding a site never changes the anatomy, and rendering order never changes the noise.
_ANATOMY, _STYLE, _RENDER, _SPLIT, _BIAS = range(5)


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
    rng = np.random.default_rng([seed, _STYLE])
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


def _bias_field(seed: int, site: SiteStyle, size: int) -> np.ndarray:
    """The site's smooth multiplicative bias field, shape (size,)*3, float32, values in 1 +- bias_amplitude."""
    field = _smooth_field(np.random.default_rng([seed, _BIAS, site.index]), _axes(size), n_terms=3, max_cycles=0.8)
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


# ----------------------------------------------------------------------------------------------------------------
# splits, affine, I/O
# ----------------------------------------------------------------------------------------------------------------
def assign_splits(n_subjects: int, seen: Sequence[str], seed: int) -> dict[str, list[tuple[int, str | None]]]:
    """Split subjects ~60/15/25 % into training / validation / test (each at least one subject).

    Returns ``{"training": [(subject_index, site), ...], "validation": [...], "test": [(subject_index, None)]}``;
    training and validation subjects get one seen site each, cycling through ``seen`` in a random order so that
    the sites are balanced; test subjects are rendered by every site (site ``None``). Lists are sorted.
    """
    if n_subjects < 3:
        raise MeduetInputError(f"--subjects {n_subjects}: need at least 3 subjects (training, validation, test)")
    rng = np.random.default_rng([seed, _SPLIT])
    n_test = max(1, int(round(0.25 * n_subjects)))
    n_val = max(1, int(round(0.15 * n_subjects)))
    n_train = n_subjects - n_test - n_val
    order = rng.permutation(n_subjects)
    site_order = list(rng.permutation(len(seen)))
    cycle = [seen[site_order[i % len(seen)]] for i in range(n_train + n_val)]
    train_sites, val_sites = cycle[:n_train], cycle[n_train:]
    rng.shuffle(train_sites)
    train = sorted(zip(order[:n_train].tolist(), train_sites))
    val = sorted(zip(order[n_train : n_train + n_val].tolist(), val_sites))
    test = sorted((int(s), None) for s in order[n_train + n_val :])
    return {"training": train, "validation": val, "test": test}


def phantom_affine(size: int) -> np.ndarray:
    """RAS voxel-to-world affine (4, 4): 1.5 mm isotropic, grid centred at :data:`PHANTOM_CENTRE_MM`."""
    aff = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    aff[:3, 3] = np.asarray(PHANTOM_CENTRE_MM) - SPACING_MM * (size - 1) / 2.0
    return aff


def _save_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def assign_pool(n_subjects: int, n_pool: int, seen: Sequence[str], seed: int) -> list[tuple[int, str]]:
    """The unlabeled pretraining pool: subjects ``n_subjects .. n_subjects + n_pool - 1`` (after every labelled
    subject, so the pool never changes them), each with one seen site, balanced over the seen sites."""
    rng = np.random.default_rng([seed, _SPLIT, 1])
    sites = [seen[i % len(seen)] for i in range(n_pool)]
    rng.shuffle(sites)
    return [(n_subjects + i, site) for i, site in enumerate(sites)]


def _make_phantoms(root: str, seed: int, size: int, n_subjects: int, n_sites: int, n_pool: int = 0) -> dict:
    """Write ``root/{images,labels,datalist.json}``; returns the datalist dict (relative paths).

    Volumes are computed in this thread and gzip-written by two worker threads (zlib releases the GIL), so
    file contents do not depend on scheduling.
    """
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    styles = make_site_styles(seed, n_sites)
    domains = [s.name for s in styles]
    n_heldout = max(1, n_sites // 3)
    seen, heldout = domains[: n_sites - n_heldout], domains[n_sites - n_heldout :]
    splits = assign_splits(n_subjects, seen, seed)
    if n_pool > 0:
        splits["pretraining"] = assign_pool(n_subjects, n_pool, seen, seed)
    affine = phantom_affine(size)
    biases = {s.name: _bias_field(seed, s, size) for s in styles}
    by_name = {s.name: s for s in styles}

    datalist: dict = {
        "name": "meduet_phantoms",
        "description": "Synthetic CT-like phantoms: content = label map (body, organs, lesions), "
        "style = site (contrast table, blur, bias field, intensity scale/offset, noise). "
        "Generated by python -m meduet.data.sample.",
        "modality": "CT",
        "tensorImageSize": "3D",
        "spacing": [SPACING_MM] * 3,
        "domains": domains,
        "heldout_domains": heldout,
        "labels": dict(LABELS),
        "sites": {s.name: {k: v for k, v in asdict(s).items() if k not in ("name", "index")} for s in styles},
        "training": [],
        "validation": [],
        "test": [],
        **({"pretraining": []} if n_pool > 0 else {}),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for split, entries in splits.items():
            for subj_idx, site_name in entries:
                subject = f"s{subj_idx:03d}"
                label = make_anatomy(np.random.default_rng([seed, _ANATOMY, subj_idx]), size)
                label_rel = f"labels/{subject}.nii.gz"
                unlabeled = split == "pretraining"
                if not unlabeled:
                    pending.append(pool.submit(_save_nifti, os.path.join(root, label_rel), label, affine))
                for name in [site_name] if site_name is not None else domains:
                    site = by_name[name]
                    rng = np.random.default_rng([seed, _RENDER, subj_idx, site.index])
                    image = render(label, site, biases[name], rng)
                    image_rel = f"images/{subject}_{name}.nii.gz"
                    pending.append(pool.submit(_save_nifti, os.path.join(root, image_rel), image, affine))
                    item = {"image": image_rel, **({} if unlabeled else {"label": label_rel}), "domain": name,
                            "subject": subject}
                    datalist[split].append(item)
                # bound the memory held by queued volumes; .result() re-raises a failed write here
                while len(pending) > 8:
                    pending.pop(0).result()
        for f in pending:
            f.result()
    write_datalist(os.path.join(root, "datalist.json"), datalist)
    return datalist


#: files that nilearn ships in ``nilearn/datasets/data/`` and its ``load_mni152_*template`` loaders read
_MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's 1 mm MNI ICBM152 T1, GM and WM templates: three float32 (197, 233, 189) arrays + the affine.

    Equal to ``nilearn.datasets.load_mni152_template(resolution=1)`` (and ``..._gm_template``,
    ``..._wm_template``): the packaged file, cast to float32 and divided by its maximum. The files are read
    directly with nibabel when found inside the installed nilearn package, because importing
    ``nilearn.datasets`` alone takes seconds; otherwise the nilearn loaders are called. Neither path uses the
    network. Raises ImportError when nilearn is not installed.
    """
    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nilearn is not installed")
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = {k: os.path.join(data_dir, f) for k, f in _MNI152_FILES.items()}
    if all(os.path.isfile(p) for p in paths.values()):
        imgs = {k: nib.load(p) for k, p in paths.items()}
    else:  # a nilearn release that moved the files: use its public loaders
        from nilearn import datasets

        imgs = {
            "t1": datasets.load_mni152_template(resolution=1),
            "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1),
        }
    arrays = []
    for k in ("t1", "gm", "wm"):
        a = np.asarray(imgs[k].dataobj).astype(np.float32)
        a /= a.max()
        arrays.append(a)
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs["t1"].affine, dtype=np.float64)


def _make_brain(root: str, size: int) -> dict:
    """Write the MNI152 T1 and its GM/WM label map resampled to a ``size``^3 cube around the brain."""
    from scipy import ndimage

    t1, gm, wm, src = load_mni152()
    label = np.where(np.maximum(gm, wm) >= BRAIN_TISSUE_THRESHOLD, np.where(wm > gm, 2, 1), 0).astype(np.uint8)

    idx = np.argwhere(label > 0)
    lo_w = (src @ np.append(idx.min(0), 1.0))[:3]
    hi_w = (src @ np.append(idx.max(0), 1.0))[:3]
    lo_w, hi_w = np.minimum(lo_w, hi_w), np.maximum(lo_w, hi_w)
    margin_mm = 4.0
    side = float((hi_w - lo_w).max()) + 2 * margin_mm
    spacing = side / size
    centre = (lo_w + hi_w) / 2.0
    out_aff = np.diag([spacing, spacing, spacing, 1.0])
    out_aff[:3, 3] = centre - spacing * (size - 1) / 2.0
    # output voxel j -> world out_aff @ j -> source voxel inv(src) @ out_aff @ j
    m = np.linalg.inv(src) @ out_aff
    factor = spacing / float(np.abs(np.linalg.svd(src[:3, :3], compute_uv=False)).mean())
    smooth = ndimage.gaussian_filter(t1, sigma=(factor - 1) / 2.0) if factor > 1 else t1  # anti-aliasing
    kw = dict(matrix=m[:3, :3], offset=m[:3, 3], output_shape=(size,) * 3, mode="constant", cval=0.0)
    image = ndimage.affine_transform(smooth, order=1, **kw).astype(np.float32)
    lab = ndimage.affine_transform(label, order=0, **kw).astype(np.uint8)

    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    _save_nifti(os.path.join(root, "images", "mni152_t1.nii.gz"), image, out_aff)
    _save_nifti(os.path.join(root, "labels", "mni152_t1.nii.gz"), lab, out_aff)
    item = {"image": "images/mni152_t1.nii.gz", "label": "labels/mni152_t1.nii.gz", "domain": "mni152",
            "subject": "mni152"}
    datalist = {
        "name": "meduet_mni152",
        "description": "nilearn's MNI ICBM152 2009 T1 template (skull-stripped, scaled to [0, 1]) with grey/white "
        f"matter labels (probability >= {BRAIN_TISSUE_THRESHOLD}, larger class wins), resampled to a "
        f"{size}^3 cube around the brain. Generated by python -m meduet.data.sample.",
        "modality": "MR",
        "tensorImageSize": "3D",
        "spacing": [round(spacing, 6)] * 3,
        "domains": ["mni152"],
        "heldout_domains": [],
        "labels": dict(BRAIN_LABELS),
        "training": [dict(item)],
        "validation": [],
        "test": [dict(item)],
    }
    write_datalist(os.path.join(root, "datalist.json"), datalist)
    return datalist


# ----------------------------------------------------------------------------------------------------------------
# atomic generation
# ----------------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(parent: str, name: str) -> None:
    """Delete temp folders of earlier killed runs (``.<name>.tmp-<pid>-*`` whose process is gone)."""
    for entry in os.listdir(parent):
        for tag in (".tmp-", ".old-"):
            prefix = f".{name}{tag}"
            if entry.startswith(prefix):
                pid = entry[len(prefix) :].split("-", 1)[0]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _is_up_to_date(out: str, params: dict) -> bool:
    """True when ``out/sample.json`` records ``params`` and the datalists it lists still validate."""
    try:
        with open(os.path.join(out, "sample.json"), encoding="utf-8") as f:
            record = json.load(f)
        if record.get("params") != params:
            return False
        if params["brain"] and not record.get("brain_written") and importlib.util.find_spec("nilearn"):
            return False  # the brain was skipped for lack of nilearn, which is now installed
        for rel in record.get("datalists", {}).values():
            load_datalist(os.path.join(out, rel), check_files=True)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def generate_sample_data(
    out: str | os.PathLike,
    seed: int = 0,
    size: int = 64,
    subjects: int = 24,
    sites: int = 6,
    brain: bool = True,
    brain_size: int = 64,
    force: bool = False,
    log=print,
    pretrain_subjects: int = 0,
) -> dict:
    """Generate the sample data into ``out`` (see the module docstring); returns the ``sample.json`` record.

    Does nothing when ``out`` already holds data made with the same parameters (unless ``force``). Refuses
    to replace a non-empty folder that was not written by this generator.
    """
    if size < 16:
        raise MeduetInputError(f"--size {size}: phantoms need at least 16 voxels per side")
    if sites < 3:
        raise MeduetInputError(f"--sites {sites}: need at least 3 sites (>= 2 seen for training, >= 1 held out)")
    if brain and brain_size < 8:
        raise MeduetInputError(f"--brain-size {brain_size}: need at least 8 voxels per side")
    if subjects < 3:
        raise MeduetInputError(f"--subjects {subjects}: need at least 3 subjects (training, validation, test)")
    if pretrain_subjects < 0:
        raise MeduetInputError(f"--pretrain-subjects {pretrain_subjects}: must be >= 0")
    out = os.path.abspath(os.fspath(out))
    params = {"version": GENERATOR_VERSION, "seed": seed, "size": size, "subjects": subjects, "sites": sites,
              "brain": bool(brain), "brain_size": brain_size if brain else None,
              "pretrain_subjects": int(pretrain_subjects)}
    if os.path.isdir(out) and not force and _is_up_to_date(out, params):
        log(f"{out} already holds sample data with these parameters; nothing to do (--force regenerates)")
        with open(os.path.join(out, "sample.json"), encoding="utf-8") as f:
            return json.load(f)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise MeduetInputError(f"{out}: exists and is not a folder; choose another --out")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "sample.json")):
            raise MeduetInputError(
                f"{out}: folder is not empty and was not written by meduet.data.sample; "
                "choose another --out or empty it first"
            )

    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, name)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    try:
        phantoms = _make_phantoms(os.path.join(tmp, "phantoms"), seed, size, subjects, sites, pretrain_subjects)
        brain_dl = None
        if brain:
            if importlib.util.find_spec("nilearn") is None:
                log("warning: nilearn is not installed (pip install nilearn); skipping the MNI152 brain sample")
            else:
                brain_dl = _make_brain(os.path.join(tmp, "brain"), brain_size)
        record = {
            "generator": "meduet.data.sample",
            "params": params,
            "brain_written": brain_dl is not None,
            "datalists": {"phantoms": "phantoms/datalist.json", **({"brain": "brain/datalist.json"} if brain_dl else {})},
        }
        write_datalist(os.path.join(tmp, "sample.json"), record)  # last file: marks a complete folder
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
            os.rename(out, os.path.join(old, name))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0

    n_test_subj = len({it["subject"] for it in phantoms["test"]})
    log(f"sample data written to {out} in {elapsed:.1f} s (seed {seed})")
    log(
        f"  phantoms: {subjects} subjects, {size}^3 at {SPACING_MM} mm, CT, domains {', '.join(phantoms['domains'])} "
        f"(held out of training: {', '.join(phantoms['heldout_domains'])})"
    )
    log(
        f"            training {len(phantoms['training'])} / validation {len(phantoms['validation'])} images; "
        f"test {len(phantoms['test'])} images = {n_test_subj} subjects x {sites} sites; "
        "labels 0 bg, 1 body, 2 organ_a, 3 organ_b, 4 lesion"
    )
    if pretrain_subjects:
        log(f"            pretraining pool: {pretrain_subjects} unlabeled images (one seen site each)")
    if brain_dl is not None:
        log(f"  brain:    MNI152 T1 {brain_size}^3 at {brain_dl['spacing'][0]:.2f} mm, MR, labels 0 bg, 1 GM, 2 WM")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (0 ok, 2 bad input)."""
    p = argparse.ArgumentParser(prog="python -m meduet.data.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="phantom cube side in voxels (1.5 mm), default 64")
    p.add_argument("--subjects", type=int, default=24)
    p.add_argument("--sites", type=int, default=6, help="number of sites; the last third is held out of training")
    p.add_argument("--pretrain-subjects", type=int, default=0,
                   help="unlabeled subjects in a 'pretraining' split (one seen site each), default 0")
    p.add_argument("--no-brain", action="store_true", help="skip the MNI152 brain sample")
    p.add_argument("--brain-size", type=int, default=64, help="brain cube side in voxels, default 64")
    p.add_argument("--force", action="store_true", help="regenerate even if the output is up to date")
    a = p.parse_args(argv)
    try:
        generate_sample_data(a.out, a.seed, a.size, a.subjects, a.sites, not a.no_brain, a.brain_size, a.force,
                             pretrain_subjects=a.pretrain_subjects)
    except MeduetInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
