"""Disentanglement measures of the MeDUET paper's Figure 1, computed on pooled embeddings.

* ``probe_accuracy``: balanced accuracy of a cross-validated linear probe (standardised features, L2-regularised
  logistic regression) predicting a label (site, subject) from features. Folds are *grouped* (e.g. by subject
  when predicting the site), so every prediction is made on a case whose group was never seen by that fold's
  probe; the balanced accuracy is computed over all out-of-fold predictions.
* ``similarity_ratio``: mean cosine similarity between cases of *different* label values divided by the mean
  between cases of the *same* value, on standardised features, with cosine mapped to ``[0, 1]`` by
  ``(1 + cos) / 2``. Near 1: the features ignore the label; well below 1: they cluster by it.
* ``embed_2d``: t-SNE (or PCA) coordinates for plots.
* ``fit_linear_eraser``: least-squares linear concept erasure (LEACE) of a label, fitted on one set of cases and
  applied to others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["probe_accuracy", "probe_predictions", "probe_probabilities", "linear_probe", "bootstrap_interval",
           "bootstrap_mean_interval", "group_resample_counts", "similarity_ratio", "embed_2d", "chance_level",
           "LinearEraser", "fit_linear_eraser"]


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)


def chance_level(labels: Sequence) -> float:
    """Balanced accuracy of guessing: ``1 / number of classes``."""
    return 1.0 / max(1, len(set(labels)))


def linear_probe(c: float = 1.0):
    """The probe every classification here fits: standardised features, L2-regularised logistic regression with
    inverse strength ``c`` (an unfitted scikit-learn pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def probe_predictions(features: np.ndarray, labels: Sequence, groups: Sequence | None = None,
                      folds: int | None = None, c: float = 1.0) -> np.ndarray:
    """Out-of-fold predictions ``(n,)`` of a cross-validated linear probe ``features (n, f) -> labels (n,)``.

    Args:
        groups: fold groups (leave-one-group-out when ``folds`` is None, else ``GroupKFold(folds)``); without
            groups, stratified ``folds``-fold (default 5) cross-validation.
        c: inverse regularisation strength of the logistic regression.
    """
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, StratifiedKFold, cross_val_predict

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, f) with n = len(labels), got {x.shape} and {len(y)}")
    if len(set(y.tolist())) < 2:
        raise ValueError("a probe needs at least two classes")
    if groups is not None:
        g = np.asarray(groups)
        cv = LeaveOneGroupOut() if folds is None else GroupKFold(n_splits=folds)
        split = list(cv.split(x, y, g))
    else:
        n_min = min(np.unique(y, return_counts=True)[1])
        cv = StratifiedKFold(n_splits=max(2, min(folds or 5, n_min)), shuffle=True, random_state=0)
        split = list(cv.split(x, y))
    return cross_val_predict(linear_probe(c), x, y, cv=split)


def probe_probabilities(features: np.ndarray, labels: Sequence, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                        c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(classes (k,), probabilities (n, k))``: out-of-fold class probabilities of the ``linear_probe`` for the
    given ``splits`` (``(train_index, test_index)`` pairs covering every case once as a test case).

    A class absent from a fold's training cases gets probability 0 on that fold's test cases (the probe cannot
    name it); a fold whose training cases hold a single class predicts that class with probability 1.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, f) with n = len(labels), got {x.shape} and {len(y)}")
    classes = np.unique(y)
    proba = np.full((len(y), len(classes)), np.nan)
    for train, test in splits:
        train, test = np.asarray(train), np.asarray(test)
        present = np.unique(y[train])
        cols = np.searchsorted(classes, present)
        proba[test] = 0.0
        if len(present) == 1:
            proba[test, cols[0]] = 1.0
            continue
        probe = linear_probe(c).fit(x[train], y[train])
        proba[np.ix_(test, cols)] = probe.predict_proba(x[test])
    if np.isnan(proba).any():
        raise ValueError("the splits must hold every case as a test case")
    return classes, proba


def probe_accuracy(features: np.ndarray, labels: Sequence, groups: Sequence | None = None, folds: int | None = None,
                   c: float = 1.0) -> float:
    """Cross-validated balanced accuracy of a linear probe ``features (n, f) -> labels (n,)`` (arguments as
    ``probe_predictions``)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(np.asarray(labels), probe_predictions(features, labels, groups, folds, c)))


def bootstrap_interval(labels: Sequence, predictions: Sequence, groups: Sequence | None = None,
                       level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the balanced accuracy of ``predictions`` against ``labels``.

    Whole ``groups`` are resampled with replacement (e.g. the subjects of a site probe: the cases of one subject
    are not independent), single cases without groups. It says how much the number would move with another draw
    of test cases of the same kind; the probes themselves are not refitted (the predictions are fixed), so it is
    the test-sampling part of the uncertainty. A resample that lacks a class is scored over the classes it has.
    """
    y, p = np.asarray(labels), np.asarray(predictions)
    if len(y) != len(p) or len(y) == 0:
        raise ValueError(f"labels and predictions must have the same non-zero length, got {len(y)} and {len(p)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    gi, times = group_resample_counts(len(y), groups, resamples, seed)
    classes, ci = np.unique(y, return_inverse=True)
    count = np.zeros((times.shape[1], len(classes)))  # cases of each class in each group, and how many were right
    hit = np.zeros((times.shape[1], len(classes)))
    np.add.at(count, (gi, ci), 1.0)
    np.add.at(hit, (gi, ci), (p == y).astype(np.float64))
    n, h = times @ count, times @ hit
    present = n > 0
    stats = np.where(present, h / np.where(present, n, 1.0), 0.0).sum(1) / present.sum(1)  # balanced accuracy
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def group_resample_counts(n: int, groups: Sequence | None = None, resamples: int = 2000,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(group_index (n,), times (resamples, n_groups))``: the bootstrap draws of whole groups with replacement
    (each resample draws as many groups as there are), as how often each group was drawn; single cases without
    ``groups``. A statistic that is a ratio of per-group sums is then ``times @ sums`` per resample. The same
    ``seed`` gives the same draws for every statistic of the same cases (so intervals of several metrics of one
    probe come from one set of resamples)."""
    g = np.arange(n) if groups is None else np.asarray(groups)
    if len(g) != n:
        raise ValueError(f"groups must have one entry per case, got {len(g)} for {n}")
    _, gi = np.unique(g, return_inverse=True)
    n_groups = int(gi.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(int(resamples), n_groups))
    times = np.zeros((int(resamples), n_groups))  # how often each group was drawn in each resample
    np.add.at(times, (np.arange(int(resamples))[:, None], draws), 1.0)
    return gi.reshape(-1), times


def bootstrap_mean_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of ``values`` (NaNs dropped; e.g. the style swap's
    per-pair gap closed): how far the mean could move with another draw of the same number of pairs."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("bootstrap_mean_interval needs at least one finite value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(int(resamples), v.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def similarity_ratio(features: np.ndarray, labels: Sequence) -> dict[str, float]:
    """``{"inter", "intra", "ratio"}``: mean (1 + cos)/2 similarity between cases with different / equal labels,
    and inter / intra, on standardised features."""
    x = _standardise(features)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = (1.0 + x @ x.T) / 2.0
    y = np.asarray(labels)
    same = y[:, None] == y[None, :]
    off_diag = ~np.eye(len(y), dtype=bool)
    intra_mask, inter_mask = same & off_diag, ~same
    if not intra_mask.any() or not inter_mask.any():
        raise ValueError("similarity_ratio needs at least two cases of one label and two different labels")
    intra, inter = float(sim[intra_mask].mean()), float(sim[inter_mask].mean())
    return {"inter": inter, "intra": intra, "ratio": inter / intra}


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates ``(n, 2)`` of standardised features by t-SNE (perplexity adapted to small n) or PCA."""
    x = _standardise(features)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method != "tsne":
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    from sklearn.manifold import TSNE

    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


class LinearEraser:
    """An affine map ``x -> x - (x - mean) @ proj.T`` that removes what a linear model can read of a label.

    Made by :func:`fit_linear_eraser`; ``proj`` has rank <= (number of classes - 1).
    """

    def __init__(self, mean: np.ndarray, proj: np.ndarray) -> None:
        self.mean, self.proj = np.asarray(mean, dtype=np.float64), np.asarray(proj, dtype=np.float64)

    @property
    def rank(self) -> int:
        return int(np.linalg.matrix_rank(self.proj, tol=1e-8))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x - (x - self.mean) @ self.proj.T


def fit_linear_eraser(features: np.ndarray, labels: Sequence, shrinkage: float = 0.1) -> LinearEraser:
    """Least-squares concept erasure (LEACE, Belrose et al. 2023) of ``labels`` from ``features (n, f)``.

    In the whitened space (covariance shrunk towards its mean eigenvalue by ``shrinkage``, so that few samples in
    many dimensions still give a well-conditioned whitening) the span of the feature/one-hot-label cross-covariance
    is projected out, and the result mapped back. On the fitting data every class then has the same mean
    (no linear classifier beats a constant one), while the features change as little as possible in the
    whitened norm. Used by meduet_pretrain's ``evaluate.yaml`` to measure how much site information in the content
    is *linear* in directions that the pretraining cases already show.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, f) with n = len(labels), got {x.shape} and {len(y)}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("erasure needs at least two classes")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    evals, evecs = np.linalg.eigh(cov)
    evals = np.clip(evals, 1e-12, None)
    whiten = evecs @ np.diag(evals ** -0.5) @ evecs.T
    unwhiten = evecs @ np.diag(evals ** 0.5) @ evecs.T
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    cross = xc.T @ (onehot - onehot.mean(0)) / len(x)
    u, sv, _ = np.linalg.svd(whiten @ cross, full_matrices=False)
    u = u[:, sv > 1e-10 * max(sv.max(), 1e-30)]
    return LinearEraser(mean, unwhiten @ u @ u.T @ whiten)
