"""meduet_seg evaluate.yaml: Dice and HD95 (mm) per foreground class, per case, per site and for seen vs held-out
sites, with pictures of the first cases."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from tqdm import tqdm

from meduet import records
from meduet.data import case_name, get_load_transforms, get_split, load_datalist
from meduet.engines.seg import label_names
from meduet.errors import MeduetInputError
from meduet.io import atomic_path, removes_partial_outputs
from meduet.viz import save_orthoslices
from meduet.workflows.config import WorkflowConfig

__all__ = ["Config", "run"]


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


@dataclasses.dataclass
class Config(WorkflowConfig):
    """evaluate.yaml: the segmentation checkpoint, the datalist split with labels, where the report goes."""

    seg_ckpt: str
    datalist: str
    output_dir: str
    split: str = "test"
    roi_size: Sequence[int] | None = None
    overlap: float = 0.25
    max_cases: int | None = None
    save_images: int = 4
    device: str | torch.device = "cpu"


@torch.no_grad()
@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Dice and HD95 (mm) per foreground class, per case, per site and for seen vs held-out sites.

    Volumes are preprocessed as the network's record says and predicted by MONAI sliding windows (``roi_size``
    default: the training crop from the record). Writes ``cases.csv``, ``metrics.json`` and PNGs of the first
    ``save_images`` cases (image, label, prediction). Returns the metrics."""
    cfg = config
    seg_ckpt, datalist, split, roi_size, overlap = cfg.seg_ckpt, cfg.datalist, cfg.split, cfg.roi_size, cfg.overlap
    device = torch.device(cfg.device)
    net = records.load(seg_ckpt, device, expect="meduet_seg")
    dl = load_datalist(datalist)
    items = get_split(datalist, split)[: cfg.max_cases or None]
    if not items:
        raise MeduetInputError(f"{datalist}: split '{split}' is empty")
    prep = dict(net.meta["preprocessing"], expected_channels=1)
    transform = get_load_transforms(**prep, keys=("image", "label"))
    roi = list(roi_size or net.meta.get("roi_size") or [net.image_per_token * 4] * 3)
    n_cls = int(net.arch["out_channels"])
    names = net.meta.get("labels") or label_names(dl, n_cls)
    all_names = [names[str(i)] for i in range(n_cls)]
    classes = all_names[1:]
    heldout = set(dl.get("heldout_domains", []))
    trained_on = set(net.meta.get("training_domains", []))
    dice_m = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_m = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    out = Path(cfg.output_dir)
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
        if i < cfg.save_images:
            save_orthoslices(out / "images" / f"{row['case']}.png",
                             {"image": x[0, 0], "label": y[0, 0].float(), "prediction": pred[0, 0].float()},
                             title=f"{row['case']} ({dom}) mean Dice {row['mean_dice']:.3f}",
                             label_names={"label": all_names, "prediction": all_names})
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
