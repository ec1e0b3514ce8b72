"""The quick-start demo's reconstruction stage (meduet_recon, DisINR; tools/demo.py runs it as ``recon``).

``stage_recon``: pretrain meduet_recon (MRI x4 on a 24^3 grid with the preset's network, on the phantoms' 72
unlabelled subjects of the split ``pretraining``, from their k-space only) for ``EPOCHS`` epochs, write one held-out
subject's measurement file (simulate.yaml: test item 0, its own Cartesian lines), reconstruct it with DisINR (only
the subject grid fitted), a per-subject INR from scratch (every parameter) and zero-filling (reconstruct.yaml,
``ITERATIONS`` Adam steps each), and leave a picture (zero-filled | DisINR | scratch | truth, mid-slices, and the
PSNR curves of both INRs) and the report lines with the numbers. Each step is a ``python -m monai.bundle run``
command, as users run them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["stage_recon", "recon_figure", "EPOCHS", "ITERATIONS", "IMAGE_SIZE"]

#: pretraining epochs of the sample data's 72 unlabelled subjects (split ``pretraining``, made by the demo's sample
#: stage): 12 x 72 = 864 steps on a 24^3 grid, the pretraining of BENCHMARKS.md's study (a 32^3 step costs ~2.3x
#: more, and 4 epochs at 32^3 left DisINR 8 dB under scratch at 100 iterations)
EPOCHS = 12
IMAGE_SIZE = [24, 24, 24]
TRAIN_SPLIT = "pretraining"
#: test-time Adam steps per INR method
ITERATIONS = 100
METHODS = ("classical", "disinr", "scratch")
REPO = Path(__file__).resolve().parents[1]


def _image(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def recon_figure(rec: Path, truth: Path, reports: dict[str, dict], path: Path) -> Path:
    """zero-filled | DisINR | scratch | truth (mid axial and coronal slices) and the PSNR curves of the INRs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"classical": "zero-filled", "disinr": "DisINR", "scratch": "INR from scratch"}
    vols = [(f"{names[m]}\n{reports[m]['final_psnr']:.1f} dB", _image(rec / f"sample_mri_{m}.nii.gz")) for m in METHODS]
    vols.append(("truth", _image(truth)))
    fig = plt.figure(figsize=(12, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 1, 1.6])
    for c, (title, v) in enumerate(vols):
        for r, sl in enumerate((v[:, :, v.shape[2] // 2].T, v[:, v.shape[1] // 2, :].T)):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=9)
    ax = fig.add_subplot(grid[:, 4])
    for m in ("disinr", "scratch"):
        rows = reports[m]["metrics"]
        ax.plot([x["iteration"] for x in rows], [x["psnr"] for x in rows], marker=".", label=names[m])
    ax.axhline(reports["classical"]["final_psnr"], color="gray", ls="--", label="zero-filled")
    ax.set(xlabel="test-time iteration", ylabel="PSNR (dB)", title="convergence")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _psnr_at(report: dict, it: int) -> float | None:
    return next((m["psnr"] for m in report["metrics"] if m["iteration"] == it), None)


def _reading(dis: dict, scr: dict) -> str:
    """Which INR leads, and from which iteration the other takes over (from the two reports' PSNR rows)."""
    pairs = [(a["iteration"], a["psnr"] - b["psnr"]) for a, b in zip(dis["metrics"], scr["metrics"])]
    ahead = [it for it, gap in pairs if gap > 0]
    if not ahead:
        return "The INR from scratch leads DisINR at every iteration measured here."
    if len(ahead) == len(pairs):
        return (f"DisINR leads the INR from scratch at every iteration measured here ({pairs[-1][1]:+.1f} dB at "
                f"{pairs[-1][0]}).")
    behind = next(it for it, gap in pairs if gap <= 0)
    return (f"DisINR leads the INR from scratch up to iteration {max(ahead)} and is behind from iteration {behind} "
            f"({pairs[-1][1]:+.1f} dB at {pairs[-1][0]}): its fitted subject grid carries too little of a new "
            "subject's anatomy at this size.")


def stage_recon(d: Any, bundle_cmd: Any) -> None:
    """Pretrain, simulate one held-out measurement, reconstruct it three ways; appends the report section."""
    out = d.out / "recon"
    meas, rec = out / "measurements", out / "reconstruct"
    d.run("meduet_recon: DisINR pretraining on 72 phantoms' k-space (MRI x4; no clean image in the loss)",
          bundle_cmd("meduet_recon", "train", d.preset, "training", resume=False, max_epochs=EPOCHS,
                     train_split=TRAIN_SPLIT, image_size=IMAGE_SIZE))
    d.run("meduet_recon: a held-out subject's k-space file (test item 0, its own Cartesian lines)",
          bundle_cmd("meduet_recon", "simulate", d.preset, output_dir=str(meas), image_size=IMAGE_SIZE))
    truth = meas / "sample_mri_truth.nii.gz"
    for method in METHODS:
        d.run(f"meduet_recon: reconstruct it ({method})",
              bundle_cmd("meduet_recon", "reconstruct", d.preset, method=method, iterations=ITERATIONS,
                         measurement=str(meas / "sample_mri.npy"),
                         acquisition=str(meas / "sample_mri_acquisition.json"), truth=str(truth),
                         output_dir=str(rec)))
    reports = {m: json.loads((rec / f"sample_mri_{m}.json").read_text()) for m in METHODS}
    pic = recon_figure(rec, truth, reports, out / "recon.png")
    dis, scr, zf = reports["disinr"], reports["scratch"], reports["classical"]
    measured = {m["iteration"] for m in dis["metrics"]} & {m["iteration"] for m in scr["metrics"]}
    its = sorted(i for i in {10, 20, 50, ITERATIONS} if i in measured)
    lines = ["## Stage 5 — meduet_recon (DisINR: reconstruction from raw k-space with a pretrained prior)\n",
             f"Pretrained {EPOCHS} epochs on the undersampled k-space of the sample data's `{TRAIN_SPLIT}` subjects "
             f"(MRI x4, 1D Cartesian, {IMAGE_SIZE[0]}^3 grid; the loss sees measurements only), then a held-out "
             "subject (test item 0, its own lines) reconstructed by "
             f"reconstruct.yaml, {ITERATIONS} Adam steps per INR method (PSNR/SSIM against the clean volume):\n",
             "| method | parameters fitted | " + " | ".join(f"PSNR @ {i}" for i in its) + " | SSIM | seconds |",
             "|---|---|" + "---|" * (len(its) + 2)]
    for name, r in (("DisINR (shared pair frozen)", dis), ("INR from scratch", scr)):
        lines.append(f"| {name} | {r['trained_parameters']:,} of {r['total_parameters']:,} | "
                     + " | ".join(f"{_psnr_at(r, i):.1f}" for i in its)
                     + f" | {r['final_ssim']:.3f} | {r['seconds']:.1f} |")
    lines.append("| zero-filled | 0 | " + " | ".join(f"{zf['final_psnr']:.1f}" for _ in its)
                 + f" | {zf['final_ssim']:.3f} | {zf['seconds']:.2f} |")
    lines += [f"\n![zero-filled | DisINR | scratch | truth, and PSNR per iteration]({d.rel(pic)})\n",
              _reading(dis, scr) + " This is one subject: BENCHMARKS.md (\"meduet_recon: DisINR vs per-subject "
              "INRs\") has the study over six subjects with intervals, MRI x8, CT, PET, the brain volume and 30% of "
              "the training subjects.\n"]
    d.sections.append("\n".join(lines))
