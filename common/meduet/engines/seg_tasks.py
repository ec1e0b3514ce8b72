"""meduet_seg workflow pieces: the preprocessing a segmentation network inherits from its VAE, label-fraction and
site selection of training cases, and the evaluation (Dice and HD95 per class and per site)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meduet.data import get_load_transforms, get_split, load_datalist
from meduet.engines.vae_tasks import case_name
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.io import atomic_path

__all__ = ["seg_preprocessing", "select_training_cases", "seg_record", "with_meta", "label_names", "evaluate_seg"]


def seg_preprocessing(vae_meta: Mapping[str, Any], image_per_token: int, modality: str | None = None) -> dict[str, Any]:
    """The VAE's stored preprocessing (spacing, CT window / MR percentiles, foreground crop) with padding to a
    multiple of the image voxels per token, one input channel, and the modality override if given."""
    prep = dict(vae_meta.get("preprocessing") or {})
    if not prep:
        raise MeduetConfigError("the VAE checkpoint has no preprocessing record; retrain meduet_vae")
    if modality:
        prep["modality"] = modality
    prep["pad_multiple"] = int(image_per_token)
    prep["expected_channels"] = 1
    return prep


def select_training_cases(items: Sequence[Mapping[str, Any]], label_fraction: float = 1.0,
                          domains: Sequence[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled training cases: those with a ``label``, restricted to ``domains`` (None: all), then a random
    ``label_fraction`` of them (at least one), drawn per site so every site keeps its share. Deterministic in
    ``seed``."""
    if not 0.0 < float(label_fraction) <= 1.0:
        raise MeduetConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
    pool = [dict(it) for it in items if it.get("label")]
    if domains is not None:
        unknown = set(domains) - {it.get("domain") for it in pool}
        if unknown:
            raise MeduetConfigError(f"train_domains {sorted(unknown)} have no labelled training cases")
        pool = [it for it in pool if it.get("domain") in set(domains)]
    if not pool:
        raise MeduetInputError("no labelled training cases (items need a 'label')")
    want = max(1, int(math.ceil(label_fraction * len(pool))))
    rng = random.Random(seed)
    by_site: dict[Any, list[dict[str, Any]]] = {}
    for it in pool:
        by_site.setdefault(it.get("domain"), []).append(it)
    for group in by_site.values():
        rng.shuffle(group)
    # round-robin over sites so the subset keeps the site mix
    chosen: list[dict[str, Any]] = []
    groups = [by_site[k] for k in sorted(by_site, key=str)]
    while len(chosen) < want:
        for g in groups:
            if g and len(chosen) < want:
                chosen.append(g.pop())
    return chosen


def label_names(datalist: Mapping[str, Any], out_channels: int) -> dict[str, str]:
    """``{"0": "background", ...}`` from the datalist's ``labels`` (else ``class<i>``)."""
    labels = {str(k): str(v) for k, v in (datalist.get("labels") or {}).items()}
    return {str(i): labels.get(str(i), "background" if i == 0 else f"class{i}") for i in range(out_channels)}


def with_meta(network: torch.nn.Module, meta: Mapping[str, Any]) -> torch.nn.Module:
    """Set ``network.meta`` (the checkpoint record's facts); returns the network (for configs)."""
    network.meta = json.loads(json.dumps(dict(meta)))
    return network


def seg_record(datalist: str, training_cases: Sequence[Mapping[str, Any]], out_channels: int,
               preprocessing: Mapping[str, Any], init: str, label_fraction: float,
               roi_size: Sequence[int] | None = None) -> dict[str, Any]:
    """What a trained segmentation network carries in its record besides the architecture."""
    dl = load_datalist(datalist)
    return {
        "labels": label_names(dl, out_channels),
        "domains": dl.get("domains", []),
        "training_domains": sorted({str(it.get("domain")) for it in training_cases}),
        "training_cases": len(training_cases),
        "label_fraction": float(label_fraction),
        "init": init,
        "preprocessing": {k: v for k, v in preprocessing.items() if k != "expected_channels"},
        "roi_size": [int(r) for r in roi_size] if roi_size is not None else None,
    }


def _summary(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for metric in ("dice", "hd95"):
        per_class = {}
        for c in classes:
            vals = [r[f"{metric}_{c}"] for r in rows if np.isfinite(r.get(f"{metric}_{c}", np.nan))]
            per_class[c] = float(np.mean(vals)) if vals else None
        out[metric] = per_class
        means = [v for v in per_class.values() if v is not None]
        out[f"mean_{metric}"] = float(np.mean(means)) if means else None
    return out


@torch.no_grad()
def evaluate_seg(
    seg_ckpt: str,
    datalist: str,
    split: str = "test",
    output_dir: str = "bundles/meduet_seg/eval",
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    max_cases: int | None = None,
    save_images: int = 4,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Dice and HD95 (mm) per foreground class, per case, per site and for seen vs held-out sites.

    Volumes are preprocessed as the network's record says and predicted by MONAI sliding windows (``roi_size``
    default: the training crop from the record). Writes ``cases.csv``, ``metrics.json`` and PNGs of the first
    ``save_images`` cases (image, label, prediction). Returns the metrics."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    from meduet.networks.seg import load_seg
    from meduet.viz import save_orthoslices

    device = torch.device(device)
    net = load_seg(seg_ckpt, device)
    dl = load_datalist(datalist)
    items = get_split(datalist, split)[: max_cases or None]
    if not items:
        raise MeduetInputError(f"{datalist}: split '{split}' is empty")
    prep = dict(net.meta["preprocessing"], expected_channels=1)
    transform = get_load_transforms(**prep, keys=("image", "label"))
    roi = list(roi_size or net.meta.get("roi_size") or [net.image_per_token * 4] * 3)
    n_cls = int(net.arch["out_channels"])
    names = net.meta.get("labels") or label_names(dl, n_cls)
    classes = [names[str(i)] for i in range(1, n_cls)]
    heldout = set(dl.get("heldout_domains", []))
    trained_on = set(net.meta.get("training_domains", []))
    dice_m = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_m = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    out = Path(output_dir)
    rows = []
    for i, item in enumerate(tqdm(items, desc="evaluate", disable=os.environ.get("MEDUET_PROGRESS") == "0")):
        if not item.get("label"):
            raise MeduetInputError(f"{datalist}: item {i} of '{split}' has no label to evaluate against")
        data = transform({"image": item["image"], "label": item["label"]})
        x = data["image"].as_tensor()[None].float().to(device)
        y = data["label"].as_tensor()[None].long().to(device)
        logits = sliding_window_inference(x, roi, sw_batch_size=4, predictor=net, overlap=overlap, mode="gaussian")
        pred = logits.argmax(1, keepdim=True)
        p1, y1 = one_hot(pred, n_cls), one_hot(y, n_cls)
        dice = dice_m(p1, y1)[0].cpu().numpy()
        spacing = [float(s) for s in np.linalg.norm(np.asarray(data["image"].affine)[:3, :3], axis=0)]
        hd = hd_m(p1, y1, spacing=spacing)[0].cpu().numpy()
        dom = item.get("domain")
        row: dict[str, Any] = {"case": case_name(item), "domain": dom,
                               "site_seen_in_training": dom in trained_on if trained_on else dom not in heldout}
        for c, d, h in zip(classes, dice, hd):
            row[f"dice_{c}"] = float(d)
            row[f"hd95_{c}"] = float(h)
        fg = [float(d) for d in dice if np.isfinite(d)]
        row["mean_dice"] = float(np.mean(fg)) if fg else float("nan")
        rows.append(row)
        if i < save_images:
            save_orthoslices(out / "images" / f"{row['case']}.png",
                             {"image": x[0, 0], "label": y[0, 0].float(), "prediction": pred[0, 0].float()},
                             title=f"{row['case']} ({dom}) mean Dice {row['mean_dice']:.3f}",
                             cmaps={"label": "tab10", "prediction": "tab10"},
                             ranges={"label": (0, 9), "prediction": (0, 9)})
    sites = sorted({str(r["domain"]) for r in rows})
    metrics = {
        "seg_ckpt": os.path.abspath(seg_ckpt), "datalist": os.path.abspath(datalist), "split": split,
        "init": net.meta.get("init"), "label_fraction": net.meta.get("label_fraction"),
        "training_domains": sorted(trained_on), "classes": classes, "roi_size": roi,
        "overall": _summary(rows, classes),
        "per_site": {s: _summary([r for r in rows if str(r["domain"]) == s], classes) for s in sites},
        "seen_sites": _summary([r for r in rows if r["site_seen_in_training"]], classes),
        "unseen_sites": _summary([r for r in rows if not r["site_seen_in_training"]], classes),
    }
    with atomic_path(out / "cases.csv", suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out / "metrics.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    o = metrics["overall"]
    print(f"meduet_seg evaluate: {len(rows)} cases, mean Dice {o['mean_dice']:.3f}, seen sites "
          f"{metrics['seen_sites'].get('mean_dice')}, unseen sites {metrics['unseen_sites'].get('mean_dice')} "
          f"-> {out / 'metrics.json'}")
    return metrics
