"""Disentanglement measures of the MeDUET paper's Figure 1, computed on pooled embeddings.

* ``probe_accuracy``: balanced accuracy of a cross-validated linear probe (standardised features, L2-regularised
  logistic regression) predicting a label (site, subject) from features. Folds are *grouped* (e.g. by subject
  when predicting the site), so every prediction is made on a case whose group was never seen by that fold's
  probe; the balanced accuracy is computed over all out-of-fold predictions.
* ``similarity_ratio``: mean cosine similarity between cases of *different* label values divided by the mean
  between cases of the *same* value, on standardised features, with cosine mapped to ``[0, 1]`` by
  ``(1 + cos) / 2``. Near 1: the features ignore the label; well below 1: they cluster by it.
* ``embed_2d``: t-SNE (or PCA) coordinates for plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["probe_accuracy", "similarity_ratio", "embed_2d", "chance_level"]


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)


def chance_level(labels: Sequence) -> float:
    """Balanced accuracy of guessing: ``1 / number of classes``."""
    return 1.0 / max(1, len(set(labels)))


def probe_accuracy(features: np.ndarray, labels: Sequence, groups: Sequence | None = None, folds: int | None = None,
                   c: float = 1.0) -> float:
    """Cross-validated balanced accuracy of a linear probe ``features (n, f) -> labels (n,)``.

    Args:
        groups: fold groups (leave-one-group-out when ``folds`` is None, else ``GroupKFold(folds)``); without
            groups, stratified ``folds``-fold (default 5) cross-validation.
        c: inverse regularisation strength of the logistic regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    pred = cross_val_predict(probe, x, y, cv=split)
    return float(balanced_accuracy_score(y, pred))


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
