"""meduet.viz: label maps drawn one colour per class with named colour-bar ticks, whatever the values' range."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from meduet.viz import _label_cmap, save_orthoslices


def _colours(png) -> set[tuple[int, int, int]]:
    a = mpimg.imread(str(png))[..., :3]
    return {tuple(int(round(v * 255)) for v in px) for px in a.reshape(-1, 3)}


def test_label_rows_use_one_distinct_colour_per_class(tmp_path):
    n = 5
    vol = np.zeros((20, 20, 20), np.float32)
    for k in range(1, n):  # a slab of each class through the centre slices
        vol[4 * k:4 * k + 4, :, :] = k
    png = save_orthoslices(tmp_path / "lab.png", {"labels": vol}, label_names={"labels": [f"c{k}" for k in range(n)]})
    cmap = _label_cmap(n)
    want = [tuple(int(round(v * 255)) for v in cmap(k)[:3]) for k in range(n)]
    assert len(set(want)) == n, "the classes must get distinct colours"
    got = _colours(png)
    for k, c in enumerate(want):
        assert c in got, f"class {k} colour {c} not drawn"


def test_label_colour_bar_names_the_classes(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = []
    orig = matplotlib.figure.Figure.colorbar

    def spy(self, *a, **k):
        bar = orig(self, *a, **k)
        seen.append(bar)
        return bar

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", spy)
    names = ["background", "body", "organ_a"]
    vol = np.random.default_rng(0).integers(0, 3, (8, 8, 8)).astype(np.float32)
    save_orthoslices(tmp_path / "x.png", {"image": vol * 10.0, "labels": vol}, label_names={"labels": names})
    assert len(seen) == 2
    assert [t.get_text() for t in seen[1].ax.get_yticklabels()] == names
    assert list(seen[1].get_ticks()) == [0, 1, 2]
    assert [t.get_text() for t in seen[0].ax.get_yticklabels()] != names  # grey rows keep numeric ticks


def test_interval_bars_draw_one_colour_per_series(tmp_path):
    from meduet.viz import save_interval_bars

    panels = [{"title": "lesion", "groups": ["BA", "AUC"], "reference": [0.5, 0.5],
               "series": {"a": [(0.8, 0.7, 0.9), (0.9, 0.8, 1.0)], "b": [(0.5, 0.4, 0.6), None]}},
              {"title": "age", "groups": ["MAE"], "series": {"a": [(3.0, 2.0, 4.0)], "c": [(5.0, 4.0, 6.0)]}}]
    png = save_interval_bars(tmp_path / "bars.png", panels, title="probes")
    got = _colours(png)
    import matplotlib.pyplot as plt

    for k in range(3):  # a, b, c: tab10's first three colours
        assert tuple(int(round(v * 255)) for v in plt.get_cmap("tab10")(k)[:3]) in got
