"""Run MONAI Label's own bundle tasks on a prepared meduet_seg bundle; executed by tests/test_monailabel.py with
MONAI Label's virtualenv interpreter (not collected by pytest: no ``test_`` prefix).

    python tests/unit/deploy/monailabel_tasks.py infer <bundle_dir> <image.nii.gz>
    python tests/unit/deploy/monailabel_tasks.py train <bundle_dir> <studies_dir>

Prints one JSON line (prefixed ``RESULT ``) with what the caller asserts on.
"""

from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np


def infer(bundle: str, image: str) -> dict:
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(bundle, conf={})
    if not task.is_valid():
        raise SystemExit(f"BundleInferTask found {bundle} invalid")
    label_file, params = task({"image": image, "device": "cpu", "result_extension": ".nii.gz"})
    seg = nib.load(label_file)
    arr = np.asarray(seg.dataobj)
    return {"label_file": label_file, "shape": list(seg.shape), "affine": seg.affine.tolist(),
            "values": sorted(int(v) for v in np.unique(arr)), "labels": task.labels, "type": str(task.type),
            "dimension": task.dimension, "latency": params.get("latencies", {}).get("total")}


def train(bundle: str, studies: str) -> dict:
    import torch
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask

    before = torch.load(os.path.join(bundle, "models", "model.pt"), map_location="cpu", weights_only=True)
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    task = BundleTrainTask(bundle, conf={})
    if not task.is_valid():
        raise SystemExit(f"BundleTrainTask found {bundle} invalid")
    task({"model": os.path.basename(bundle), "max_epochs": 1, "val_split": 0.5, "multi_gpu": False,
          "device": "cpu", "tracking": "None", "pretrained": True}, datastore)
    after = torch.load(os.path.join(bundle, "models", "model.pt"), map_location="cpu", weights_only=True)
    changed = [k for k, v in after.items() if k in before and v.is_floating_point() and not torch.equal(v, before[k])]
    frozen_vae = [k for k in changed if k.startswith("latent_encoder.")]
    return {"n_datalist": len(datastore.datalist()), "changed": len(changed), "frozen_changed": len(frozen_vae),
            "keys_same": sorted(before) == sorted(after),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values() if v.is_floating_point())}


if __name__ == "__main__":
    mode, bundle, arg = sys.argv[1:4]
    out = infer(bundle, arg) if mode == "infer" else train(bundle, arg)
    print("RESULT " + json.dumps(out), flush=True)
