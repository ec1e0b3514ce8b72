"""Sample data that needs no download: multi-site CT-like phantoms and the packaged MNI152 brain.

Command line::

    python -m meduet.data.sample --out data/sample [--seed 0] [--size 64] [--subjects 24] [--sites 6]
                                 [--pretrain-subjects 0] [--longitudinal-subjects 0] [--visits 3]
                                 [--visit-gap-years 10] [--no-brain] [--brain-size 64] [--force]

Writes::

    <out>/sample.json                         generator parameters (a re-run with the same ones does nothing)
    <out>/phantoms/datalist.json              domains site0..site{K-1}, last third held out of training
    <out>/phantoms/images/<subject>_<site>.nii.gz   float32 CT-like volume (HU), 1.5 mm isotropic, RAS affine
    <out>/phantoms/labels/<subject>.nii.gz          uint8 label map, same grid: 0 bg, 1 body, 2 organ_a,
                                                    3 organ_b, 4 lesion
    <out>/phantoms/images/<subject>_v<k>_<site>.nii.gz, labels/<subject>_v<k>.nii.gz   longitudinal cohort, visit k
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
``--longitudinal-subjects N`` adds the split ``longitudinal`` (``meduet.data.cohorts``; changes no other file): N
further subjects seen at ``--visits`` ages ``--visit-gap-years`` apart, organ_a growing and organ_b shrinking with
age by a known law (``meduet.data.phantoms.age_scales``), labelled, one seen site each, lesions in half of them.
Phantom items carry attributes measured on their label map: ``organ_a_ml`` (with its lesions), ``organ_b_ml``,
``lesion_ml``, ``lesion`` (0/1); cohort items also ``age`` (years) and ``visit`` (0-based).

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
from dataclasses import asdict
from typing import Sequence

import numpy as np

from meduet.data.cohorts import (ATTRIBUTES, ageing_law, assign_cohort, assign_pool, assign_splits, baseline_age_range,
                                 cohort_cases, label_attributes)
from meduet.data.datalist import load_datalist, write_datalist
from meduet.data.phantoms import ANATOMY, RENDER, SPACING_MM, bias_field, make_anatomy, make_site_styles, render
from meduet.errors import MeduetInputError

__all__ = [
    "LABELS",
    "BRAIN_LABELS",
    "assign_splits",
    "phantom_affine",
    "load_mni152",
    "generate_sample_data",
    "main",
]

#: 2: items carry attributes (``meduet.data.cohorts``), params the cohort options; images and labels as in 1
GENERATOR_VERSION = 2
LABELS = {"0": "background", "1": "body", "2": "organ_a", "3": "organ_b", "4": "lesion"}
BRAIN_LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
#: a voxel is tissue when max(P(GM), P(WM)) reaches this; then the larger of the two wins
BRAIN_TISSUE_THRESHOLD = 0.3
#: world position (mm) of the phantom grid centre: a RAS grid with a non-zero origin
PHANTOM_CENTRE_MM = (0.0, 20.0, -120.0)



# ----------------------------------------------------------------------------------------------------------------
# splits, affine, I/O
# ----------------------------------------------------------------------------------------------------------------
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


def _make_phantoms(root: str, seed: int, size: int, n_subjects: int, n_sites: int, n_pool: int = 0,
                   n_cohort: int = 0, visits: int = 3, gap_years: float = 10.0) -> dict:
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
    cohort = assign_cohort(n_subjects + n_pool, n_cohort, visits, gap_years, seen, seed) if n_cohort > 0 else []
    affine = phantom_affine(size)
    biases = {s.name: bias_field(seed, s, size) for s in styles}
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
        "attributes": dict(ATTRIBUTES),
        **({"ageing_law": ageing_law()} if cohort else {}),
        "training": [],
        "validation": [],
        "test": [],
        **({"pretraining": []} if n_pool > 0 else {}),
        **({"longitudinal": []} if cohort else {}),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for split, entries in splits.items():
            for subj_idx, site_name in entries:
                subject = f"s{subj_idx:03d}"
                label = make_anatomy(np.random.default_rng([seed, ANATOMY, subj_idx]), size)
                label_rel = f"labels/{subject}.nii.gz"
                unlabeled = split == "pretraining"
                if not unlabeled:
                    pending.append(pool.submit(_save_nifti, os.path.join(root, label_rel), label, affine))
                for name in [site_name] if site_name is not None else domains:
                    site = by_name[name]
                    rng = np.random.default_rng([seed, RENDER, subj_idx, site.index])
                    image = render(label, site, biases[name], rng)
                    image_rel = f"images/{subject}_{name}.nii.gz"
                    pending.append(pool.submit(_save_nifti, os.path.join(root, image_rel), image, affine))
                    item = {"image": image_rel, **({} if unlabeled else {"label": label_rel}), "domain": name,
                            "subject": subject, **label_attributes(label)}
                    datalist[split].append(item)
                # bound the memory held by queued volumes; .result() re-raises a failed write here
                while len(pending) > 8:
                    pending.pop(0).result()
        for files, item in cohort_cases(seed, size, cohort, by_name, biases):  # the longitudinal cohort
            pending += [pool.submit(_save_nifti, os.path.join(root, rel), array, affine) for rel, array in files]
            datalist["longitudinal"].append(item)
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
    longitudinal_subjects: int = 0,
    visits: int = 3,
    visit_gap_years: float = 10.0,
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
    if longitudinal_subjects < 0:
        raise MeduetInputError(f"--longitudinal-subjects {longitudinal_subjects}: must be >= 0")
    baseline_age_range(visits, visit_gap_years)  # one-line error for visits the ageing law cannot hold
    out = os.path.abspath(os.fspath(out))
    params = {"version": GENERATOR_VERSION, "seed": seed, "size": size, "subjects": subjects, "sites": sites,
              "brain": bool(brain), "brain_size": brain_size if brain else None,
              "pretrain_subjects": int(pretrain_subjects), "longitudinal_subjects": int(longitudinal_subjects),
              "visits": int(visits) if longitudinal_subjects else None,
              "visit_gap_years": float(visit_gap_years) if longitudinal_subjects else None}
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
        phantoms = _make_phantoms(os.path.join(tmp, "phantoms"), seed, size, subjects, sites, pretrain_subjects,
                                  longitudinal_subjects, visits, visit_gap_years)
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
    if longitudinal_subjects:
        log(f"            longitudinal: {longitudinal_subjects} subjects x {visits} visits {visit_gap_years:g} years "
            "apart (one seen site each; organ_a grows, organ_b shrinks with age)")
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
    p.add_argument("--longitudinal-subjects", type=int, default=0,
                   help="subjects of a 'longitudinal' split, each at --visits ages (one seen site each), default 0")
    p.add_argument("--visits", type=int, default=3, help="visits per longitudinal subject, default 3")
    p.add_argument("--visit-gap-years", type=float, default=10.0, help="years between visits, default 10")
    p.add_argument("--no-brain", action="store_true", help="skip the MNI152 brain sample")
    p.add_argument("--brain-size", type=int, default=64, help="brain cube side in voxels, default 64")
    p.add_argument("--force", action="store_true", help="regenerate even if the output is up to date")
    a = p.parse_args(argv)
    try:
        generate_sample_data(a.out, a.seed, a.size, a.subjects, a.sites, not a.no_brain, a.brain_size, a.force,
                             pretrain_subjects=a.pretrain_subjects, longitudinal_subjects=a.longitudinal_subjects,
                             visits=a.visits, visit_gap_years=a.visit_gap_years)
    except MeduetInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
