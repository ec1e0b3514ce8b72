"""The quick-start demo: the bundle chain on the shipped sample data, run exactly as users run bundles.

    python -m meduet.demo --out outputs/demo [--preset demo|tiny]

Every stage is a ``python -m monai.bundle run ...`` subprocess from the repository root with the preset merged
on top of the bundle's own config; afterwards ``<out>/REPORT.md`` summarises the measured numbers and links the
pictures. Trained weights land in each bundle's ``models/`` (where the next stage looks for them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def bundle_cmd(bundle: str, workflow: str, preset: str, run_id: str | None = None, **overrides: Any) -> list[str]:
    """The ``python -m monai.bundle run`` command of one bundle workflow with a preset and overrides."""
    cfg = f"bundles/{bundle}/configs/{workflow}.yaml"
    files = [cfg, f"bundles/{bundle}/configs/presets/{preset}.yaml"]
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    cmd += ["--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]"]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]  # python-fire parses Python literals
    return cmd


class Demo:
    def __init__(self, out: Path, preset: str) -> None:
        self.out = out
        self.preset = preset
        self.sections: list[str] = []
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, cmd: list[str]) -> None:
        print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        dt = time.perf_counter() - t0
        self.timings.append((title, dt))
        if proc.returncode != 0:
            raise SystemExit(f"demo stage '{title}' failed (exit {proc.returncode}); command: {' '.join(cmd)}")

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.out)


def _fmt(v: Any, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def stage_sample_data(d: Demo) -> None:
    d.run("sample data", [sys.executable, "-m", "meduet.data.sample", "--out", "data/sample"])
    dl = json.loads((REPO / "data/sample/phantoms/datalist.json").read_text())
    d.sections.append(
        "## Sample data\n\n"
        f"Synthetic phantoms: {len(dl['domains'])} sites ({', '.join(dl['domains'])}; held out of training: "
        f"{', '.join(dl.get('heldout_domains', []))}), {len(dl['training'])} training / {len(dl['validation'])} "
        f"validation / {len(dl['test'])} test images, labels {dl['labels']}. "
        "Made by `python -m meduet.data.sample --out data/sample`.\n"
    )


def stage_vae(d: Demo) -> None:
    b = "bundles/meduet_vae"
    d.run("meduet_vae: train", bundle_cmd("meduet_vae", "train", d.preset, "training", resume=False))
    d.run("meduet_vae: fine-tune decoder on whole volumes",
          bundle_cmd("meduet_vae", "train_decoder", d.preset, "training", resume=False))
    vae_out = d.out / "vae"
    d.run("meduet_vae: evaluate on phantom test split (all sites)",
          bundle_cmd("meduet_vae", "evaluate", d.preset, output_dir=str(vae_out / "phantoms")))
    brain = REPO / "data/sample/brain/datalist.json"
    if brain.is_file():
        d.run("meduet_vae: evaluate on the MNI152 brain (MR, never trained on)",
              bundle_cmd("meduet_vae", "evaluate", d.preset, output_dir=str(vae_out / "brain"),
                         datalist="data/sample/brain/datalist.json", compare_ckpt=None))
    d.run("meduet_vae: cache latents", bundle_cmd("meduet_vae", "encode", d.preset))

    lines = ["## Stage 1 — meduet_vae (3D KL-VAE, MAISI architecture)\n"]
    m = json.loads((vae_out / "phantoms" / "metrics.json").read_text())
    o = m["overall"]
    lines.append("Whole-volume reconstruction on the phantom test split, computed by `evaluate.yaml`:\n")
    lines.append("| subset | cases | PSNR (dB) | SSIM | MS-SSIM |\n|---|---|---|---|---|")
    for name, s in (("all sites", o), ("sites seen in training", m["seen_domains"]),
                    ("held-out sites", m["heldout_domains"])):
        if s:
            lines.append(f"| {name} | {s['n']} | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'])} | {_fmt(s['ms_ssim'])} |")
    if brain.is_file():
        mb = json.loads((vae_out / "brain" / "metrics.json").read_text())["overall"]
        lines.append(f"| MNI152 brain (MR) | {mb['n']} | {_fmt(mb['psnr'], 2)} | {_fmt(mb['ssim'])} | "
                     f"{_fmt(mb['ms_ssim'])} |")
    lines.append("")
    if "before_seam_ratio" in o:
        lines.append(
            f"Patch-wise encoding ({m['patch_size']} patches, no overlap) then whole-volume decoding — seam error "
            "(mean |error| on voxels at patch borders / elsewhere; 1.0 = no seam):\n\n"
            "| decoder | border MAE | interior MAE | ratio | PSNR |\n|---|---|---|---|---|\n"
            f"| before fine-tuning | {_fmt(o['before_seam_border_mae'], 4)} | {_fmt(o['before_seam_interior_mae'], 4)} "
            f"| {_fmt(o['before_seam_ratio'])} | {_fmt(o['before_patchwise_psnr'], 2)} |\n"
            f"| after fine-tuning on whole volumes | {_fmt(o['seam_border_mae'], 4)} | "
            f"{_fmt(o['seam_interior_mae'], 4)} | {_fmt(o['seam_ratio'])} | {_fmt(o['patchwise_psnr'], 2)} |\n"
        )
    pics = sorted((vae_out / "phantoms" / "images").glob("*.png"))[:4]
    if brain.is_file():
        pics += sorted((vae_out / "brain" / "images").glob("*.png"))[:1]
    for p in pics:
        lines.append(f"![{p.stem}]({d.rel(p)})")
    lat = json.loads((REPO / b / "latents/phantoms/datalist.json").read_text())
    n_lat = sum(len(lat.get(s, [])) for s in ("training", "validation", "test"))
    lines.append(
        f"\nLatent cache: {n_lat} latents of {lat['latent_channels']} channels at 1/{lat['downsample_factor']} "
        f"resolution in `{b}/latents/phantoms/` (latent std {_fmt(lat.get('latent_std'))}, scale factor from "
        f"training {_fmt(lat['latent_scale_factor'])}). Reconstructions as NIfTI: `{d.rel(vae_out)}/*/recon/`.\n"
    )
    d.sections.append("\n".join(lines))


STAGES: list[tuple[str, Callable[[Demo], None]]] = [
    ("sample", stage_sample_data),
    ("vae", stage_vae),
]


def write_report(d: Demo) -> Path:
    total = sum(t for _, t in d.timings)
    timing = "\n".join(f"| {name} | {t:.0f} |" for name, t in d.timings)
    text = (
        "# MeDUET bundles — demo report\n\n"
        f"Preset `{d.preset}` on this machine's CPU. Every number below is computed by the bundles' own "
        "workflows on the sample data (`data/sample/`).\n\n" + "\n\n".join(d.sections) +
        f"\n\n## Time per stage\n\n| stage | seconds |\n|---|---|\n{timing}\n| total | {total:.0f} |\n"
    )
    path = d.out / "REPORT.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="where the report and pictures go")
    p.add_argument("--preset", default="demo", choices=["tiny", "demo"], help="size preset of every bundle")
    p.add_argument("--stages", default=",".join(n for n, _ in STAGES), help="comma-separated subset of stages")
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve() if not os.path.isabs(args.out) else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = Demo(out, args.preset)
    wanted = set(args.stages.split(","))
    for name, fn in STAGES:
        if name in wanted:
            fn(d)
    report = write_report(d)
    print(f"\nDemo finished in {sum(t for _, t in d.timings):.0f} s. Report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
