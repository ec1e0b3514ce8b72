"""Linear probes of per-case attributes (meduet.metrics.probes): a feature that carries the attribute linearly is
read (high AUC / low MAE, intervals around the point), random features sit at chance, folds are subject-wise, and
bad input is one line naming the attribute."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.metrics.disentanglement import probe_probabilities
from meduet.metrics.probes import (_ridge_path, attribute_values, infer_task, probe_attribute, subject_folds,
                                   weighted_auc)


def _cases(n_subjects=24, per=3, seed=0):
    """Subjects with ``per`` cases each; a per-subject binary attribute (a lesion), a per-case age that grows
    by visit, and features: column 0 carries the attribute (plus noise), the rest is noise."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{i:03d}" for i in range(n_subjects)], per)
    lesion = np.repeat(np.arange(n_subjects) % 2, per)
    age = np.repeat(rng.uniform(30, 70, n_subjects), per) + np.tile(np.arange(per) * 2.0, n_subjects)
    noise = rng.normal(size=(len(subjects), 12))
    return subjects, lesion, age, noise


def _contains(interval, value):
    return interval[0] - 1e-12 <= value <= interval[1] + 1e-12


def test_a_linear_feature_is_read_with_intervals_around_the_point():
    subjects, lesion, age, noise = _cases()
    x = noise.copy()
    x[:, 0] += 3.0 * lesion
    r = probe_attribute(x, lesion.tolist(), subjects.tolist(), attribute="lesion")
    assert r["task"] == "classification" and r["classes"] == [0, 1] and r["folds"] == 5
    assert r["n_cases"] == 72 and r["n_subjects"] == 24 and r["class_counts"] == [36, 36]
    assert r["roc_auc"] > 0.9 and r["balanced_accuracy"] > 0.8
    assert _contains(r["roc_auc_ci95"], r["roc_auc"]) and _contains(r["balanced_accuracy_ci95"], r["balanced_accuracy"])
    assert r["roc_auc_ci95"][0] > 0.5 and r["balanced_accuracy_ci95"][0] > 0.5
    assert r["chance"] == {"balanced_accuracy": 0.5, "roc_auc": 0.5}

    x = noise.copy()
    x[:, 0] += (age - age.mean()) / 4.0
    r = probe_attribute(x, age.tolist(), subjects.tolist(), attribute="age")
    assert r["task"] == "regression" and len(r["alpha"]) == r["folds"] == 5
    assert r["mae"] < 0.5 * r["chance"]["mae"] and r["rmse"] < 0.5 * r["chance"]["rmse"]
    assert _contains(r["mae_ci95"], r["mae"]) and _contains(r["rmse_ci95"], r["rmse"])
    assert r["mae_ci95"][1] < r["chance"]["mae_ci95"][0]  # the intervals do not overlap
    assert r["rmse"] >= r["mae"] and r["target"]["min"] <= r["target"]["mean"] <= r["target"]["max"]


def test_more_classes_are_scored_by_macro_one_vs_rest_auc():
    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(30), 2)
    visit = np.tile([0, 1], 30) + 2 * (np.repeat(np.arange(30), 2) % 2)  # 4 classes
    x = rng.normal(size=(60, 6))
    x[:, :4] += 3.0 * np.eye(4)[visit]
    r = probe_attribute(x, visit.tolist(), subjects.tolist(), attribute="visit")
    assert r["task"] == "classification" and r["classes"] == [0, 1, 2, 3]
    assert r["chance"]["balanced_accuracy"] == 0.25 and r["roc_auc"] > 0.9 and r["balanced_accuracy"] > 0.6


def test_random_features_sit_at_chance():
    subjects, lesion, age, noise = _cases(n_subjects=40, seed=3)
    r = probe_attribute(noise, lesion.tolist(), subjects.tolist())
    assert abs(r["roc_auc"] - 0.5) < 0.15 and abs(r["balanced_accuracy"] - 0.5) < 0.15
    assert _contains(r["roc_auc_ci95"], 0.5) and _contains(r["balanced_accuracy_ci95"], 0.5)
    r = probe_attribute(noise, age.tolist(), subjects.tolist())
    assert r["mae"] > 0.9 * r["chance"]["mae"]  # no better than the training mean
    assert r["mae_ci95"][1] > r["chance"]["mae"]


@pytest.mark.parametrize("stratified", [True, False])
def test_folds_never_split_a_subject(stratified):
    subjects, lesion, _, _ = _cases(n_subjects=11, per=4)
    folds = subject_folds(subjects, lesion if stratified else None, folds=5)
    assert len(folds) == 5
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(len(subjects)))  # every case once as a test case
    for train, test in folds:
        assert not set(subjects[train]) & set(subjects[test])
        assert len(set(subjects[test])) >= 2
    # fewer subjects: fewer folds, still two subjects per test fold
    assert len(subject_folds(subjects[:24], None, folds=5)) == 3


def test_a_fold_without_a_class_gives_it_no_probability():
    x = np.arange(8, dtype=float)[:, None]
    y = np.array([0, 0, 0, 0, 1, 1, 0, 0])
    splits = [(np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])), (np.array([4, 5, 6, 7]), np.array([0, 1, 2, 3]))]
    classes, proba = probe_probabilities(x, y, splits)
    assert classes.tolist() == [0, 1]
    np.testing.assert_allclose(proba[4:], [[1, 0]] * 4)  # trained on class 0 only
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_weighted_auc_matches_scikit_learn_and_duplication():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 50)
    p = rng.dirichlet(np.ones(3), 50)
    p[:, 1] = np.round(p[:, 1], 1)  # ties
    p = p / p.sum(1, keepdims=True)
    assert weighted_auc(y, p, [0, 1, 2])[0] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    yb = (y == 1).astype(int)
    pb = np.stack([1 - p[:, 1], p[:, 1]], 1)
    assert weighted_auc(yb, pb, [0, 1])[0] == pytest.approx(roc_auc_score(yb, p[:, 1]))
    w = rng.integers(0, 3, 50)
    rep = np.repeat(np.arange(50), w)
    assert weighted_auc(yb, pb, [0, 1], w[None].astype(float))[0] == pytest.approx(roc_auc_score(yb[rep], p[rep, 1]))


def test_ridge_path_is_ridge_on_standardised_features():
    rng = np.random.default_rng(4)
    x, y, xt = rng.normal(size=(30, 8)) * 5 + 2, rng.normal(size=30), rng.normal(size=(7, 8))
    got = _ridge_path(x, y, xt, [0.1, 10.0])
    mean, sd = x.mean(0), x.std(0)
    for k, alpha in enumerate([0.1, 10.0]):
        want = Ridge(alpha=alpha).fit((x - mean) / sd, y).predict((xt - mean) / sd)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-6, atol=1e-8)


def test_task_is_chosen_from_the_values():
    assert infer_task([0, 1, 1, 0]) == "classification"
    assert infer_task([True, False]) == "classification"
    assert infer_task(["a", "b"]) == "classification"
    assert infer_task(list(range(11))) == "regression"
    assert infer_task([0.5, 1.0, 2.0]) == "regression"


def _one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg and ";" in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_input_is_one_line_naming_the_attribute():
    items = [{"subject": "a", "lesion": 1}, {"subject": "b"}, {"subject": "c", "lesion": None}]
    with pytest.raises(MeduetInputError) as err:
        attribute_values(items, "lesion", "'dl.json' split 'longitudinal'")
    _one_line(err, "'dl.json' split 'longitudinal'", "'lesion'", "missing from 2 of 3 items")
    with pytest.raises(MeduetInputError) as err:
        attribute_values([{"spacing": [1.5, 1.5, 1.5]}], "spacing", "'dl.json' split 'test'")
    _one_line(err, "'spacing'", "list values")
    subjects, lesion, age, noise = _cases(n_subjects=6)
    with pytest.raises(MeduetInputError) as err:
        probe_attribute(noise, [1] * len(lesion), subjects, attribute="lesion", where="'dl.json' split 'test'")
    _one_line(err, "'dl.json' split 'test'", "'lesion'", "same value")
    with pytest.raises(MeduetInputError) as err:
        probe_attribute(noise[:9], age[:9], subjects[:9], attribute="age", where="'dl.json' split 'test'")
    _one_line(err, "3 subject(s)", "4 subjects")
    with pytest.raises(MeduetInputError) as err:
        probe_attribute(noise, ["x", "y"] * 9, subjects, task="regression", attribute="site")
    _one_line(err, "'site'", "non-numeric")
    with pytest.raises(MeduetConfigError) as err:
        probe_attribute(noise, age, subjects, task="ordinal", attribute="age")
    _one_line(err, "'age'", "task")
    with pytest.raises(MeduetConfigError) as err:
        subject_folds(subjects, None, folds=1)
    _one_line(err, "folds")
