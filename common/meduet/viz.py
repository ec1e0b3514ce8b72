"""Pictures people can look at: orthogonal slices of volumes side by side (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from meduet.io import atomic_path  # noqa: E402

__all__ = ["save_orthoslices", "save_pair_grid", "save_interval_bars"]


def _as_3d(v) -> np.ndarray:
    a = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float32)
    while a.ndim > 3:
        a = a[0]
    return a


def _label_cmap(n: int):
    """``n`` distinct colours, class 0 (background) black; the rest from matplotlib's tab10 (tab20 beyond 10)."""
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return ListedColormap([(0.0, 0.0, 0.0, 1.0)] + [base(i % base.N) for i in range(n - 1)])


def save_orthoslices(
    path: str | Path,
    volumes: Mapping[str, object],
    title: str = "",
    cmaps: Mapping[str, str] | None = None,
    ranges: Mapping[str, Sequence[float]] | None = None,
    center: Sequence[int] | None = None,
    label_names: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a PNG with one row per volume and the axial, coronal and sagittal slices through ``center``.

    ``volumes`` maps a row name to a 3D array/tensor (leading singleton dims are dropped). ``cmaps`` and
    ``ranges`` set colour map and display range per row (default grey, the row's min/max). ``label_names`` marks
    rows that are label maps: class ``k`` is drawn in its own colour and the colour bar names the classes
    (``label_names[row][k]``), one entry per class, whatever values the row holds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmaps = dict(cmaps or {})
    ranges = dict(ranges or {})
    label_names = {k: list(v) for k, v in (label_names or {}).items()}
    rows = [(name, _as_3d(v)) for name, v in volumes.items()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(8.5, 2.5 * len(rows)), squeeze=False, layout="constrained")
    for r, (name, vol) in enumerate(rows):
        c = [s // 2 for s in vol.shape] if center is None else list(center)
        lo, hi = ranges.get(name, (float(vol.min()), float(vol.max())))
        cmap, names = cmaps.get(name, "gray"), label_names.get(name)
        if names:
            cmap, lo, hi = _label_cmap(len(names)), -0.5, len(names) - 0.5
        views = [vol[:, :, c[2]], vol[:, c[1], :], vol[c[0], :, :]]
        for k, (ax, view, label) in enumerate(zip(axes[r], views, ("axial", "coronal", "sagittal"))):
            im = ax.imshow(np.rot90(view), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
        bar = fig.colorbar(im, ax=axes[r].tolist(), shrink=0.9, pad=0.01)
        if names:
            bar.set_ticks(range(len(names)), labels=names, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_pair_grid(path: str | Path, rows: Sequence[Sequence[tuple[str, object]]], title: str = "",
                   vrange: Sequence[float] = (0.0, 1.0)) -> Path:
    """Write a PNG grid of 2D slices: one figure row per entry of ``rows``, each a list of ``(caption, slice)``;
    all panels share the display range ``vrange`` (grey)."""
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.4 * ncol, 2.5 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, row in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            caption, img = row[c]
            ax.imshow(np.rot90(np.asarray(img, dtype=np.float32)), cmap="gray", vmin=vrange[0], vmax=vrange[1],
                      interpolation="nearest")
            ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)


def save_interval_bars(path: str | Path, panels: Sequence[Mapping[str, object]], title: str = "") -> Path:
    """Write a PNG of bar charts with intervals, one panel per entry of ``panels``, each a mapping with
    ``"title"``, ``"groups"`` (x-axis groups, e.g. metrics), ``"series"`` (``{name: [(value, low, high) or None per
    group]}``, drawn side by side in each group, one colour per name across panels), optional ``"reference"``
    (a value per group or None, drawn as a dashed line across the group, e.g. the chance level) and ``"ylabel"``."""
    names = list(dict.fromkeys(n for p in panels for n in p["series"]))  # type: ignore[union-attr]
    cmap = plt.get_cmap("tab10")
    ncol = min(3, max(1, len(panels)))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        panel = panels[k]
        groups, series = list(panel["groups"]), dict(panel["series"])  # type: ignore[arg-type]
        width = 0.8 / max(1, len(series))
        labelled: set[str] = set()
        for j, name in enumerate(series):
            for g, entry in enumerate(series[name]):
                if entry is None:
                    continue
                v, lo, hi = (float(e) for e in entry)
                xpos = g - 0.4 + width * (j + 0.5)
                ax.bar(xpos, v, width * 0.9, color=cmap(names.index(name) % cmap.N),
                       label=None if name in labelled else name)
                labelled.add(name)
                ax.errorbar(xpos, v, yerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], color="black", capsize=3, lw=1)
        for g, ref in enumerate(panel.get("reference") or []):  # type: ignore[union-attr]
            if ref is not None:
                ax.hlines(float(ref), g - 0.45, g + 0.45, colors="grey", linestyles="dashed", lw=1.2)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(str(panel.get("title", "")), fontsize=9)
        ax.set_ylabel(str(panel.get("ylabel", "")), fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)
