"""Statistics, tables and pictures of bench/controlnet_study.py (split out to keep the script short).

Intervals: percentile bootstrap of the mean over test volumes, resampling whole *subjects* (the phantoms' test
split scans each subject at several sites, so the volumes of one subject are not independent;
``meduet.metrics.disentanglement.group_resample_counts``, the probes' subject bootstrap). A group of one volume per
subject (the seen and the unseen half of the study's test cases) is an ordinary volume bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["mean_interval", "fmt", "recon_summary", "recon_table", "seg_summary", "seg_table", "recon_picture"]

#: the rows of a reconstruction setting, in the table's order: key -> what it is
RECON_ROWS = {
    "input": "(a) degraded input (zero-filled / FBP, clipped to [0, 1])",
    "base": "(b) generator without the control (same factors, noise, sampler)",
    "controlnet": "(c) ControlNet",
    "controlnet_dc": "(c') ControlNet + data consistency (5 projected steps after sampling)",
    "unet": "(d) supervised MONAI UNet (residual, image space)",
    "vae": "(e) VAE ceiling (encode/decode of the clean volume)",
}


def mean_interval(values: Sequence[float], groups: Sequence[Any] | None = None, resamples: int = 2000,
                  seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and a 95% percentile bootstrap interval resampling
    whole ``groups`` (subjects; None: single values)."""
    from meduet.metrics.disentanglement import group_resample_counts

    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups if groups is not None else np.arange(len(v)), dtype=object)
    keep = np.isfinite(v)
    v, g = v[keep], g[keep]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    gi, times = group_resample_counts(len(v), list(g), resamples, seed)
    sums, counts = np.zeros(times.shape[1]), np.zeros(times.shape[1])
    np.add.at(sums, gi, v)
    np.add.at(counts, gi, 1.0)
    means = (times @ sums) / np.maximum(times @ counts, 1e-12)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(v.mean()), float(low), float(high)


def fmt(stat: Sequence[float] | None, digits: int = 2) -> str:
    """``mean [low, high]`` or ``-``."""
    if stat is None or not np.isfinite(stat[0]):
        return "-"
    m, lo, hi = stat
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _groups(cases: Sequence[Mapping[str, Any]], part: str) -> list[Mapping[str, Any]]:
    if part == "all":
        return list(cases)
    return [c for c in cases if c["seen"] == (part == "seen")]


def recon_summary(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per row of ``RECON_ROWS``, metric (psnr / ssim) and part (all / seen / unseen): ``(mean, low, high)``; also
    the paired gain of the ControlNet over the degraded input and over the UNet (PSNR, dB)."""
    out: dict[str, Any] = {}
    for part in ("all", "seen", "unseen"):
        sel = _groups(cases, part)
        if not sel:
            continue
        subj = [c["subject"] for c in sel]
        out[part] = {"n": len(sel), "subjects": len(set(subj))}
        for row in RECON_ROWS:
            out[part][row] = {k: mean_interval([c["metrics"][row][k] for c in sel], subj) for k in ("psnr", "ssim")}
        for other in ("input", "unet", "base"):
            out[part][f"controlnet_minus_{other}_psnr"] = mean_interval(
                [c["metrics"]["controlnet"]["psnr"] - c["metrics"][other]["psnr"] for c in sel], subj)
    return out


def recon_table(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per setting x method, PSNR (dB) and SSIM on seen and unseen sites (mean [95% CI])."""
    lines = ["| setting | output | PSNR seen (dB) | PSNR unseen (dB) | SSIM seen | SSIM unseen |",
             "|---|---|---|---|---|---|"]
    for name, res in settings.items():
        s = res["summary"]
        for row, what in RECON_ROWS.items():
            cells = [fmt(s.get(p, {}).get(row, {}).get("psnr")) for p in ("seen", "unseen")]
            cells += [fmt(s.get(p, {}).get(row, {}).get("ssim"), 3) for p in ("seen", "unseen")]
            lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | ControlNet - degraded input (dB) | ControlNet - generator without control (dB) | "
              "ControlNet - UNet (dB) | cases (seen / unseen), subjects |", "|---|---|---|---|---|"]
    for name, res in settings.items():
        a = res["summary"]["all"]
        n = f"{res['summary'].get('seen', {}).get('n', 0)} / {res['summary'].get('unseen', {}).get('n', 0)}, " \
            f"{a['subjects']}"
        lines.append(f"| {name} | {fmt(a['controlnet_minus_input_psnr'])} | {fmt(a['controlnet_minus_base_psnr'])} | "
                     f"{fmt(a['controlnet_minus_unet_psnr'])} | {n} |")
    return "\n".join(lines)


def seg_summary(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """``rows``: per test case ``{"subject", "seen", "real": {class: dice}, "real_synth": {...}}``; per part
    (seen / unseen), class and run: ``(mean, low, high)``, and the paired difference real + synthetic - real."""
    out: dict[str, Any] = {}
    for part in ("seen", "unseen"):
        sel = _groups(rows, part)
        if not sel:
            continue
        subj = [r["subject"] for r in sel]
        res: dict[str, Any] = {"n": len(sel)}
        for cls in [*classes, "mean"]:
            res[cls] = {run: mean_interval([r[run][cls] for r in sel], subj) for run in ("real", "real_synth")}
            res[cls]["difference"] = mean_interval([r["real_synth"][cls] - r["real"][cls] for r in sel], subj)
        out[part] = res
    return out


def seg_table(summary: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Markdown: Dice per organ (and the mean over organs) of real-only vs real + synthetic, seen / unseen sites."""
    lines = ["| sites | class | real only | real + synthetic | difference (paired) |", "|---|---|---|---|---|"]
    for part in ("unseen", "seen"):
        if part not in summary:
            continue
        for cls in [*classes, "mean"]:
            r = summary[part][cls]
            lines.append(f"| {part} ({summary[part]['n']} volumes) | {cls} | {fmt(r['real'], 3)} | "
                         f"{fmt(r['real_synth'], 3)} | {fmt(r['difference'], 3)} |")
    return "\n".join(lines)


def recon_picture(path: Path, panels: Sequence[Sequence[tuple[str, np.ndarray]]], title: str) -> Path:
    """degraded | UNet | ControlNet | truth, one row per case (middle axial slices, [0, 1])."""
    from meduet.viz import save_pair_grid

    return save_pair_grid(path, panels, title=title)
