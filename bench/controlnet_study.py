#!/usr/bin/env python
"""meduet_diffusion's ControlNet study (issue 24): undersampled MRI and sparse-view CT reconstruction against
baselines, and label-conditioned synthesis as augmentation for meduet_seg (CPU, demo size).

    .venv/bin/python bench/controlnet_study.py --seg-epochs 16             # everything, demo preset
    .venv/bin/python bench/controlnet_study.py --settings mri_x4 --skip-seg  # one setting (the timing run)
    .venv/bin/python bench/controlnet_study.py --reuse --write-md            # tables again from finished runs

Needs the demo chain in ``bundles/`` (``make demo``: meduet_vae + its latent cache, meduet_pretrain,
meduet_diffusion's ``models/model.pt`` and ``factor_prior.pt``); nothing there is written. Every run goes under
``--out`` (default bench/results/controlnet_study/): the ControlNets' bundle root ``meduet_diffusion/`` (its
``base_ckpt`` key points at bundles/meduet_diffusion/models/model.pt, ``siblings`` at bundles/), the segmentation
runs' bundle roots ``seg_real/`` and ``seg_real_synth/``, per setting ``<setting>/`` (inference outputs) and
``<setting>.png`` (degraded | UNet | ControlNet | truth, middle axial slices), ``results.json`` (every number, the
commands, the budget) and ``section.md`` (the BENCHMARKS.md tables; ``--write-md`` puts them into BENCHMARKS.md).

1. Reconstruction, per setting (``mri_x4``, ``mri_x8``: Cartesian 1d, centre fraction 0.08; ``ct_60``, ``ct_30``:
   parallel-beam views over [0, pi), FBP per axial slice): a ControlNet trained with ``python -m monai.bundle run
   training`` on train.yaml + controlnet_train.yaml + the preset (``--cn-epochs``; validation off) on the frozen
   demo generator; then on the study's test volumes (``--per-subject``: each test subject once at a seen site and
   once at a held-out site, measured as in training by controlnet_infer's ``simulate_from``; the clean scan is the
   truth), PSNR and SSIM (``meduet.metrics.reconstruction``, images in the preprocessed range [0, 1], data range
   1.0, whole volume on the scan's grid) of: (a) the degraded input; (b) the generator without the control: the same
   ControlNet file with its zero-initialised injections reset to zero (``initialize_weights``: exactly the base's
   prediction), sampled by the same workflow with the same factors (``factors_from control``: the frozen encoder's
   factors of the degraded scan), seed and sampler; (c) the ControlNet (controlnet_infer.yaml's workflow,
   ``meduet.workflows.diffusion.controlnet.run``) and (c') its output after the workflow's data consistency
   (``meduet.engines.consistency.DataConsistency``, 5 projected gradient steps, what ``--data_consistency True``
   does after sampling); (d) a MONAI ``UNet`` (3D, channels 16/32/64/128, one residual unit: ~0.6 M parameters vs
   the control branch's ~0.65 M) predicting the clean image as input + gate x UNet(input) (gate a learnable
   scalar starting at 0: it starts at the input), trained on the same training pairs (the training split's clean
   scans degraded with the same per-scan masks) for the ControlNet's number of optimiser steps, Adam lr 1e-3,
   batch 4, random 32^3 crops and flips, seed 0 (``controlnet_study_baselines``); (e) the VAE ceiling (the clean
   scan encoded and decoded by meduet_vae's patch encoding). Means with 95% subject-bootstrap intervals
   (``controlnet_study_report``), seen vs unseen sites.
2. Label-conditioned synthesis: the ``label`` ControlNet (same budget); one volume per training label map (the
   training scans' label maps preprocessed as the latent cache's, on that grid and affine; the factor prior of the
   scan's own site, seed = its index), written as NIfTI with a datalist listing the real training items and the
   synthetic ones (``--datalist`` of meduet_seg's train.yaml: no config change needed); meduet_seg trained at the
   preset on real only and on real + synthetic with the same number of optimiser steps (epochs scaled by the
   inverse of the iterations per epoch) and seed, evaluated by its evaluate.yaml on the real test split: Dice per
   organ, seen and unseen sites, intervals and the paired difference.

Threads: ``--threads`` (2) for this process and the child runs. Everything is computed; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlnet_study_report import recon_summary, recon_table, seg_table  # noqa: E402
from demo import bundle_cmd  # noqa: E402

BUNDLES = REPO / "bundles"
LATENTS = BUNDLES / "meduet_vae/latents/phantoms/datalist.json"
VAE = BUNDLES / "meduet_vae/models/model.pt"
PRETRAIN = BUNDLES / "meduet_pretrain/models/model.pt"
BASE = BUNDLES / "meduet_diffusion/models/model.pt"
PRIOR = BUNDLES / "meduet_diffusion/models/factor_prior.pt"
SETTINGS = {"mri_x4": {"control_task": "mri", "acceleration": 4},
            "mri_x8": {"control_task": "mri", "acceleration": 8},
            "ct_60": {"control_task": "ct", "views": 60},
            "ct_30": {"control_task": "ct", "views": 30}}
TITLE = "## meduet_diffusion: ControlNet for undersampled MRI, sparse-view CT and label synthesis"


def rel(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_child(cmd: list[str], threads: int, log: Path) -> float:
    """Run a bundle command from the repository root (its output to ``log``); seconds taken."""
    t0 = time.perf_counter()
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def _trained_epochs(ckpt: Path) -> int | None:
    from meduet import records

    return (records.read(ckpt)[1].get("training") or {}).get("epoch")


def train_controlnet(name: str, task: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """controlnet_train.yaml on the demo generator -> ``<out>/meduet_diffusion/models/controlnet/<name>/model.pt``."""
    root = out / "meduet_diffusion"
    ckpt_dir = root / "models" / "controlnet" / name
    cmd = bundle_cmd("meduet_diffusion", "train", args.preset, "training", extra=("controlnet_train",), **task,
                     bundle_root=str(root), siblings=str(BUNDLES), base_ckpt=str(BASE), ckpt_dir=str(ckpt_dir),
                     output_dir=str(root / "runs" / "controlnet" / name), resume=False, max_epochs=args.cn_epochs,
                     val_interval=10**6)
    ckpt = ckpt_dir / "model.pt"
    seconds = None
    if not (args.reuse and ckpt.is_file() and _trained_epochs(ckpt) == args.cn_epochs):
        print(f"== ControlNet {name}: training ({args.cn_epochs} epochs)", flush=True)
        seconds = round(run_child(cmd, args.threads, out / "logs" / f"controlnet_{name}.log"), 1)
    return {"ckpt": str(ckpt), "command": " ".join(cmd), "train_seconds": seconds}


def study_datalist(out: Path, per_subject: int, subjects: int | None = None, tag: str = ""
                   ) -> tuple[Path, list[dict[str, Any]]]:
    """A copy of the latent datalist (absolute paths) with split ``study_test``: each test subject (the first
    ``subjects`` by name; None: all) at ``per_subject`` sites, alternating seen (cycled over the training sites) and
    held-out ones."""
    data = json.loads(LATENTS.read_text())
    base = LATENTS.parent
    for split, items in data.items():
        if isinstance(items, list) and items and isinstance(items[0], dict):
            for it in items:
                for k in ("latent", "image", "label"):
                    if it.get(k):
                        it[k] = str((base / it[k]).resolve())
                if it.get("latent_aug"):
                    it["latent_aug"] = [str((base / p).resolve()) for p in it["latent_aug"]]
    held = set(data.get("heldout_domains") or [])
    seen_sites = [d for d in data["domains"] if d not in held]
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for it in data["test"]:
        by_subject.setdefault(it["subject"], []).append(it)
    chosen = []
    for j, (subject, items) in enumerate(sorted(by_subject.items())[:subjects]):
        seen = [it for it in items if it["domain"] not in held]
        unseen = [it for it in items if it["domain"] in held]
        seen.sort(key=lambda it: (seen_sites.index(it["domain"]) - j) % len(seen_sites))
        unseen.sort(key=lambda it: (sorted(held).index(it["domain"]) - j) % max(1, len(held)))
        picks = [x for pair in zip(seen, unseen) for x in pair] if per_subject > 1 else seen
        chosen += picks[:per_subject]
    data["study_test"] = chosen
    path = out / f"study_datalist{tag}.json"
    from meduet.io import write_json

    write_json(path, data)
    return path, chosen


def recon_setting(name: str, task_kw: dict[str, Any], cn: dict[str, Any], args: argparse.Namespace, out: Path,
                  datalist: Path) -> dict[str, Any]:
    """Rows (a)-(e) for one setting (see the module docstring)."""
    import torch

    from meduet import records
    from meduet.data.controls import ControlTask
    from meduet.engines.checkpoint import atomic_save
    from meduet.engines.consistency import DataConsistency
    from meduet.workflows.diffusion import controlnet as wf
    from meduet.workflows.diffusion.controlnet_inputs import read_truth, simulated_cases
    from meduet.metrics.reconstruction import reconstruction_metrics
    from controlnet_study_baselines import train_unet, unet_predict, vae_roundtrip
    from controlnet_study_report import recon_picture

    task = ControlTask(task_kw["control_task"], acceleration=task_kw.get("acceleration", 4),
                       views=task_kw.get("views", 60))
    sdir = out / name
    # (b): the trained file with the control injections reset to zero = the base generator's prediction
    net = records.load(cn["ckpt"], expect="controlnet")
    net.initialize_weights()
    base_ckpt = sdir / "without_control" / "model.pt"
    base_ckpt.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(net.state_dict(), base_ckpt)
    common = dict(vae_ckpt=str(VAE), latent_datalist=str(datalist), simulate_from="study_test", max_cases=10**6,
                  pretrain_ckpt=str(PRETRAIN), prior_ckpt=str(PRIOR), factors_from="control", seed=0,
                  num_steps=args.num_steps, device="cpu")
    t0 = time.perf_counter()
    res_cn = wf.run(wf.Config(controlnet_ckpt=cn["ckpt"], output_dir=str(sdir / "controlnet"), **common))
    t_cn = time.perf_counter() - t0
    res_base = wf.run(wf.Config(controlnet_ckpt=str(base_ckpt), output_dir=str(sdir / "without_control"), **common))
    cases = simulated_cases(str(datalist), "study_test", 10**6, task, str(VAE), sdir / "cases")
    t0 = time.perf_counter()
    unet, unet_info = train_unet(task, str(LATENTS), steps=cn["steps"], seed=0, threads=args.threads)
    t_unet = time.perf_counter() - t0
    vae = records.load(str(VAE), expect="vae").eval()
    prep = json.loads(LATENTS.read_text()).get("preprocessing") or {}
    held = set(json.loads(LATENTS.read_text()).get("heldout_domains") or [])

    def metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
        m = reconstruction_metrics(pred.reshape(1, 1, *pred.shape[-3:]).float(), truth.reshape(1, 1, *truth.shape[-3:]),
                                   data_range=1.0)
        return {"psnr": m["psnr"], "ssim": m["ssim"]}

    rows, panels = [], []
    by_name = {c["name"]: c for c in res_cn["cases"]}
    by_name_base = {c["name"]: c for c in res_base["cases"]}
    for case in cases:
        row_cn, row_base = by_name[case.name], by_name_base[case.name]
        output = read_truth(str(sdir / "controlnet" / row_cn["files"]["output"]), case.shape, prep)
        dc = DataConsistency(case.measurement, 5)(output[None, None])[0, 0]
        unet_out = unet_predict(unet, case.control_image)[0, 0]
        vae_out = vae_roundtrip(vae, str(LATENTS), case.truth)
        m = {"input": metrics(case.control_image, case.truth), "base": row_base["metrics"]["output"],
             "controlnet": row_cn["metrics"]["output"], "controlnet_dc": metrics(dc, case.truth),
             "unet": metrics(unet_out, case.truth), "vae": metrics(vae_out, case.truth)}
        if abs(m["input"]["psnr"] - row_cn["metrics"]["input"]["psnr"]) > 1e-3:
            raise SystemExit(f"{name} {case.name}: the recomputed degraded input differs from the workflow's")
        rows.append({"name": case.name, "domain": case.domain, "seen": case.domain not in held,
                     "subject": case.name.split("_")[0], "metrics": m,
                     "residual": {"controlnet": DataConsistency(case.measurement).residual(output[None, None]),
                                  "controlnet_dc": DataConsistency(case.measurement).residual(dc[None, None])}})
        if len(panels) < 3:
            z = case.shape[2] // 2
            panels.append([(f"{case.name}: {wf._caption(case)}", case.control_image[0, 0, :, :, z].numpy()),
                           ("UNet", unet_out[:, :, z].numpy()), ("ControlNet", output[:, :, z].numpy()),
                           ("truth", case.truth[:, :, z].numpy())])
    picture = recon_picture(out / f"{name}.png", panels, f"{name}: degraded | UNet | ControlNet | truth "
                            f"(ControlNet {cn['steps']} steps, {res_cn['sampler']} {res_cn['num_steps']} steps)")
    return {"cases": rows, "summary": recon_summary(rows), "picture": rel(picture),
            "sampler": res_cn["sampler"], "sampling_steps": res_cn["num_steps"], "guidance": res_cn["guidance_scale"],
            "controlnet_sampling_seconds": round(t_cn, 1), "unet_train_seconds": round(t_unet, 1), "unet": unet_info,
            "control_parameters": sum(p.numel() for p in net.control_parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"])
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {','.join(SETTINGS)}")
    p.add_argument("--cn-epochs", type=int, default=40, help="ControlNet epochs (the demo preset's 40)")
    p.add_argument("--per-subject", type=int, default=2, help="test volumes per subject (seen, unseen, ...)")
    p.add_argument("--subjects", type=int, default=None, help="first test subjects (default: all 6)")
    p.add_argument("--tag", default="", help="suffix of results<tag>.json / section<tag>.md (parts run apart)")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (null: the workflow's default)")
    p.add_argument("--seg-epochs", type=int, default=None, help="meduet_seg epochs of the real-only run "
                   "(default: the preset's); the real + synthetic run gets the same optimiser steps (exactly when "
                   "they divide)")
    p.add_argument("--skip-seg", action="store_true", help="reconstruction only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep trained ControlNets / seg models found under --out")
    p.add_argument("--write-md", action="store_true", help="put section.md into BENCHMARKS.md")
    p.add_argument("--out", default="bench/results/controlnet_study")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ["MEDUET_PROGRESS"] = "0"
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    import yaml

    preset = yaml.safe_load((REPO / f"bundles/meduet_diffusion/configs/presets/{args.preset}.yaml").read_text())
    n_train = len(json.loads(LATENTS.read_text())["training"])
    steps = args.cn_epochs * math.ceil(n_train / int(preset["batch_size"]))
    datalist, chosen = study_datalist(out, args.per_subject, args.subjects, args.tag)
    from meduet.io import write_json

    command = "python bench/controlnet_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command, "preset": args.preset, "controlnet_epochs": args.cn_epochs,
                               "controlnet_steps": steps, "controlnet_batch": int(preset["batch_size"]),
                               "controlnet_crop": preset["crop_size"], "training_volumes": n_train,
                               "study_test": [Path(it["latent"]).name for it in chosen], "settings": {}}
    for name in [s for s in args.settings.split(",") if s]:
        t0 = time.perf_counter()
        cn = {**train_controlnet(name, SETTINGS[name], args, out), "steps": steps}
        res = recon_setting(name, SETTINGS[name], cn, args, out, datalist)
        results["settings"][name] = {**cn, **res, "seconds": round(time.perf_counter() - t0, 1)}
        write_json(out / f"results{args.tag}.json", {**results, "partial": True})  # a stopped study keeps its part
        s = res["summary"]["all"]
        print(f"   {name}: PSNR input {s['input']['psnr'][0]:.2f}, without control {s['base']['psnr'][0]:.2f}, "
              f"ControlNet {s['controlnet']['psnr'][0]:.2f} (+DC {s['controlnet_dc']['psnr'][0]:.2f}), "
              f"UNet {s['unet']['psnr'][0]:.2f}, VAE {s['vae']['psnr'][0]:.2f} dB", flush=True)
    if not args.skip_seg:
        from controlnet_study_seg import label_study

        results["label"] = label_study(args, out, steps, train_controlnet)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / f"results{args.tag}.json", results)
    section = render(results)
    (out / f"section{args.tag}.md").write_text(section)
    print("\n" + section)
    if args.write_md:
        from _common import replace_section

        replace_section(REPO / "BENCHMARKS.md", TITLE, section)
    return 0


def render(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of a finished study (the reading is written by hand after them)."""
    r = results
    lines = [TITLE, "", "```bash", f".venv/bin/python {r['command'].removeprefix('python ')}", "```", "",
             f"Budget: preset {r['preset']}; each ControlNet {r['controlnet_epochs']} epochs = {r['controlnet_steps']}"
             f" optimiser steps (batch {r['controlnet_batch']}, latent crops {r['controlnet_crop']}, "
             f"{r['training_volumes']} training volumes); whole study {r['total_seconds'] / 60:.1f} min on this "
             "machine (2 threads, shared)."]
    if r["settings"]:
        any_set = next(iter(r["settings"].values()))
        lines += ["", f"Reconstruction: {len(r['study_test'])} test volumes ({', '.join(r['study_test'])}); "
                  f"sampler {any_set['sampler']} {any_set['sampling_steps']} steps, guidance {any_set['guidance']}; "
                  f"control branch {any_set['control_parameters'] / 1e6:.3f} M parameters, UNet "
                  f"{any_set['unet']['parameters'] / 1e6:.3f} M. PSNR / SSIM against the clean volume in the "
                  "preprocessed range [0, 1] (data range 1.0); mean [95% subject-bootstrap interval].", "",
                  recon_table(r["settings"]), "",
                  "Pictures: " + ", ".join(f"`{s['picture']}`" for s in r["settings"].values()) + "."]
    if r.get("label"):
        lab = r["label"]
        lines += ["", f"Label synthesis as augmentation: {lab['synthetic']} synthetic volumes (one per training label "
                  f"map); meduet_seg {lab['preset']} preset, real only {lab['epochs_real']} epochs vs real + synthetic "
                  f"{lab['epochs_real_synth']} epochs = {lab['steps']} / {lab['steps_real_synth']} optimiser steps, "
                  "seed 0; Dice on the real test split, mean [95% subject-bootstrap interval]; difference = real + "
                  "synthetic - real, paired per volume.", "", seg_table(lab["summary"], lab["classes"]), "",
                  f"Synthetic examples: `{lab['picture']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
