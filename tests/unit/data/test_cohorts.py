"""Tests for the ageing law of the phantoms (meduet.data.phantoms), per-case attributes and the longitudinal cohort
(meduet.data.cohorts) as the sample generator writes them.

Small sample data (32^3, 8 subjects, 4 sites) with and without a cohort is generated once per module.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from meduet.data.cohorts import ML_PER_VOXEL, assign_cohort, baseline_age_range, label_attributes
from meduet.data.datalist import load_datalist
from meduet.data.phantoms import ANATOMY, AGE_RANGE, age_scales, make_anatomy
from meduet.data.reference import noise_free_phantom
from meduet.data.sample import main as sample_main
from meduet.errors import MeduetInputError

SMALL = ["--size", "32", "--subjects", "8", "--sites", "4", "--no-brain"]
COHORT = ["--longitudinal-subjects", "4", "--visits", "3", "--visit-gap-years", "10"]
ATTRS = ("organ_a_ml", "organ_b_ml", "lesion_ml", "lesion")


def _rng(subject: int, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, ANATOMY, subject])


def _array(path: str) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _volumes(label: np.ndarray) -> tuple[int, int, int]:
    """Voxels of organ_a (with its lesions), organ_b, lesions."""
    return int(np.isin(label, (2, 4)).sum()), int((label == 3).sum()), int((label == 4).sum())


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("plain") / "sample"
    assert sample_main(["--out", str(out), *SMALL]) == 0
    return str(out)


@pytest.fixture(scope="module")
def with_cohort(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("cohort") / "sample"
    assert sample_main(["--out", str(out), *SMALL, "--pretrain-subjects", "2", *COHORT]) == 0
    return str(out)


# ---------------------------------------------------------------------------------------------- the ageing law
@pytest.mark.parametrize("size", [16, 32])
def test_default_anatomy_is_the_explicit_default(size):
    """age=None, lesions=True is the anatomy the sample data always had (the md5 of the generated files before and
    after the ageing law was added is identical; here: the defaults are the explicit call)."""
    for subject in range(4):
        a = make_anatomy(_rng(subject), size)
        b = make_anatomy(_rng(subject), size, age=None, lesions=True)
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a).tolist()) == {0, 1, 2, 3, 4}


def test_same_subject_at_several_ages_differs_only_by_the_law():
    ages = [20.0, 35.0, 50.0, 65.0, 80.0]
    for subject in range(3):
        labels = [make_anatomy(_rng(subject), 32, age=a) for a in ages]
        vols = np.array([_volumes(lab) for lab in labels])
        assert np.all(np.diff(vols[:, 0]) > 0), vols  # organ_a grows
        assert np.all(np.diff(vols[:, 1]) < 0), vols  # organ_b shrinks
        assert np.all(vols[:, 2] > 0), vols  # the lesions stay at every age
        for young, old in zip(labels, labels[1:]):
            np.testing.assert_array_equal(young > 0, old > 0)  # the body does not change
            a_young, a_old = np.isin(young, (2, 4)), np.isin(old, (2, 4))
            assert not (a_young & ~a_old).any()  # organ_a's region at a younger age lies inside the older one
            assert not ((old == 3) & (young != 3)).any()  # organ_b's region at an older age lies inside the younger
            changed = young != old
            # voxels change only from/to an organ region: body <-> organ, organ_b -> organ_a, lesions inside organ_a
            assert not (changed & (young <= 1) & (old <= 1)).any()
            assert set(np.unique(old[changed & (young == 1)]).tolist()) <= {2, 4}
            assert set(np.unique(young[changed & (old == 1)]).tolist()) <= {3}


def test_the_law_is_visible_at_demo_size():
    """A 10-year step changes organ_b's volume by >= ~10 % at 64^3 (the demo size; 16^3 latents)."""
    change = []
    for subject in range(5):
        b50, b60 = (_volumes(make_anatomy(_rng(100 + subject), 64, age=a))[1] for a in (50.0, 60.0))
        change.append(1.0 - b60 / b50)
    assert min(change) > 0.08 and np.median(change) > 0.10, change
    s_a, s_b = age_scales(AGE_RANGE[1])
    assert s_a > 1 > s_b and age_scales(50.0) == (1.0, 1.0)


def test_ages_and_lesions_draw_the_same_random_numbers():
    """The number of draws does not depend on the age or on lesions=False: the stream ends in the same state."""
    states = set()
    for age in (20.0, 47.3, 80.0):
        for lesions in (True, False):
            rng = _rng(7)
            make_anatomy(rng, 24, age=age, lesions=lesions)
            states.add(json.dumps(rng.bit_generator.state))
    assert len(states) == 1
    rng_a, rng_b = _rng(7), _rng(7)
    make_anatomy(rng_a, 24)
    make_anatomy(rng_b, 24, lesions=False)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state


@pytest.mark.parametrize("age", [None, 30.0])
def test_no_lesions_is_the_same_subject_without_label_4(age):
    for subject in range(3):
        with_lesions = make_anatomy(_rng(subject), 32, age=age)
        without = make_anatomy(_rng(subject), 32, age=age, lesions=False)
        assert (with_lesions == 4).any() and not (without == 4).any()
        np.testing.assert_array_equal(np.where(with_lesions == 4, 2, with_lesions), without)


def test_age_outside_the_law_is_an_error():
    with pytest.raises(ValueError, match="outside the ageing law's range"):
        make_anatomy(_rng(0), 16, age=AGE_RANGE[1] + 1)


def test_label_attributes_measure_the_label_map():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, :2, :] = 2
    label[1, 0, 0] = 4
    label[2, :, :] = 3
    att = label_attributes(label)
    assert att == {"organ_a_ml": round(9 * ML_PER_VOXEL, 4), "organ_b_ml": round(16 * ML_PER_VOXEL, 4),
                   "lesion_ml": round(1 * ML_PER_VOXEL, 4), "lesion": 1}
    assert label_attributes(np.where(label == 4, 2, label))["lesion"] == 0
    assert ML_PER_VOXEL == pytest.approx(1.5**3 / 1000)


def test_cohort_assignment():
    seen = ["site0", "site1", "site2"]
    cohort = assign_cohort(30, 9, 4, 12.5, seen, seed=0)
    assert [c.index for c in cohort] == list(range(30, 39))
    assert sorted(c.site for c in cohort) == sorted(seen * 3)  # balanced over the seen sites
    lo, hi = baseline_age_range(4, 12.5)
    assert (lo, hi) == (AGE_RANGE[0], AGE_RANGE[1] - 37.5)
    for c in cohort:
        assert lo <= c.ages[0] <= hi and c.ages[-1] <= AGE_RANGE[1]
        assert np.allclose(np.diff(c.ages), 12.5)
    assert assign_cohort(30, 9, 4, 12.5, seen, seed=0) == cohort
    assert {c.lesions for c in assign_cohort(30, 40, 3, 10, seen, seed=0)} == {True, False}
    with pytest.raises(MeduetInputError, match="visits span 80 years"):
        baseline_age_range(5, 20)


# ---------------------------------------------------------------------------------------------- the sample data
def test_every_phantom_item_carries_its_attributes(plain):
    dl = load_datalist(os.path.join(plain, "phantoms", "datalist.json"))
    for split in ("training", "validation", "test"):
        for it in dl[split]:
            assert label_attributes(_array(it["label"])) == {k: it[k] for k in ATTRS}
            assert it["lesion"] == 1
    assert set(dl["attributes"]) == set(ATTRS)
    assert "longitudinal" not in dl and "ageing_law" not in dl


def test_cohort_split(with_cohort, plain):
    path = os.path.join(with_cohort, "phantoms", "datalist.json")
    dl = load_datalist(path)
    raw = json.load(open(path))
    items = dl["longitudinal"]
    assert len(items) == 4 * 3
    seen = [d for d in dl["domains"] if d not in dl["heldout_domains"]]
    others = {it["subject"] for s in ("training", "validation", "test", "pretraining") for it in dl[s]}
    subjects = sorted({it["subject"] for it in items})
    assert subjects == [f"s{i:03d}" for i in range(8 + 2, 8 + 2 + 4)] and not others & set(subjects)
    assert sorted(it["domain"] for it in items if it["visit"] == 0) == sorted(seen + seen[:1])  # balanced, seen
    for subject in subjects:
        visits = [it for it in items if it["subject"] == subject]
        assert [it["visit"] for it in visits] == [0, 1, 2]
        assert np.allclose(np.diff([it["age"] for it in visits]), 10.0)
        assert AGE_RANGE[0] <= visits[0]["age"] and visits[-1]["age"] <= AGE_RANGE[1]
        assert len({it["domain"] for it in visits}) == 1 and len({it["lesion"] for it in visits}) == 1
        labels = [_array(it["label"]) for it in visits]
        for it, lab in zip(visits, labels):
            assert label_attributes(lab) == {k: it[k] for k in ATTRS}  # attributes = the label map's volumes
            assert it["lesion"] == int((lab == 4).any())
            assert os.path.basename(it["image"]) == f"{subject}_v{it['visit']}_{it['domain']}.nii.gz"
            assert os.path.basename(it["label"]) == f"{subject}_v{it['visit']}.nii.gz"
        assert visits[0]["organ_a_ml"] < visits[1]["organ_a_ml"] < visits[2]["organ_a_ml"]
        assert visits[0]["organ_b_ml"] > visits[1]["organ_b_ml"] > visits[2]["organ_b_ml"]
        np.testing.assert_array_equal(labels[0] > 0, labels[2] > 0)  # same subject
        # each visit has its own noise; the noise-free reference is the same visit without it
        images = [_array(it["image"]) for it in visits]
        body = (labels[0] == 1) & (labels[2] == 1)
        assert not np.allclose(images[0][body], images[2][body])
        clean, _ = noise_free_phantom(path, visits[1])
        noise = images[1] - clean
        std = raw["sites"][visits[1]["domain"]]["noise_std"]
        assert abs(noise.mean()) < 0.1 * std and noise.std() == pytest.approx(std, rel=0.1)
    assert raw["ageing_law"]["organ_b_radius_scale"].startswith("1 - ")
    # the cohort (and the pool) change no other split: same items, same files
    old = json.load(open(os.path.join(plain, "phantoms", "datalist.json")))
    for split in ("training", "validation", "test"):
        assert raw[split] == old[split]
        for it in old[split]:
            for key in ("image", "label"):
                a, b = (open(os.path.join(root, "phantoms", it[key]), "rb").read() for root in (plain, with_cohort))
                assert a == b, it[key]


def test_cohort_options_on_the_command_line(with_cohort, tmp_path, capsys):
    record = json.load(open(os.path.join(with_cohort, "sample.json")))
    assert record["params"]["longitudinal_subjects"] == 4 and record["params"]["visits"] == 3
    assert record["params"]["visit_gap_years"] == 10.0
    capsys.readouterr()
    assert sample_main(["--out", with_cohort, *SMALL, "--pretrain-subjects", "2", *COHORT]) == 0
    assert "nothing to do" in capsys.readouterr().out
    for bad in (["--visits", "0"], ["--visit-gap-years", "-1"], ["--visits", "3", "--visit-gap-years", "40"],
                ["--longitudinal-subjects", "-1"]):
        assert sample_main(["--out", str(tmp_path / "bad"), *SMALL, "--longitudinal-subjects", "2", *bad]) == 2
        assert "error: --" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
