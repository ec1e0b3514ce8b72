"""The quick-start demo's shipping stage (tools/demo.py runs it as ``package``): the bundles the demo trained are
packaged into dist/ (vendored meduet, checksums), served from 127.0.0.1, downloaded with ``python -m monai.bundle
download`` into an empty folder, and a generated volume is segmented by the downloaded meduet_seg."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["stage_package"]

REPO = Path(__file__).resolve().parents[1]


def stage_package(d: Any) -> None:
    """Package the bundles just trained into dist/, serve dist/ on 127.0.0.1, download them with
    ``python -m monai.bundle download`` into an empty folder and segment a generated volume from the downloads."""
    import functools
    import http.server
    import threading

    from meduet.deploy.package import BUNDLES

    # the bundles this demo has trained (meduet_recon only after its stage: `--stages package` on an older checkout)
    BUNDLES = tuple(b for b in BUNDLES if (REPO / "bundles" / b / "models" / "model.pt").exists())  # noqa: N806
    dist = REPO / "dist"
    d.run("package the trained bundles into dist/ (vendored meduet, checksums)",
          [sys.executable, "-m", "meduet.deploy.package", *(a for b in BUNDLES for a in ("--bundle", f"bundles/{b}")),
           "--preset", d.preset, "--out", str(dist)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    dl = d.out / "downloaded"
    if dl.exists():
        import shutil

        shutil.rmtree(dl)
    dl.mkdir(parents=True)
    zips = {}
    try:
        for name in BUNDLES:
            z = sorted(dist.glob(f"{name}_v*.zip"))[-1]
            zips[name] = z
            d.run(f"download {z.name} with monai.bundle", [sys.executable, "-m", "monai.bundle", "download", "--name",
                                                           name, "--url", f"{url}/{z.name}", "--bundle_dir", str(dl)])
    finally:
        httpd.shutdown()
        httpd.server_close()
    samples = sorted((d.out / "diffusion" / "samples").glob("*.nii.gz"))[:1]
    seg_dir = dl / "meduet_seg"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_data", repr([{"image": str(p)} for p in samples]), "--write_dicom_seg", "False",
           "--output_dir", str(d.out / "downloaded_seg")]
    print(f"\n=== segment a generated volume with the downloaded meduet_seg (cwd {seg_dir})\n$ {' '.join(cmd)}",
          flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=seg_dir, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    d.timings.append(("segment with the downloaded meduet_seg", time.perf_counter() - t0))
    if proc.returncode != 0:
        raise SystemExit(f"demo stage 'downloaded meduet_seg' failed (exit {proc.returncode})")
    seg = sorted((d.out / "downloaded_seg").glob("*_seg.nii.gz"))
    pic = d.out / "downloaded_seg" / "generated_and_segmented.png"
    if samples and seg:
        import nibabel as nib
        import numpy as np

        from meduet.data.sample import LABELS
        from meduet.viz import save_orthoslices

        img, lab = (np.asarray(nib.load(p).dataobj) for p in (samples[0], seg[0]))
        names = [LABELS[str(k)] for k in range(len(LABELS))]
        save_orthoslices(pic, {"generated (HU)": img, "labels": lab}, label_names={"labels": names},
                         title=f"{samples[0].name}: generated, segmented by the downloaded meduet_seg")
    sums = (dist / "SHA256SUMS").read_text().splitlines()
    lines = ["## Shipping — packaged, served, downloaded, run\n",
             f"`python -m meduet.deploy.package --bundle bundles/<name> ... (the {len(BUNDLES)} bundles of the chain) "
             f"--preset {d.preset} --out dist` wrote (sha256 in `dist/SHA256SUMS`):\n",
             "| file | MB | sha256 |", "|---|---|---|"]
    for line in sums:
        digest, _, fname = line.partition("  ")
        lines.append(f"| {fname} | {(dist / fname).stat().st_size / 2**20:.1f} | `{digest[:16]}...` |")
    lines.append(f"\nServed from 127.0.0.1 and downloaded with `python -m monai.bundle download --name <name> --url "
                 f"...` into `{d.rel(dl)}/`; each downloaded bundle checks its files against `checksums.sha256` "
                 "before first use. A generated volume segmented by the downloaded `meduet_seg` "
                 f"(run from its folder: `python -m monai.bundle run --config_file configs/inference.json`): "
                 f"{', '.join(d.rel(p) for p in seg) or 'no output'}\n")
    if pic.exists():
        lines.append(f"![generated and segmented]({d.rel(pic)})\n")
    d.sections.append("\n".join(lines))
