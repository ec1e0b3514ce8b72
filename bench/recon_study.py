#!/usr/bin/env python
"""meduet_recon's study (issue 25): DisINR against per-subject INRs (from scratch, pretrained and fine-tuned whole)
and the classical reconstructions, for MRI, CT and PET, on held-out phantom subjects and the MNI152 brain, with all
or 30% of the training subjects (CPU, demo size).

    .venv/bin/python bench/recon_study.py                       # the whole study (~15 min on 2 busy CPU cores)
    .venv/bin/python bench/recon_study.py --reuse               # again, reusing the cached pretrained models (~7 min)
    .venv/bin/python bench/recon_study.py --report-only         # tables again from results.json (recon_study_report)
    .venv/bin/python bench/recon_study.py --settings mri_x4 --fractions 1.0 --tag explore_x  # one experiment

What is run (every number computed here; nothing typed in):

* settings (``SETTINGS``): ``mri_x4`` / ``mri_x8`` (1D Cartesian, centre fraction 0.08), ``ct_30`` / ``ct_60``
  (parallel-beam views over [0, pi), noise-free), ``pet_1e5`` / ``pet_1e6`` (30 views, Poisson counts in total over
  the volume); the acquisition of the bundle (``meduet.engines.recon.training_acquisition``); training subjects are
  measured with mask seed 0, test subjects with ``--test-mask-seed`` (1: their own Cartesian lines, as simulate.yaml).
* pretraining: once per setting and training fraction, through the bundle's own code (``select_subjects`` of the
  phantoms' ``--train-split``: ``pretraining``, the 72 unlabelled subjects of make demo's sample data,
  ``simulate_training_set``, ``build_inr``, ``ReconTrainer``, Adam at ``--train-lr``, one subject per step) for
  ``--steps`` optimiser steps (epochs = steps / subjects, rounded up, so 30% of the subjects get the same number of
  steps); the single-subject ``model.pt`` (shared pair + the subjects' mean grid) is cached in
  ``<out>/models/<setting>_f<fraction>[_<arch tag>]/`` and reused with ``--reuse``.
* test cases: ``--subjects`` held-out phantom subjects of the test split (subject k at site 0, 4, 1, 5, 2, 3 for
  k = 0, 1, 2, ...: seen and held-out sites alternate; sites 4 and 5 are in no training split) and the MNI152 brain
  (``data/sample/brain``, loaded and resampled to the grid as simulate.yaml does), each measured as in simulate.yaml
  (PET counts with seed 1000 + case).
* methods (``meduet.engines.recon_fit.fit``, the reconstruct workflow's code): ``disinr`` (only the subject grid),
  ``finetune`` (every parameter of the pretrained INR), ``scratch`` (a fresh INR of the same architecture, every
  parameter; it does not depend on the pretraining, so it is run once per case) for ``--iterations`` Adam steps at
  ``--fit-lr`` (DisINR at ``--disinr-lr``: reconstruct.yaml's learning_rate and subject_learning_rate), PSNR/SSIM
  against the clean volume every ``--metric-interval`` steps; ``classical`` (zero-filled / FBP / MLEM 20
  iterations). Seconds = fitting only (metrics excluded), all methods of a case in one process, one after the other;
  ratios to scratch per case.

Outputs in ``--out`` (bench/results/recon_study/): ``<tag>.json`` (every curve, the commands, the budget) and
``<tag>.md`` (the tables; ``bench/recon_study_report.py``). ``--threads`` (1) torch threads: on the shared 2-core
machine one thread per process is much faster than two (oversubscription). Budget defaults (BENCHMARKS.md): a 24^3
grid with the demo preset's network, 840 pretraining steps, 6 subjects + the brain, 100 test-time iterations.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from meduet import records  # noqa: E402
from meduet.data import get_split  # noqa: E402
from meduet.data.measurements import simulate  # noqa: E402
from meduet.engines.recon import (ReconTrainer, build_inr, load_volume, recon_record, select_subjects,  # noqa: E402
                                  simulate_training_set, training_acquisition)
from meduet.engines.recon_fit import fit  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "mri_x4": {"modality": "mri", "acceleration": 4.0},
    "mri_x8": {"modality": "mri", "acceleration": 8.0},
    "ct_30": {"modality": "ct", "num_angles": 30},
    "ct_60": {"modality": "ct", "num_angles": 60},
    "pet_1e5": {"modality": "pet", "num_angles": 30, "total_counts": 1e5},
    "pet_1e6": {"modality": "pet", "num_angles": 30, "total_counts": 1e6},
}
DATALIST = REPO / "data/sample/phantoms/datalist.json"
BRAIN = REPO / "data/sample/brain/images/mni152_t1.nii.gz"
PERCENTILES = (0.5, 99.5)
SITES = 6  # the phantoms' sites; the test split holds every test subject at each of them, subject-major


def acquisition(setting: str, size: int, mask_seed: int):
    s = SETTINGS[setting]
    return training_acquisition(s["modality"], [size] * 3, s.get("acceleration", 4.0), 0.08, s.get("num_angles", 30),
                                s.get("total_counts", 1e6), seed=mask_seed)


def arch_of(args: argparse.Namespace) -> dict[str, Any]:
    """The demo preset's INR (shared grids 4/8/16/32 x 2, decoder 2 x 64; the INR is continuous, so the grids do not
    depend on the image grid ``--size``), with the subject grid ``--subject-resolution``^3 x ``--subject-features``
    (demo: 6^3 x 4, 1.07% of the parameters)."""
    return {"shared_resolutions": [4, 8, 16, 32], "shared_features": 2, "subject_resolution": args.subject_resolution,
            "subject_features": args.subject_features, "hidden": 64, "depth": 2, "chunk_size": 65536}


def pretrain(setting: str, fraction: float, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The pretrained single-subject DisINR of a setting and training fraction (cached; see the module docstring)."""
    tag = f"{setting}_f{fraction:g}" + (f"_{args.model_tag}" if args.model_tag else "")
    folder = Path(args.out) / "models" / tag
    path, info_path = folder / "model.pt", folder / "pretraining.json"
    if args.reuse and path.is_file() and info_path.is_file():
        return records.load(path, expect="inr"), json.loads(info_path.read_text())
    torch.manual_seed(args.seed)
    acq = acquisition(setting, args.size, 0)
    items = select_subjects(get_split(str(DATALIST), args.train_split), fraction, args.seed)
    data = simulate_training_set(items, acq, PERCENTILES, args.seed)
    net = build_inr(arch_of(args), len(items), acq.modality)
    records.with_meta(net, recon_record(acq, items, str(DATALIST), args.train_split, PERCENTILES, fraction, net))
    epochs = max(1, math.ceil(args.steps / len(items)))
    loader = DataLoader(data, batch_size=1, shuffle=True)
    trainer = ReconTrainer("cpu", epochs, loader, net, torch.optim.Adam(net.parameters(), lr=args.train_lr),
                           acq.operator(), acq.modality, acq.image_shape, grad_clip=0.0)
    t0 = time.perf_counter()
    trainer.run()
    info = {"setting": setting, "fraction": fraction, "subjects": len(items), "epochs": epochs,
            "steps": epochs * len(items), "seconds": time.perf_counter() - t0, "train_split": args.train_split,
            "train_lr": args.train_lr, "parameter_counts": net.single_subject().parameter_counts()}
    folder.mkdir(parents=True, exist_ok=True)
    single = net.single_subject()
    torch.save(single.state_dict(), path)
    info_path.write_text(json.dumps(info, indent=1))
    print(f"[pretrain] {tag}: {info['subjects']} subjects, {info['steps']} steps, {info['seconds']:.0f} s", flush=True)
    return single.eval(), info


def test_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``{"name", "path", "site", "seen_site"}`` of the held-out phantoms (and the brain with ``--brain``)."""
    dl = json.loads(DATALIST.read_text())
    held = set(dl.get("heldout_domains", []))
    items = get_split(str(DATALIST), "test")
    order = [0, 4, 1, 5, 2, 3]  # subject k at site order[k mod 6]: seen and held-out sites alternate
    picks = [int(i) for i in args.cases] if args.cases else [SITES * k + order[k % SITES] for k in range(args.subjects)]
    out = [{"name": f"{items[i]['subject']}_{items[i]['domain']}", "path": items[i]["image"],
            "site": items[i]["domain"], "seen_site": items[i]["domain"] not in held} for i in picks]
    if args.brain:
        out.append({"name": "mni152_brain", "path": str(BRAIN), "site": "brain", "seen_site": False})
    return out


def run_case(case: dict[str, Any], index: int, setting: str, models: dict[float, torch.nn.Module],
             args: argparse.Namespace) -> dict[str, Any]:
    """Every method on one case: ``{"classical": row, "scratch": row, "<method>@<fraction>": row}``."""
    acq = acquisition(setting, args.size, args.test_mask_seed)
    truth = load_volume(case["path"], acq.image_shape, PERCENTILES)[None, None]
    measured = simulate(truth, acq, seed=1000 + index)
    op = acq.operator()
    kw = {"truth": truth, "metric_interval": args.metric_interval, "iterations": args.iterations,
          "learning_rate": args.fit_lr, "seed": args.seed}
    rows: dict[str, Any] = {}

    def row(name: str, r) -> None:
        rows[name] = {"metrics": r.metrics, "seconds": r.seconds, "trained_parameters": r.trained_parameters,
                      "total_parameters": r.total_parameters, "final_loss": r.losses[-1] if r.losses else None}

    row("classical", fit(None, measured, op, acq.modality, "classical", acq.image_shape, truth=truth))
    any_net = next(iter(models.values()))
    if "scratch" in args.methods:
        row("scratch", fit(any_net, measured, op, acq.modality, "scratch", acq.image_shape, **kw))
    for fraction, net in models.items():
        for method in ("disinr", "finetune"):
            if method in args.methods and (method == "disinr" or fraction in args.finetune_fractions):
                lr = args.disinr_lr if method == "disinr" and args.disinr_lr else args.fit_lr
                row(f"{method}@{fraction:g}", fit(net, measured, op, acq.modality, method, acq.image_shape,
                                                  **{**kw, "learning_rate": lr}))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench/results/recon_study"))
    p.add_argument("--tag", default="results", help="name of the results JSON / markdown in --out")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.3], help="train_fraction values")
    p.add_argument("--finetune-fractions", nargs="+", type=float, default=[1.0])
    p.add_argument("--methods", nargs="+", default=["disinr", "finetune", "scratch"])
    p.add_argument("--size", type=int, default=24, help="image grid side (demo preset: 32; 24 fits the budget)")
    p.add_argument("--subject-resolution", type=int, default=6)
    p.add_argument("--subject-features", type=int, default=4)
    p.add_argument("--model-tag", default="", help="added to the cached models' folder names (other architectures)")
    p.add_argument("--train-split", default="pretraining",
                   help="pretraining: the 72 unlabelled subjects of make demo's sample data; training: the 14")
    p.add_argument("--steps", type=int, default=840, help="pretraining optimiser steps (one subject each)")
    p.add_argument("--train-lr", type=float, default=1e-2)
    p.add_argument("--iterations", type=int, default=100, help="test-time Adam steps per INR method")
    p.add_argument("--fit-lr", type=float, default=1e-2, help="test-time rate of scratch / finetune (learning_rate)")
    p.add_argument("--disinr-lr", type=float, default=0.1,
                   help="test-time rate of DisINR's subject grid (subject_learning_rate; 0: --fit-lr)")
    p.add_argument("--metric-interval", type=int, default=5)
    p.add_argument("--subjects", type=int, default=6, help="held-out phantom subjects")
    p.add_argument("--cases", nargs="*", default=None, help="test split indices instead of --subjects")
    p.add_argument("--brain", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--test-mask-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse cached pretrained models")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / f"{args.tag}.json"
    from recon_study_report import write_report

    if args.report_only:
        write_report(json.loads(res_path.read_text()), out / f"{args.tag}.md")
        return 0
    t_start = time.perf_counter()
    results: dict[str, Any] = {"command": "python bench/recon_study.py " + " ".join(argv or sys.argv[1:]),
                               "args": vars(args), "machine": platform.platform(), "settings": {}}
    cases = test_cases(args)
    for setting in args.settings:
        models, infos = {}, {}
        for fraction in args.fractions:
            models[fraction], infos[f"{fraction:g}"] = pretrain(setting, fraction, args)
        per_case = {}
        for i, case in enumerate(cases):
            t0 = time.perf_counter()
            per_case[case["name"]] = {**case, "rows": run_case(case, i, setting, models, args)}
            print(f"[fit] {setting} {case['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
            results["settings"][setting] = {"acquisition": acquisition(setting, args.size, args.test_mask_seed)
                                            .to_json(), "pretraining": infos, "cases": per_case}
            res_path.write_text(json.dumps(results, indent=1))  # after every case: a partial run keeps its numbers
        results["wall_seconds"] = time.perf_counter() - t_start
        res_path.write_text(json.dumps(results, indent=1))
    write_report(results, out / f"{args.tag}.md")
    print(f"done in {results['wall_seconds']:.0f} s: {res_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
