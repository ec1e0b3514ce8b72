"""Pictures people can look at: orthogonal slices of volumes side by side (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_orthoslices"]


def _as_3d(v) -> np.ndarray:
    a = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float32)
    while a.ndim > 3:
        a = a[0]
    return a


def save_orthoslices(
    path: str | Path,
    volumes: Mapping[str, object],
    title: str = "",
    cmaps: Mapping[str, str] | None = None,
    ranges: Mapping[str, Sequence[float]] | None = None,
    center: Sequence[int] | None = None,
) -> Path:
    """Write a PNG with one row per volume and the axial, coronal and sagittal slices through ``center``.

    ``volumes`` maps a row name to a 3D array/tensor (leading singleton dims are dropped). ``cmaps`` and
    ``ranges`` set colour map and display range per row (default grey, the row's min/max).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmaps = dict(cmaps or {})
    ranges = dict(ranges or {})
    rows = [(name, _as_3d(v)) for name, v in volumes.items()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(8.5, 2.5 * len(rows)), squeeze=False, layout="constrained")
    for r, (name, vol) in enumerate(rows):
        c = [s // 2 for s in vol.shape] if center is None else list(center)
        lo, hi = ranges.get(name, (float(vol.min()), float(vol.max())))
        views = [vol[:, :, c[2]], vol[:, c[1], :], vol[c[0], :, :]]
        for k, (ax, view, label) in enumerate(zip(axes[r], views, ("axial", "coronal", "sagittal"))):
            im = ax.imshow(np.rot90(view), cmap=cmaps.get(name, "gray"), vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
        fig.colorbar(im, ax=axes[r].tolist(), shrink=0.9, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
