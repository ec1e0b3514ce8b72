"""Fingerprint what the tiny bundle chain produces, to check that a refactoring changed no number.

    python tools/chain_fingerprint.py run <out_dir>                  # from the repository root (its .venv)
    python tools/chain_fingerprint.py compare <a>/fingerprint.json <b>/fingerprint.json

``run`` makes the tiny sample data and runs every workflow of the four bundles at the tiny preset, as users run them
(``python -m monai.bundle run ...``, a fresh interpreter each), then writes ``<out_dir>/fingerprint.json``: a hash
of every weight tensor of every ``model.pt`` (and the decoded checkpoint record), every JSON the workflows wrote and
every NIfTI output. ``compare`` lists the differences, with the two output folders' paths made equal. The issue-20
redesign was checked this way: identical fingerprints but for the VAE record's new ``kind``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(out: Path, bundle: str, workflow: str, *args, run_id: str | None = None, extra: tuple[str, ...] = ()) -> None:
    ext = "json" if workflow == "inference" else "yaml"
    files = [f"bundles/{bundle}/configs/{workflow}.{ext}", *[f"bundles/{bundle}/configs/{e}.yaml" for e in extra],
             f"bundles/{bundle}/configs/presets/tiny.yaml"]
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + [
        "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]", *map(str, args)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, MEDUET_PROGRESS="0"), capture_output=True, text=True)
    print(f"{bundle}/{workflow}: exit {p.returncode}, {time.time() - t0:.0f} s", flush=True)
    if p.returncode:
        sys.exit(p.stderr[-4000:])


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "meduet.data.sample", "--out", str(out / "sample"), "--size", "32",
                    "--subjects", "8", "--sites", "4", "--brain-size", "32"], cwd=REPO, check=True, capture_output=True)
    ph = out / "sample/phantoms"
    vae, pre, dif, seg = out / "vae", out / "pretrain", out / "diffusion", out / "seg"
    image = json.dumps([{"image": str(ph / "images" / sorted(os.listdir(ph / "images"))[0])}])
    _run(out, "meduet_vae", "train", "--bundle_root", vae, "--dataset_dir", ph, "--max_epochs", 3, run_id="training")
    _run(out, "meduet_vae", "train_decoder", "--bundle_root", vae, "--dataset_dir", ph, run_id="training")
    _run(out, "meduet_vae", "evaluate", "--bundle_root", vae, "--dataset_dir", ph, "--output_dir", out / "eval/vae")
    lat = vae / "latents_shared" / "datalist.json"
    _run(out, "meduet_vae", "encode", "--bundle_root", vae, "--dataset_dir", ph, "--latent_dir", lat.parent)
    _run(out, "meduet_vae", "inference", "--bundle_root", vae, "--output_dir", out / "eval/vae_inf",
         "--input_data", image)
    _run(out, "meduet_pretrain", "train", "--bundle_root", pre, "--latent_datalist", lat, run_id="training")
    _run(out, "meduet_pretrain", "train", "--bundle_root", pre, "--latent_datalist", lat, run_id="training",
         extra=("mae_baseline",))
    _run(out, "meduet_pretrain", "evaluate", "--bundle_root", pre, "--latent_datalist", lat, "--vae_ckpt",
         vae / "models/model.pt", "--output_dir", out / "eval/pretrain")
    _run(out, "meduet_pretrain", "extract", "--bundle_root", pre, "--latent_datalist", lat, "--output_dir",
         out / "eval/extract")
    _run(out, "meduet_diffusion", "train", "--bundle_root", dif, "--latent_datalist", lat, "--pretrain_ckpt",
         pre / "models/model.pt", run_id="training")
    chain = ["--bundle_root", dif, "--vae_ckpt", vae / "models/model.pt", "--pretrain_ckpt", pre / "models/model.pt",
             "--latent_datalist", lat]
    _run(out, "meduet_diffusion", "sample", *chain, "--output_dir", out / "eval/sample", "--num_per_site", 1,
         "--num_steps", 4)
    _run(out, "meduet_diffusion", "transfer", *chain, "--output_dir", out / "eval/transfer", "--pairs", 2,
         "--num_steps", 5)
    _run(out, "meduet_diffusion", "evaluate", *chain, "--output_dir", out / "eval/geneval", "--num_per_site", 1,
         "--num_steps", 5)
    _run(out, "meduet_seg", "train", "--bundle_root", seg, "--dataset_dir", ph, "--vae_ckpt", vae / "models/model.pt",
         "--pretrain_ckpt", pre / "models/model.pt", "--label_fraction", 0.5, run_id="training")
    _run(out, "meduet_seg", "evaluate", "--bundle_root", seg, "--dataset_dir", ph, "--output_dir", out / "eval/seg")
    _run(out, "meduet_seg", "inference", "--bundle_root", seg, "--output_dir", out / "eval/seg_inf", "--input_data",
         image)
    (out / "fingerprint.json").write_text(json.dumps(fingerprint(out), indent=1, sort_keys=True, default=str))


def fingerprint(out: Path) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    def h(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()[:16]

    fp: dict = {}
    for p in sorted(out.rglob("*.pt")):
        if "checkpoint" in p.name:
            continue
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
            rec = obj.get("_extra_state")
            fp[str(p.relative_to(out))] = {
                "tensors": {k: h(v.contiguous().numpy().tobytes()) for k, v in obj.items()
                            if not k.endswith("_extra_state")},
                "record": json.loads(bytes(rec.numpy().tobytes()).rstrip(b"\0")) if rec is not None else None}
        else:
            fp[str(p.relative_to(out))] = h(p.read_bytes())
    for p in sorted(out.rglob("*.json")):
        if p.name != "fingerprint.json" and not (p.is_relative_to(out / "sample")):
            fp[str(p.relative_to(out))] = json.loads(p.read_text())
    for p in sorted(out.rglob("*.nii.gz")):
        if not p.is_relative_to(out / "sample"):
            fp[str(p.relative_to(out))] = h(np.asarray(nib.load(p).dataobj).tobytes())
    return fp


def compare(a_path: Path, b_path: Path) -> list[str]:
    dirs = sorted({str(a_path.parent.resolve()), str(b_path.parent.resolve())}, key=len, reverse=True)

    def norm(x):
        if isinstance(x, str):
            for d in dirs:  # the longer first: one folder's name may start with the other's
                x = x.replace(d, "<out>")
            return x
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x

    def diff(x, y, path=""):
        if type(x) is not type(y):
            return [f"{path}: {str(x)[:80]} != {str(y)[:80]}"]
        if isinstance(x, dict):
            return [line for k in sorted(set(x) | set(y)) for line in (
                [f"{path}/{k}: only in {'second' if k not in x else 'first'}"] if (k in x) != (k in y)
                else diff(x[k], y[k], f"{path}/{k}"))]
        if isinstance(x, list):
            if len(x) != len(y):
                return [f"{path}: {len(x)} != {len(y)} items"]
            return [line for i, (u, v) in enumerate(zip(x, y)) for line in diff(u, v, f"{path}[{i}]")]
        return [] if x == y else [f"{path}: {str(x)[:80]} != {str(y)[:80]}"]

    return diff(norm(json.loads(a_path.read_text())), norm(json.loads(b_path.read_text())))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]).resolve())
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        lines = compare(Path(sys.argv[2]), Path(sys.argv[3]))
        print(f"{len(lines)} differences", *lines[:200], sep="\n")
    else:
        sys.exit(__doc__)
