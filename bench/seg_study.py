"""Label-efficiency and domain-generalisation study of meduet_seg.

    python bench/seg_study.py [--preset demo] [--inits scratch,mae,meduet,unet] [--fractions 1.0,0.25,0.1]

For every initialisation x label fraction, trains meduet_seg with `python -m monai.bundle run training` on the
sample phantoms' training split (sites seen by the VAE and the encoder) and evaluates Dice on the test split,
separately for sites seen in training and sites never seen (the datalist's held-out sites). Needs the upstream
checkpoints (`make demo` first: meduet_vae, meduet_pretrain incl. its masked-autoencoder baseline).

Every run gets about the same number of optimiser steps (epochs scaled by the inverse of the iterations per epoch;
``--same-epochs`` keeps the preset's epochs instead); validation during training is off (the test split is the
measurement). Writes bench/results/seg_study.json (every number, the commands) and bench/results/seg_study.png, and prints a
markdown table for BENCHMARKS.md. Everything is computed; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "tools"))

from demo import bundle_cmd  # noqa: E402


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"])
    p.add_argument("--inits", default="scratch,mae,meduet,unet")
    p.add_argument("--fractions", default="1.0,0.25,0.1")
    p.add_argument("--max_epochs", type=int, default=None, help="override the preset's epochs (at fraction 1.0)")
    p.add_argument("--same-epochs", action="store_true",
                   help="same epochs at every fraction (default: epochs scaled so every run takes ~the same steps)")
    p.add_argument("--work", default="bench/results/seg_study", help="bundle roots of the runs")
    p.add_argument("--out", default="bench/results/seg_study.json")
    args = p.parse_args(argv)
    work, out = REPO / args.work, REPO / args.out
    import math

    import yaml

    preset = yaml.safe_load((REPO / f"bundles/meduet_seg/configs/presets/{args.preset}.yaml").read_text())
    base_epochs = args.max_epochs or int(preset["max_epochs"])
    batch = int(preset["batch_size"])
    datalist = json.loads((REPO / "data/sample/phantoms/datalist.json").read_text())
    n_labelled = len([it for it in datalist["training"] if it.get("label")])

    def epochs_for(frac: float) -> int:
        if args.same_epochs:
            return base_epochs
        full, part = math.ceil(n_labelled / batch), math.ceil(max(1, math.ceil(frac * n_labelled)) / batch)
        return math.ceil(base_epochs * full / part)

    rows = []
    for init in args.inits.split(","):
        for frac in (float(f) for f in args.fractions.split(",")):
            root = work / f"{init}_{frac:g}"
            train = bundle_cmd("meduet_seg", "train", args.preset, "training", resume=False, init=init,
                               label_fraction=frac, bundle_root=str(root), siblings="bundles",
                               max_epochs=epochs_for(frac),
                               val_interval=10**6)
            evaluate = bundle_cmd("meduet_seg", "evaluate", args.preset, bundle_root=str(root),
                                  output_dir=str(root / "eval"), save_images=0)
            print(f"== {init} label_fraction={frac:g}", flush=True)
            t_train = _run(train)
            _run(evaluate)
            m = json.loads((root / "eval" / "metrics.json").read_text())
            rows.append({
                "init": init, "label_fraction": frac, "training_cases": None, "train_seconds": round(t_train, 1),
                "max_epochs": epochs_for(frac),
                "dice_seen": m["seen_sites"].get("mean_dice"), "dice_unseen": m["unseen_sites"].get("mean_dice"),
                "hd95_seen": m["seen_sites"].get("mean_hd95"), "hd95_unseen": m["unseen_sites"].get("mean_hd95"),
                "dice_per_class_unseen": m["unseen_sites"].get("dice"), "command": " ".join(train),
            })
            from meduet import records

            rows[-1]["training_cases"] = records.load(root / "models" / "model.pt", expect="meduet_seg").meta.get("training_cases")
            print(f"   Dice seen {rows[-1]['dice_seen']:.3f} unseen {rows[-1]['dice_unseen']:.3f} "
                  f"({rows[-1]['training_cases']} labelled cases, {t_train:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "command": "python bench/seg_study.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "rows": rows}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "dice_seen", "sites seen in training"),
                           (axes[1], "dice_unseen", "sites never seen")):
        for init in args.inits.split(","):
            pts = sorted((r["label_fraction"], r[key]) for r in rows if r["init"] == init)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=init)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("mean foreground Dice")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"meduet_seg at preset {args.preset}: initialisation x label fraction")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)

    print(f"\ncommand: python bench/seg_study.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("\n| init | label fraction | labelled cases | Dice seen sites | Dice unseen sites | HD95 unseen (mm) |"
          " train s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        hd = r["hd95_unseen"]
        print(f"| {r['init']} | {r['label_fraction']:g} | {r['training_cases']} | {r['dice_seen']:.3f} | "
              f"{r['dice_unseen']:.3f} | {hd:.1f} | {r['train_seconds']:.0f} |" if hd is not None else
              f"| {r['init']} | {r['label_fraction']:g} | {r['training_cases']} | {r['dice_seen']:.3f} | "
              f"{r['dice_unseen']:.3f} | - | {r['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
