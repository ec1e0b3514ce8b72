"""The quick-start demo's ControlNet stage (tools/demo.py runs it after the diffusion stage): 3D MedDiffusion's
ControlNet on the demo generator, for undersampled MRI.

``stage_controlnet``: controlnet_train.yaml (merged on train.yaml and the preset) trains the control branch on the
frozen Stage 3 generator with the zero-filled reconstructions of x4 Cartesian undersampled k-space as the task
input; controlnet_infer.yaml then simulates the measurements of test scans (``simulate_from``: their k-space, the
acquisition JSON beside it, the truth known), and turns each zero-filled input into a volume, with and without data
consistency (not in 3D MedDiffusion). The report section gives PSNR / SSIM of the degraded input, the ControlNet
output and the output with data consistency against the clean scan, each computed by the workflow."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["stage_controlnet"]

CASES = 2  # test scans reconstructed


def _f(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def _mean(cases: list[dict], key: str) -> float | None:
    vals = [c[key] for c in cases if isinstance(c.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def stage_controlnet(d: Any, bundle_cmd: Any) -> None:
    """Train the MRI ControlNet and reconstruct ``CASES`` simulated test measurements; appends the report
    section to ``d.sections``."""
    out = d.out / "controlnet"
    d.run("meduet_diffusion: train a ControlNet on the frozen generator (zero-filled MRI x4 as the task input)",
          bundle_cmd("meduet_diffusion", "train", d.preset, "training", extra=("controlnet_train",), resume=False,
                     control_task="mri", acceleration=4))
    d.run("meduet_diffusion: ControlNet reconstruction of simulated x4 k-space of test scans (+ data consistency)",
          bundle_cmd("meduet_diffusion", "controlnet_infer", d.preset, control_task="mri", simulate_from="test",
                     max_cases=CASES, output_dir=str(out), data_consistency=True))
    run = json.loads((out / "controlnet.json").read_text())
    lines = ["## Stage 3d — ControlNet: undersampled MRI (3D MedDiffusion's conditional generation)\n",
             "A trainable copy of the Stage 3 generator's first blocks, joined to the frozen generator by "
             "zero-initialised layers, learns to steer it with a task input: here the zero-filled reconstruction of "
             "k-space undersampled x4 (Cartesian, centre 0.08), encoded by the frozen VAE. Test scans' k-space is "
             "simulated (measurement + acquisition JSON files beside the outputs) and reconstructed "
             f"({run['sampler']}, {run['num_steps']} steps, factors from the input's own latent); 'data "
             "consistency' (not in 3D MedDiffusion) then puts the measured k-space samples back. PSNR (dB) / SSIM "
             "against the clean scan, computed by controlnet_infer.yaml:\n",
             "| case | degraded input (zero-filled) | ControlNet | ControlNet + data consistency |",
             "|---|---|---|---|"]
    parts = ("input", "output_before_consistency", "output")
    sums = {p: [] for p in parts}
    for case in run["cases"]:
        cells = []
        for part in parts:
            m = case["metrics"].get(part) or {}
            sums[part].append(m)
            cells.append(f"{_f(m.get('psnr'))} / {_f(m.get('ssim'), 3)}")
        lines.append(f"| {case['name']} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{_f(_mean(sums[p], 'psnr'))} / {_f(_mean(sums[p], 'ssim'), 3)}"
                                          for p in parts) + " |")
    lines.append(f"\n![ControlNet]({d.rel(out / run['picture'])})\n")
    d.sections.append("\n".join(lines))
