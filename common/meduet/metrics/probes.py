"""Linear probes of per-case attributes (LDAE's evaluation of a semantic code: can a linear model read the
diagnosis, the age, an organ's volume from the features?).

* Folds are **subject-wise** (:func:`subject_folds`): all cases of one subject are in the same test fold, so a
  probe never predicts a case whose subject (e.g. the same anatomy at another visit or site) it was fitted on.
  Classification folds are ``StratifiedGroupKFold`` (subject-wise, with the class mix of each fold kept close to
  the whole), regression folds ``GroupKFold``; both deterministic. The number of folds is lowered to
  ``n_subjects // 2`` when there are fewer subjects, so that every test fold holds at least two subjects.
* **Classification** (:func:`classification_probe`): ``metrics.disentanglement.linear_probe`` (standardised
  features, logistic regression ``C = c``) fitted on each fold's training cases; the out-of-fold class
  probabilities give the ROC-AUC (binary; macro one-vs-rest over the classes for more) and their arg-max the
  balanced accuracy. Chance: balanced accuracy ``1 / k`` (any constant guess), AUC 0.5.
* **Regression** (:func:`regression_probe`): ridge regression on standardised features (statistics of the fold's
  training cases), ``alpha`` chosen per fold from :data:`ALPHAS` by an inner subject-wise cross-validation on that
  fold's training cases (least squared error); MAE and RMSE of the out-of-fold predictions. Chance: the MAE/RMSE of
  predicting each test case by the mean of its fold's training cases.
* **Intervals**: percentile bootstrap (95 % by default) resampling whole subjects with replacement, the
  out-of-fold predictions held fixed (``metrics.disentanglement.group_resample_counts``; every metric of a probe,
  and its chance level, uses the same resamples). They say how far a number could move with another draw of
  subjects of the same kind; refitting the probes is not part of it.
* The task is chosen from the values (:func:`infer_task`): integers (or booleans) with at most
  :data:`MAX_CLASSES` distinct values, and strings, are classes; other numbers are regressed.

Bad input is one line (``MeduetInputError``) naming the attribute and where it came from: missing from some
items (:func:`attribute_values`), constant, non-numeric for a regression, fewer than 4 subjects (two folds of two).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.metrics.disentanglement import bootstrap_interval, group_resample_counts, probe_probabilities

__all__ = ["TASKS", "MAX_CLASSES", "ALPHAS", "attribute_values", "check_varies", "infer_task", "subject_folds",
           "classification_probe", "regression_probe", "weighted_auc", "probe_attribute"]

TASKS = ("classification", "regression")
#: an integer attribute with at most this many distinct values is a classification target
MAX_CLASSES = 10
#: the ridge strengths searched by the inner cross-validation (features standardised)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))


def _plain(v: Any) -> Any:
    """A JSON-friendly Python scalar of a numpy scalar."""
    return v.item() if isinstance(v, np.generic) else v


def attribute_values(items: Sequence[Mapping[str, Any]], attribute: str, where: str) -> list:
    """The attribute's value on every item; a one-line error naming ``where`` (e.g. ``"'datalist.json' split
    'longitudinal'"``), the attribute and how many items lack it (or hold null) otherwise, or when a value is not a
    number or a name (a list, a mapping)."""
    missing = [i for i, it in enumerate(items) if it.get(attribute) is None]
    if missing:
        keys = sorted({k for it in items for k, v in it.items() if isinstance(v, (numbers.Number, str))
                       and k not in ("image", "label", "latent")})
        raise MeduetInputError(f"{where}: attribute '{attribute}' is missing from {len(missing)} of {len(items)} items "
                               f"(e.g. item {missing[0]}); add it to every item or leave it out of `attributes` "
                               f"(the items carry {keys})")
    values = [it[attribute] for it in items]
    bad = next((v for v in values if not isinstance(v, (numbers.Number, str, np.generic))), None)
    if bad is not None:
        raise MeduetInputError(f"{where}: attribute '{attribute}' holds {type(bad).__name__} values (e.g. {bad!r}); a "
                               "probe needs one number or name per item, leave it out of `attributes`")
    return values


def check_varies(values: Sequence, attribute: str, where: str) -> None:
    """A one-line error when ``values`` hold a single value: a constant attribute has nothing to probe."""
    if len({str(v) for v in values}) < 2:
        raise MeduetInputError(f"{where}: attribute '{attribute}' has the same value ({values[0]!r}) on all "
                               f"{len(values)} items, nothing to probe; leave it out of `attributes` or probe a split "
                               "where it varies")


def _is_integer(v: Any) -> bool:
    return isinstance(v, (numbers.Integral, np.bool_)) or isinstance(v, bool)


def infer_task(values: Sequence) -> str:
    """``"classification"`` for integers (booleans) with at most :data:`MAX_CLASSES` distinct values and for
    strings, else ``"regression"``."""
    if all(isinstance(v, str) for v in values):
        return "classification"
    if all(_is_integer(v) for v in values) and len(set(values)) <= MAX_CLASSES:
        return "classification"
    return "regression"


def subject_folds(subjects: Sequence, labels: Sequence | None = None, folds: int = 5,
                  where: str = "the cases") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_index, test_index)`` pairs of a subject-wise cross-validation: each subject's cases are in exactly
    one test fold. With ``labels`` (classification) ``StratifiedGroupKFold``, else ``GroupKFold``; ``min(folds,
    n_subjects // 2)`` folds, so each test fold holds at least two subjects (a one-line error below 4 subjects)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if int(folds) < 2:
        raise MeduetConfigError(f"folds must be at least 2, got {folds}; fix the config key folds")
    g = np.asarray([str(s) for s in subjects])
    n_subjects = len(set(g.tolist()))
    k = min(int(folds), n_subjects // 2)
    if k < 2:
        raise MeduetInputError(f"{where}: {len(g)} cases of {n_subjects} subject(s); subject-wise probes need at least "
                               "2 folds of at least 2 subjects each (4 subjects); add subjects or splits (key splits)")
    x = np.zeros((len(g), 1))
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": handled below
        warnings.simplefilter("ignore", UserWarning)
        if labels is None:
            split = GroupKFold(n_splits=k).split(x, groups=g)
        else:
            y = np.asarray([str(v) for v in labels])
            split = StratifiedGroupKFold(n_splits=k).split(x, y, groups=g)
        return [(np.asarray(tr), np.asarray(te)) for tr, te in split]


def weighted_auc(labels: Sequence, scores: np.ndarray, classes: Sequence, weights: np.ndarray | None = None
                 ) -> np.ndarray:
    """ROC-AUC of ``scores (n, k)`` (a column per class of ``classes``) against ``labels (n,)``, for each row of
    case ``weights (r, n)`` (bootstrap resamples as case multiplicities; None: one row of ones).

    Binary (``k == 2``): the AUC of the second class's score. More classes: the macro mean of one-vs-rest AUCs over
    the classes that have both positive and negative weight in the row (a resample that lacks a class is scored
    over the classes it has). Ties count one half. Rows without both kinds of case are NaN.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    w = np.ones((1, len(y))) if weights is None else np.asarray(weights, dtype=np.float64)
    cols = [1] if len(classes) == 2 else list(range(len(classes)))
    aucs = []
    for j in cols:
        pos = (y == classes[j]).astype(np.float64)
        _, level = np.unique(s[:, j], return_inverse=True)
        n_levels = int(level.max()) + 1
        onehot = np.zeros((len(y), n_levels))
        onehot[np.arange(len(y)), level.reshape(-1)] = 1.0
        p_lvl, n_lvl = (w * pos) @ onehot, (w * (1.0 - pos)) @ onehot  # weight of positives/negatives per level
        below = np.cumsum(n_lvl, axis=1) - n_lvl
        num = (p_lvl * (below + 0.5 * n_lvl)).sum(1)
        den = p_lvl.sum(1) * n_lvl.sum(1)
        aucs.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    a = np.stack(aucs, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return np.nanmean(a, axis=1)


def _interval(stats: np.ndarray, level: float) -> list[float]:
    tail = 100.0 * (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(stats, [tail, 100.0 - tail])
    return [float(low), float(high)]


def classification_probe(features: np.ndarray, labels: Sequence, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                         c: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(classes, probabilities (n, k), predictions (n,))`` of the out-of-fold logistic probe (see
    ``metrics.disentanglement.probe_probabilities``)."""
    classes, proba = probe_probabilities(features, labels, splits, c)
    return classes, proba, classes[np.argmax(proba, axis=1)]


def _standardise_with(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(a - mean) / sd for a in (train, *others)]


def _ridge_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                alphas: Sequence[float]) -> np.ndarray:
    """Ridge predictions ``(n_test, len(alphas))`` on features standardised by the training cases, with an
    (unpenalised) intercept: one SVD for every alpha."""
    xt, xs = _standardise_with(x_train, x_test)
    y_mean = y_train.mean()
    u, sv, vt = np.linalg.svd(xt, full_matrices=False)
    uty = u.T @ (y_train - y_mean)
    shrink = sv[:, None] / (sv[:, None] ** 2 + np.asarray(alphas, dtype=np.float64)[None, :])  # (r, A)
    coef = vt.T @ (shrink * uty[:, None])  # (f, A)
    return xs @ coef + y_mean


def _choose_alpha(x: np.ndarray, y: np.ndarray, subjects: np.ndarray, alphas: Sequence[float]) -> float:
    """The alpha of least squared error in a subject-wise inner cross-validation of ``(x, y)``
    (``min(3, n_subjects)`` folds); the middle of ``alphas`` with fewer than 2 subjects."""
    from sklearn.model_selection import GroupKFold

    k = min(3, len(set(subjects.tolist())))
    if k < 2:
        return float(alphas[len(alphas) // 2])
    err = np.zeros(len(alphas))
    for tr, te in GroupKFold(n_splits=k).split(x, groups=subjects):
        err += ((_ridge_path(x[tr], y[tr], x[te], alphas) - y[te, None]) ** 2).sum(0)
    return float(alphas[int(np.argmin(err))])


def regression_probe(features: np.ndarray, values: Sequence[float], splits: Sequence[tuple[np.ndarray, np.ndarray]],
                     subjects: Sequence, alphas: Sequence[float] = ALPHAS
                     ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """``(predictions (n,), baseline (n,), alpha per fold)``: out-of-fold ridge predictions (alpha by inner
    subject-wise CV on each fold's training cases) and the baseline that predicts each test case by its fold's
    training mean."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    g = np.asarray([str(s) for s in subjects])
    pred, base = np.full(len(y), np.nan), np.full(len(y), np.nan)
    chosen = []
    for train, test in splits:
        alpha = _choose_alpha(x[train], y[train], g[train], alphas)
        pred[test] = _ridge_path(x[train], y[train], x[test], [alpha])[:, 0]
        base[test] = y[train].mean()
        chosen.append(alpha)
    if np.isnan(pred).any():
        raise ValueError("the splits must hold every case as a test case")
    return pred, base, chosen


def _regression_stats(err: np.ndarray, gi: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample MAE and RMSE of errors ``err`` from per-subject sums."""
    n_groups = times.shape[1]
    count, s_abs, s_sq = np.zeros(n_groups), np.zeros(n_groups), np.zeros(n_groups)
    np.add.at(count, gi, 1.0)
    np.add.at(s_abs, gi, np.abs(err))
    np.add.at(s_sq, gi, err ** 2)
    n = times @ count
    return (times @ s_abs) / n, np.sqrt((times @ s_sq) / n)


def probe_attribute(features: np.ndarray, values: Sequence, subjects: Sequence, task: str = "auto", folds: int = 5,
                    c: float = 1.0, alphas: Sequence[float] = ALPHAS, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0, attribute: str = "attribute", where: str = "the cases") -> dict[str, Any]:
    """A subject-wise linear probe ``features (n, f) -> values (n,)`` with every number of it (see the module
    docstring): ``task``, ``n_cases``, ``n_subjects``, ``folds``; classification: ``classes``, ``class_counts``,
    ``balanced_accuracy`` and ``roc_auc`` (each with ``*_ci95``); regression: ``mae``, ``rmse`` (with ``*_ci95``),
    ``alpha`` (per fold), ``target`` (mean, sd, min, max); ``chance``: the same metrics of the baseline (with
    intervals for the regression baseline, which is computed on the same folds).

    ``task``: ``"auto"`` (:func:`infer_task`), ``"classification"`` or ``"regression"``. ``where`` and
    ``attribute`` name the data in the one-line errors (constant attribute, non-numeric regression target, too
    few subjects).
    """
    from sklearn.metrics import balanced_accuracy_score

    x = np.asarray(features, dtype=np.float64)
    vals = list(values)
    if x.ndim != 2 or len(x) != len(vals) or len(vals) != len(subjects):
        raise ValueError(f"features must be (n, f) with n = len(values) = len(subjects), got {x.shape}, {len(vals)}, "
                         f"{len(subjects)}")
    if not np.isfinite(x).all():
        raise MeduetInputError(f"{where}: the features probed for '{attribute}' hold NaN/Inf")
    if task == "auto":
        task = infer_task(vals)
    if task not in TASKS:
        raise MeduetConfigError(f"attribute '{attribute}': task must be 'auto', 'classification' or 'regression', "
                                f"got {task!r}; fix the config key attributes")
    check_varies(vals, attribute, where)
    g = np.asarray([str(s) for s in subjects])
    out: dict[str, Any] = {"task": task, "n_cases": len(vals), "n_subjects": len(set(g.tolist()))}
    if task == "classification":
        y = np.asarray(vals)
        splits = subject_folds(g, y, folds, where)
        classes, proba, pred = classification_probe(x, y, splits, c)
        gi, times = group_resample_counts(len(y), g, resamples, seed)
        auc = float(weighted_auc(y, proba, classes)[0])
        out.update({
            "folds": len(splits), "classes": [_plain(v) for v in classes],
            "class_counts": [int((y == v).sum()) for v in classes],
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "balanced_accuracy_ci95": list(bootstrap_interval(y, pred, g, level, resamples, seed)),
            "roc_auc": auc, "roc_auc_ci95": _interval(weighted_auc(y, proba, classes, times[:, gi]), level),
            "chance": {"balanced_accuracy": 1.0 / len(classes), "roc_auc": 0.5},
        })
        return out
    try:
        y = np.asarray([float(v) for v in vals], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in vals if not isinstance(v, numbers.Number))
        raise MeduetInputError(f"{where}: attribute '{attribute}' holds non-numeric values (e.g. {bad!r}), which "
                               f"cannot be regressed; probe it as classification (attributes: {{{attribute}: "
                               "classification})") from None
    if not np.isfinite(y).all():
        raise MeduetInputError(f"{where}: attribute '{attribute}' holds NaN/Inf values; fix the datalist")
    splits = subject_folds(g, None, folds, where)
    pred, base, chosen = regression_probe(x, y, splits, g, alphas)
    gi, times = group_resample_counts(len(y), g, resamples, seed)
    mae, rmse = _regression_stats(pred - y, gi, times)
    b_mae, b_rmse = _regression_stats(base - y, gi, times)
    out.update({
        "folds": len(splits),
        "mae": float(np.abs(pred - y).mean()), "mae_ci95": _interval(mae, level),
        "rmse": float(np.sqrt(((pred - y) ** 2).mean())), "rmse_ci95": _interval(rmse, level),
        "alpha": chosen,
        "target": {"mean": float(y.mean()), "sd": float(y.std()), "min": float(y.min()), "max": float(y.max())},
        "chance": {"mae": float(np.abs(base - y).mean()), "mae_ci95": _interval(b_mae, level),
                   "rmse": float(np.sqrt(((base - y) ** 2).mean())), "rmse_ci95": _interval(b_rmse, level)},
    })
    return out
