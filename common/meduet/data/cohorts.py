"""Who is in the sample phantoms (written by ``meduet.data.sample``): the subjects of each split (training /
validation / test, the unlabeled pretraining pool, the longitudinal cohort), their sites, and per-case attributes.

Attributes: every phantom item of the sample datalist carries numbers measured on its label map
(:func:`label_attributes`), for linear probes and attribute edits:

- ``organ_a_ml``: organ_a's volume *with the lesions inside it* (labels 2 and 4), ml;
- ``organ_b_ml``: organ_b's volume (label 3), ml;
- ``lesion_ml``: the lesions' volume (label 4), ml;
- ``lesion``: 1 when the label map has a lesion voxel, else 0.

Volumes are voxel counts times ``SPACING_MM^3`` (1.5^3 mm^3 = 0.003375 ml), rounded to 0.0001 ml. Every subject of
the training / validation / test / pretraining splits has lesions (``lesion`` is always 1 there); the cohort has
lesion-free subjects too.

Longitudinal cohort (``--longitudinal-subjects N --visits V --visit-gap-years G``): the split ``longitudinal`` with N
further subjects (indices after every labelled and pretraining subject, so no other split changes), each seen at
V visits G years apart. Per subject (its own stream ``[seed, COHORT, 1, index]``): a baseline age uniform in
``[AGE_RANGE[0], AGE_RANGE[1] - (V - 1) G]`` (20..60 years for 3 visits 10 years apart), floored to 0.1 year, so
that every visit lies inside the ageing law's range (:func:`meduet.data.phantoms.age_scales`); lesions present with
probability 0.5, the same at every visit. The subject's site is one seen site, balanced over the seen sites (as
in the pretraining pool), the same at every visit. Visit ``k`` is the subject's anatomy at age
``baseline + k G`` (``make_anatomy(..., age=...)``: the same subject, differing between visits only by the law),
rendered by its site with its own noise stream ``[seed, RENDER, index, site, k]``. Items: ``image``
(``images/<subject>_v<k>_<site>.nii.gz``), ``label`` (``labels/<subject>_v<k>.nii.gz``), ``domain``, ``subject``,
``age`` (years), ``visit`` (0-based) and the attributes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meduet.data.phantoms import (AGE_PIVOT, AGE_RANGE, AGE_SPAN_YEARS, ANATOMY, COHORT, ORGAN_A_GROWTH,
                                  ORGAN_B_SHRINK, RENDER, SPACING_MM, SPLIT, SiteStyle, make_anatomy, render)
from meduet.errors import MeduetInputError

__all__ = ["ATTRIBUTES", "ML_PER_VOXEL", "LESION_PROBABILITY", "CohortSubject", "label_attributes",
           "baseline_age_range", "assign_splits", "assign_pool", "assign_cohort", "cohort_cases", "ageing_law"]

#: one voxel of the phantom grid in ml
ML_PER_VOXEL = SPACING_MM**3 / 1000.0
#: the attribute keys of every phantom item, with what they measure (also written into the datalist)
ATTRIBUTES = {
    "organ_a_ml": "organ_a volume including the lesions inside it (labels 2 and 4), ml",
    "organ_b_ml": "organ_b volume (label 3), ml",
    "lesion_ml": "lesion volume (label 4), ml",
    "lesion": "1 if the label map has a lesion voxel, else 0",
}
#: probability that a cohort subject has lesions (at every visit)
LESION_PROBABILITY = 0.5


def label_attributes(label: np.ndarray) -> dict[str, float | int]:
    """The attributes (:data:`ATTRIBUTES`) of a phantom label map (labels 0..4 on the 1.5 mm grid)."""
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=5)
    ml = lambda n: round(float(n) * ML_PER_VOXEL, 4)  # noqa: E731
    return {"organ_a_ml": ml(counts[2] + counts[4]), "organ_b_ml": ml(counts[3]), "lesion_ml": ml(counts[4]),
            "lesion": int(counts[4] > 0)}


def ageing_law() -> dict[str, str]:
    """The ageing law in words and numbers (written into a datalist that has a cohort)."""
    t = f"(age - {AGE_PIVOT:g}) / {AGE_SPAN_YEARS:g}"
    return {"organ_a_radius_scale": f"1 + {ORGAN_A_GROWTH:g} * {t}",
            "organ_b_radius_scale": f"1 - {ORGAN_B_SHRINK:g} * {t}",
            "age_range_years": f"{AGE_RANGE[0]:g}..{AGE_RANGE[1]:g}", "generator": "meduet.data.phantoms.age_scales"}


@dataclass(frozen=True)
class CohortSubject:
    """One cohort subject: its index (anatomy stream ``[seed, ANATOMY, index]``), site, age at each visit, lesions."""

    index: int
    site: str
    ages: tuple[float, ...]
    lesions: bool

    @property
    def subject(self) -> str:
        return f"s{self.index:03d}"


def baseline_age_range(visits: int, gap_years: float) -> tuple[float, float]:
    """The range of baseline ages that keeps ``visits`` visits ``gap_years`` apart inside the law's ``AGE_RANGE``."""
    lo, hi = AGE_RANGE
    if visits < 1:
        raise MeduetInputError(f"--visits {visits}: need at least 1 visit")
    if not (gap_years >= 0 and math.isfinite(gap_years)):
        raise MeduetInputError(f"--visit-gap-years {gap_years}: must be a number >= 0")
    span = (visits - 1) * gap_years
    if span > hi - lo:
        raise MeduetInputError(f"--visits {visits} --visit-gap-years {gap_years:g}: the visits span {span:g} years, "
                               f"more than the ageing law's range {lo:g}..{hi:g} allows; use fewer visits or a shorter "
                               "gap")
    return lo, hi - span


def assign_splits(n_subjects: int, seen: Sequence[str], seed: int) -> dict[str, list[tuple[int, str | None]]]:
    """Split subjects ~60/15/25 % into training / validation / test (each at least one subject).

    Returns ``{"training": [(subject_index, site), ...], "validation": [...], "test": [(subject_index, None)]}``;
    training and validation subjects get one seen site each, cycling through ``seen`` in a random order so that
    the sites are balanced; test subjects are rendered by every site (site ``None``). Lists are sorted.
    """
    if n_subjects < 3:
        raise MeduetInputError(f"--subjects {n_subjects}: need at least 3 subjects (training, validation, test)")
    rng = np.random.default_rng([seed, SPLIT])
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


def _balanced_sites(n: int, seen: Sequence[str], rng: np.random.Generator) -> list[str]:
    sites = [seen[i % len(seen)] for i in range(n)]
    rng.shuffle(sites)
    return sites


def assign_pool(n_subjects: int, n_pool: int, seen: Sequence[str], seed: int) -> list[tuple[int, str]]:
    """The unlabeled pretraining pool: subjects ``n_subjects .. n_subjects + n_pool - 1`` (after every labelled
    subject, so the pool never changes them), each with one seen site, balanced over the seen sites."""
    sites = _balanced_sites(n_pool, seen, np.random.default_rng([seed, SPLIT, 1]))
    return [(n_subjects + i, site) for i, site in enumerate(sites)]


def assign_cohort(first_index: int, n: int, visits: int, gap_years: float, seen: Sequence[str],
                  seed: int) -> list[CohortSubject]:
    """``n`` cohort subjects with indices ``first_index ..`` (see the module docstring for the draws)."""
    lo, hi = baseline_age_range(visits, gap_years)
    sites = _balanced_sites(n, seen, np.random.default_rng([seed, COHORT, 0]))
    out = []
    for i, site in enumerate(sites):
        index = first_index + i
        rng = np.random.default_rng([seed, COHORT, 1, index])
        baseline = math.floor(rng.uniform(lo, hi) * 10.0) / 10.0
        lesions = bool(rng.uniform() < LESION_PROBABILITY)
        ages = tuple(min(round(baseline + k * gap_years, 6), AGE_RANGE[1]) for k in range(visits))
        out.append(CohortSubject(index, site, ages, lesions))
    return out


def cohort_cases(seed: int, size: int, cohort: Sequence[CohortSubject], sites: Mapping[str, SiteStyle],
                 biases: Mapping[str, np.ndarray]) -> Iterator[tuple[list[tuple[str, np.ndarray]], dict]]:
    """Every visit of every cohort subject, in order: ``([(label path, label map), (image path, image)], item)``
    with paths relative to the datalist (see the module docstring)."""
    for subj in cohort:
        site = sites[subj.site]
        for visit, age in enumerate(subj.ages):
            rng = np.random.default_rng([seed, ANATOMY, subj.index])  # the same draws at every visit
            label = make_anatomy(rng, size, age=age, lesions=subj.lesions)
            image = render(label, site, biases[site.name],
                           np.random.default_rng([seed, RENDER, subj.index, site.index, visit]))
            case = f"{subj.subject}_v{visit}"
            label_rel, image_rel = f"labels/{case}.nii.gz", f"images/{case}_{site.name}.nii.gz"
            item = {"image": image_rel, "label": label_rel, "domain": site.name, "subject": subj.subject, "age": age,
                    "visit": visit, **label_attributes(label)}
            yield [(label_rel, label), (image_rel, image)], item
