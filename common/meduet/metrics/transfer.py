"""How far a style transfer moves a case toward another site: the measures shared by meduet_pretrain's style swap and
meduet_diffusion's transfer, on phantom data that renders every subject at every site.

* ``swap_pairs``: distinct (A, B, T) item triples, A's content, B's style, T = A's subject at B's site;
* ``swap_gaps``: per label region, how much of the gap between A's reconstruction and T a transfer closes;
* ``oracle_paint``: the reference swap that knows the anatomy exactly (an upper bound through the same VAE);
* ``eta_squared``: how much of an image's variance inside the body its label regions explain (anatomy kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meduet.errors import MeduetConfigError

__all__ = ["SWAP_TARGET", "eta_squared", "region_means", "swap_gaps", "oracle_paint", "swap_pairs"]


#: ``gap_closed`` the style swap must reach for the issue's "changes the decoded intensities toward the other site":
#: a quarter of the gap. The reference swap that knows the anatomy (``oracle_paint``, reported as
#: ``oracle_gap_closed``) closes far more on the demo VAE, so the target is within what a latent swap can do.
SWAP_TARGET = 0.25


def eta_squared(image: np.ndarray, label: np.ndarray) -> float:
    """Fraction of the image's variance inside the body explained by the label regions' means."""
    body = label > 0
    v, lab = image[body].astype(np.float64), label[body].astype(np.int64)
    total = ((v - v.mean()) ** 2).sum()
    if total <= 0:
        return 0.0
    sums, counts = np.bincount(lab, weights=v), np.bincount(lab)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return float(1.0 - ((v - means[lab]) ** 2).sum() / total)


def region_means(image: np.ndarray, label: np.ndarray, regions: Sequence[int]) -> np.ndarray:
    """Mean of ``image`` inside each label region of ``regions``."""
    return np.array([image[label == r].mean() for r in regions], dtype=np.float64)


def swap_gaps(rec: np.ndarray, swap: np.ndarray, label: np.ndarray, target_rendered: np.ndarray,
              target_scan: np.ndarray, target_label: np.ndarray) -> dict[str, float]:
    """How far a style swap moves a case's decoded intensities toward the target scan T, per label region.

    ``rec`` / ``swap``: case A decoded with its own / the other site's style (A's grid, ``label``);
    ``target_rendered``: T's own latent decoded by the same VAE, ``target_scan``: the real T (both on
    ``target_label``'s grid; no spatial alignment with A is needed). Regions are the labels ``r > 0`` with at
    least 8 voxels in both label maps; ``d(x, Y)`` is the mean over them of ``|mean_r(x) - mean_r(Y)|``.

    Returns ``intensity_gap_rec / _swap`` and ``gap_closed = 1 - d(swap) / d(rec)`` against the rendered T (what
    a latent-space swap can reach through this VAE), the same three ``*_vs_scan`` against the real T, and
    ``vae_ceiling = 1 - d(rendered T, T) / d(rec, T)``: the share of the real-scan gap that T's own latent closes,
    i.e. the most any swap can close against the scan with this VAE.
    """
    regions = [r for r in range(1, int(max(label.max(), target_label.max())) + 1)
               if (label == r).sum() >= 8 and (target_label == r).sum() >= 8]
    if not regions:
        raise MeduetConfigError("style swap: the two label maps share no region of >= 8 voxels")
    mu_rendered = region_means(target_rendered, target_label, regions)
    mu_scan = region_means(target_scan, target_label, regions)

    def d(x: np.ndarray, lab: np.ndarray, target: np.ndarray) -> float:
        return float(np.abs(region_means(x, lab, regions) - target).mean())

    d_rec, d_swap = d(rec, label, mu_rendered), d(swap, label, mu_rendered)
    d_rec_scan, d_swap_scan = d(rec, label, mu_scan), d(swap, label, mu_scan)
    return {
        "intensity_gap_rec": d_rec, "intensity_gap_swap": d_swap, "gap_closed": 1.0 - d_swap / max(d_rec, 1e-8),
        "intensity_gap_rec_vs_scan": d_rec_scan, "intensity_gap_swap_vs_scan": d_swap_scan,
        "gap_closed_vs_scan": 1.0 - d_swap_scan / max(d_rec_scan, 1e-8),
        "vae_ceiling": 1.0 - d(target_rendered, target_label, mu_scan) / max(d_rec_scan, 1e-8),
    }


def oracle_paint(label: np.ndarray, latent: torch.Tensor, factor: int, values_from: tuple[np.ndarray, torch.Tensor]
                 | None = None) -> torch.Tensor | None:
    """The reference swap of ``style_swap_study``: a latent ``(C, X, Y, Z)`` painted from a label map alone.

    Each latent voxel gets the label fractions of its ``factor``^3 image block times one latent value per label;
    the values are the least-squares fit of ``values_from = (label, latent)`` (another scan; default ``label`` and
    ``latent`` themselves). Painting A's labels with T's values is a swap that knows the anatomy exactly and takes
    every tissue's appearance from T. Returns None if the label grid is not ``factor`` times the latent grid."""
    src_label, src_latent = values_from if values_from is not None else (label, latent)
    n = int(max(label.max(), src_label.max())) + 1

    def fractions(lab: np.ndarray, shape: Sequence[int]) -> torch.Tensor | None:
        if tuple(lab.shape) != tuple(int(v) * factor for v in shape):
            return None
        onehot = F.one_hot(torch.from_numpy(lab.astype(np.int64)), n).permute(3, 0, 1, 2).float()[None]
        return F.avg_pool3d(onehot, factor)[0]  # (n, X, Y, Z)

    fa, fs = fractions(label, latent.shape[1:]), fractions(src_label, src_latent.shape[1:])
    if fa is None or fs is None:
        return None
    values = torch.linalg.lstsq(fs.flatten(1).T.double(), src_latent.flatten(1).T.double().cpu()).solution  # (n, C)
    return torch.einsum("kxyz,kc->cxyz", fa.double(), values).float()


def swap_pairs(items: Sequence[dict[str, Any]], count: int | None = None) -> list[tuple[dict, dict, dict]]:
    """Distinct ``(A, B, T)`` item triples for style swaps: A = subject i at site a, B = another subject j at site b
    (half the site list away from a), T = subject i at site b (what the swap should look like; phantom data render
    every subject at every site). Items need ``subject`` and ``domain`` keys.

    Pairs come in rounds over the sites: round ``r`` takes site ``k`` (sorted) with subject ``k + r`` as A and
    subject ``k + r + 1`` as B, so each round has every site once as content and once as style, and later rounds
    use other subjects (no triple repeats). ``count=None`` gives one round (one pair per site); fewer than a round
    leaves the last sites out as content. Triples whose items are missing are skipped.
    """
    by_key = {(it.get("subject"), it["domain"]): it for it in items}
    subjects = sorted({it.get("subject") for it in items if it.get("subject") is not None})
    sites = sorted({it["domain"] for it in items})
    if len(subjects) < 2 or len(sites) < 2:
        return []
    count = len(sites) if count is None else int(count)
    half = max(1, len(sites) // 2)
    pairs = []
    for r in range(len(subjects)):
        for k in range(len(sites)):
            if len(pairs) >= count:
                return pairs
            i, j = subjects[(k + r) % len(subjects)], subjects[(k + r + 1) % len(subjects)]
            a, b = sites[k], sites[(k + half) % len(sites)]
            if (i, a) in by_key and (j, b) in by_key and (i, b) in by_key:
                pairs.append((by_key[(i, a)], by_key[(j, b)], by_key[(i, b)]))
    return pairs
