"""Tables of bench/recon_study.py's results (markdown): per setting, PSNR/SSIM of each method at equal iteration
counts on the held-out phantoms (mean and 95% bootstrap interval over subjects,
``meduet.metrics.disentanglement.bootstrap_mean_interval``), iterations to reach the target (the per-subject INR from
best PSNR over its run minus 1 dB, per case: the whole INRs overfit PET's Poisson noise, so their last PSNR is not
their best), fitting seconds as ratios to scratch, the brain volume, seen vs held-out
sites, and the data-efficiency rows (pretrained on all vs 30% of the training subjects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meduet.metrics.disentanglement import bootstrap_mean_interval

TARGET_MARGIN_DB = 1.0


def _psnr_at(row: dict[str, Any], it: int) -> float:
    for m in row["metrics"]:
        if m["iteration"] == it:
            return float(m["psnr"])
    return float("nan")


def _iterations_to(row: dict[str, Any], target: float) -> float:
    for m in row["metrics"]:
        if m["iteration"] > 0 and m["psnr"] >= target:
            return float(m["iteration"])
    return float("inf")


def _ci(values: list[float], nd: int = 1) -> str:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{nd}f}"
    lo, hi = bootstrap_mean_interval(v)
    return f"{np.mean(v):.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def _label(name: str) -> str:
    if "@" not in name:
        return name
    method, fraction = name.split("@")
    return f"{method} ({float(fraction):.0%} of the training subjects)"


def setting_table(setting: str, res: dict[str, Any], iterations: int) -> list[str]:
    cases = [c for c in res["cases"].values() if c["site"] != "brain"]
    brain = [c for c in res["cases"].values() if c["site"] == "brain"]
    checkpoints = [i for i in (10, 25, 50, 100, iterations) if i <= iterations]
    checkpoints = sorted(set(checkpoints))
    methods = [m for m in cases[0]["rows"] if m != "classical"] if cases else []
    pre = res["pretraining"]
    lines = [f"#### {setting} ({len(cases)} held-out phantom subjects; pretraining: " + ", ".join(
        f"{float(f):.0%} = {p['subjects']} subjects, {p['steps']} steps, {p['seconds']:.0f} s" for f, p in pre.items())
        + ")\n",
        "| method | parameters fitted | " + " | ".join(f"PSNR @ {i}" for i in checkpoints)
        + f" | best PSNR | SSIM @ {iterations} | iterations to target (median; reached) | seconds / scratch |",
        "|---|---|" + "---|" * (len(checkpoints) + 4)]
    targets = [max(m["psnr"] for m in c["rows"]["scratch"]["metrics"]) - TARGET_MARGIN_DB if "scratch" in c["rows"]
               else np.nan for c in cases]
    for m in methods:
        psnr = [_ci([_psnr_at(c["rows"][m], i) for c in cases]) for i in checkpoints]
        psnr.append(_ci([max(x["psnr"] for x in c["rows"][m]["metrics"]) for c in cases]))
        ssim = _ci([c["rows"][m]["metrics"][-1]["ssim"] for c in cases], 3)
        reach = [_iterations_to(c["rows"][m], t) for c, t in zip(cases, targets)]
        done = [r for r in reach if np.isfinite(r)]
        med = f"{np.median(reach):.0f}" if len(done) * 2 > len(reach) else f"> {iterations}"
        ratio = _ci([c["rows"][m]["seconds"] / c["rows"]["scratch"]["seconds"] for c in cases], 2) if (
            "scratch" in cases[0]["rows"]) else "-"
        lines.append(f"| {_label(m)} | {cases[0]['rows'][m]['trained_parameters']:,} | " + " | ".join(psnr)
                     + f" | {ssim} | {med} ({len(done)}/{len(reach)}) | {ratio} |")
    cl = _ci([c["rows"]["classical"]["metrics"][-1]["psnr"] for c in cases])
    cls = _ci([c["rows"]["classical"]["metrics"][-1]["ssim"] for c in cases], 3)
    name = {"mri": "zero-filled", "ct": "FBP", "pet": "MLEM (20 iterations)"}[res["acquisition"]["modality"]]
    lines.append(f"| {name} | 0 | " + " | ".join([cl] * (len(checkpoints) + 1)) + f" | {cls} | - | - |")
    if brain:
        b = brain[0]["rows"]
        lines.append("\nMNI152 brain (one volume): PSNR @ " + f"{iterations} / SSIM: " + "; ".join(
            f"{_label(m)} {r['metrics'][-1]['psnr']:.1f} / {r['metrics'][-1]['ssim']:.3f}" for m, r in b.items()))
    seen = [c for c in cases if c["seen_site"]]
    unseen = [c for c in cases if not c["seen_site"]]
    if seen and unseen and "disinr@1" in methods and "scratch" in methods:
        def gap(group):
            return _ci([_psnr_at(c["rows"]["disinr@1"], iterations) - _psnr_at(c["rows"]["scratch"], iterations)
                        for c in group])
        lines.append(f"\nDisINR minus scratch at {iterations} iterations (dB): seen sites ({len(seen)}) {gap(seen)}; "
                     f"held-out sites ({len(unseen)}) {gap(unseen)}.")
    return lines + [""]


def write_report(results: dict[str, Any], path: Path) -> str:
    args = results["args"]
    it = int(args["iterations"])
    lines = [f"Command: `{results['command']}` ({results.get('wall_seconds', 0) / 60:.1f} min on "
             f"{results['machine']}, {args['threads']} thread(s)). Grid {args['size']}^3; subject grid "
             f"{args['subject_resolution']}^3 x {args['subject_features']}; test-time Adam at {args['fit_lr']}"
             + (f" (DisINR {args['disinr_lr']})" if args.get("disinr_lr") else "")
             + f", {it} iterations; PSNR/SSIM against the clean volume (mean [95% bootstrap interval] over subjects); "
             f"target = the best PSNR of scratch over its {it} iterations minus {TARGET_MARGIN_DB:g} dB, per subject; "
             "best PSNR = the highest over the run (it needs the truth to pick: an oracle, not a method).\n"]
    for setting, res in results["settings"].items():
        lines += setting_table(setting, res, it)
    text = "\n".join(lines)
    path.write_text(text)
    return text
