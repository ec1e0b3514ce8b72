"""Part 2 of bench/controlnet_study.py: label-conditioned synthesis as augmentation for meduet_seg.

The ``label`` ControlNet draws one volume per training label map; a datalist lists the real training items and the
synthetic ones (image = the synthetic NIfTI in HU, label = the label map it was drawn for, domain = the site whose
factor prior styled it); meduet_seg is trained on real only and on real + synthetic with the same number of
optimiser steps and seed, and evaluated on the real test split (seen and held-out sites).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["synthesise", "mixed_datalist", "label_study"]

REPO = Path(__file__).resolve().parents[1]
SEG_DATALIST = REPO / "data/sample/phantoms/datalist.json"


def synthesise(ckpt: str, out: Path, paths: dict[str, Path], seed0: int = 0) -> tuple[list[dict[str, Any]], list]:
    """One volume per training label map of the latent datalist (preprocessed as its images: the label on that
    grid and affine) -> ``[{"image", "label", "domain", "subject", "source", <the source item's other keys>}]`` and
    picture panels."""
    import nibabel as nib
    import torch

    from meduet.data.controls import ControlTask
    from meduet.engines.controlnet import ControlCache
    from meduet.workflows.diffusion import controlnet as wf
    from meduet.workflows.diffusion.controlnet_inputs import read_truth

    cache = ControlCache(str(paths["latents"]), ControlTask("label"), str(out / "cache"))
    prep = cache.datalist.data.get("preprocessing") or {}
    items, panels = [], []
    for i, item in enumerate(cache.datalist.items("training")):
        name = Path(item["latent"]).name.split(".")[0]
        data = cache.load(item)
        label = torch.as_tensor(data["label"])[0].round().numpy().astype(np.uint8)
        affine = np.asarray(data["label"].affine, dtype=np.float64)
        lab_path = out / "labels" / f"{name}.nii.gz"
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), str(lab_path))
        res = wf.run(wf.Config(controlnet_ckpt=ckpt, vae_ckpt=str(paths["vae"]), output_dir=str(out / "images" / name),
                               label_map=str(lab_path), latent_datalist=str(paths["latents"]),
                               pretrain_ckpt=str(paths["pretrain"]), prior_ckpt=str(paths["prior"]),
                               factors_from="prior", site=item["domain"], seed=seed0 + i, device="cpu"))
        image = out / "images" / name / res["cases"][0]["files"]["output"]
        paths_keys = ("image", "label", "latent", "latent_aug", "domain_index")
        items.append({**{k: v for k, v in item.items() if k not in paths_keys}, "image": str(image),
                      "label": str(lab_path), "domain": item["domain"],
                      "subject": f"{item.get('subject', name)}_synthetic", "source": item["latent"]})
        if len(panels) < 3:
            synth = read_truth(str(image), label.shape, prep).numpy()
            real = torch.as_tensor(data["image"])[0].numpy()
            z = label.shape[2] // 2
            panels.append([(f"{name}: label map", label[:, :, z] / 4.0), ("synthetic", synth[:, :, z]),
                           ("real scan of this label", real[:, :, z])])
    return items, panels


def mixed_datalist(synthetic: list[dict[str, Any]], path: Path) -> Path:
    """meduet_seg's sample datalist with absolute paths and the synthetic items added to its training split."""
    from meduet.io import write_json

    data = json.loads(SEG_DATALIST.read_text())
    for split, items in data.items():
        if isinstance(items, list) and items and isinstance(items[0], dict):
            for it in items:
                for k in ("image", "label"):
                    if it.get(k):
                        it[k] = str((SEG_DATALIST.parent / it[k]).resolve())
    # the real items' keys only (the loader collates every key; the label-derived ones, e.g. organ volumes, are the
    # source scan's: the same label map)
    keys = set().union(*(it.keys() for it in data["training"]))
    data["training"] = data["training"] + [{k: v for k, v in it.items() if k in keys} for it in synthetic]
    write_json(path, data)
    return path


def _dice_rows(csv_path: Path, classes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            dice = {c: float(r[f"dice_{c}"]) for c in classes}
            organs = [v for v in dice.values() if np.isfinite(v)]
            dice["mean"] = float(np.mean(organs)) if organs else float("nan")
            out[r["case"]] = {"seen": r["site_seen_in_training"] == "True", "domain": r["domain"], "dice": dice}
    return out


def label_study(args: Any, out: Path, steps: int, train_controlnet: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train the label ControlNet, synthesise, train and evaluate meduet_seg twice (see the module docstring)."""
    import yaml

    from controlnet_study import BUNDLES, LATENTS, PRETRAIN, PRIOR, VAE, rel, run_child
    from controlnet_study_report import recon_picture, seg_summary
    from demo import bundle_cmd

    cn = train_controlnet("label", {"control_task": "label"}, args, out)
    sdir = out / "label"
    synth_json = sdir / "synthetic.json"
    if args.reuse and synth_json.is_file():
        synthetic, panels = json.loads(synth_json.read_text()), []
    else:
        print(f"== label synthesis: one volume per training label map -> {sdir}", flush=True)
        paths = {"latents": LATENTS, "vae": VAE, "pretrain": PRETRAIN, "prior": PRIOR}
        synthetic, panels = synthesise(cn["ckpt"], sdir, paths)
        from meduet.io import write_json

        write_json(synth_json, synthetic)
    picture = sdir / "synthetic.png"
    if panels:
        recon_picture(picture, panels, "label ControlNet: label map | synthetic volume | the real scan of that label")
    datalist = mixed_datalist(synthetic, sdir / "datalist_real_synthetic.json")
    preset = yaml.safe_load((REPO / f"bundles/meduet_seg/configs/presets/{args.preset}.yaml").read_text())
    batch = int(preset["batch_size"])
    real = json.loads(SEG_DATALIST.read_text())["training"]
    n_real = len([it for it in real if it.get("label")])
    epochs_real = int(args.seg_epochs or preset["max_epochs"])
    steps_seg = epochs_real * math.ceil(n_real / batch)
    epochs_mixed = max(1, round(steps_seg / math.ceil((n_real + len(synthetic)) / batch)))
    runs, classes = {}, None
    for tag, epochs, extra in (("real", epochs_real, {}), ("real_synth", epochs_mixed, {"datalist": str(datalist)})):
        root = out / f"seg_{tag}"
        train = bundle_cmd("meduet_seg", "train", args.preset, "training", resume=False, bundle_root=str(root),
                           siblings=str(BUNDLES), max_epochs=epochs, val_interval=10**6, **extra)
        evaluate = bundle_cmd("meduet_seg", "evaluate", args.preset, bundle_root=str(root),
                              output_dir=str(root / "eval"), save_images=0)
        t_train = None
        if not (args.reuse and (root / "eval" / "metrics.json").is_file()):
            print(f"== meduet_seg {tag}: {epochs} epochs", flush=True)
            t_train = round(run_child(train, args.threads, out / "logs" / f"seg_{tag}_train.log"), 1)
            run_child(evaluate, args.threads, out / "logs" / f"seg_{tag}_evaluate.log")
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        classes = list(metrics["classes"])
        runs[tag] = {"epochs": epochs, "train_seconds": t_train, "command": " ".join(train),
                     "evaluate_command": " ".join(evaluate), "metrics_json": str((root / "eval" / "metrics.json")),
                     "cases": _dice_rows(root / "eval" / "cases.csv", classes)}
    rows = [{"subject": case.split("_")[0], "seen": r["seen"], "real": r["dice"],
             "real_synth": runs["real_synth"]["cases"][case]["dice"]} for case, r in runs["real"]["cases"].items()]
    return {"controlnet": cn, "synthetic": len(synthetic), "preset": args.preset, "epochs_real": epochs_real,
            "epochs_real_synth": epochs_mixed, "steps": steps_seg, "classes": classes,
            "steps_real_synth": epochs_mixed * math.ceil((n_real + len(synthetic)) / batch),
            "datalist": str(datalist), "picture": rel(picture), "runs": runs,
            "summary": seg_summary(rows, classes)}
