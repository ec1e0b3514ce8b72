"""The quick-start demo's code-editing stages (tools/demo.py runs them after the diffusion stage).

``stage_codes`` (in the default demo): semantic interpolation and attribute manipulation with the demo's generator,
whose code is MeDUET's frozen pooled content + style (condition factors) -- cheap: no training.

``stage_ldae`` (optional, ``--stages ldae``, ~8 min more): a latent diffusion autoencoder (meduet_diffusion with configs/ldae.yaml) trained on the cached latents, then diffusion autoencoding,
linear probes (MeDUET content/style, the MAE baseline and the LDAE code side by side), semantic interpolation on the
longitudinal cohort and attribute manipulation, each a ``python -m monai.bundle run`` command; the report section
gives their measured numbers and pictures."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["stage_ldae", "stage_codes"]


def _f(v: Any, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _ci(mean: dict, ci: dict, key: str, nd: int = 3) -> str:
    lo, hi = ci.get(key, [None, None])
    return f"{_f(mean[key], nd)} [{_f(lo, nd)}, {_f(hi, nd)}]" if lo is not None else _f(mean[key], nd)


def stage_ldae(d: Any, bundle_cmd: Any) -> None:
    """Train the LDAE and run its four workflows at ``d.preset``; appends the report section to ``d.sections``."""
    out = d.out / "ldae"
    d.run("meduet_diffusion: train the LDAE (semantic encoder + DiT, configs/ldae.yaml)",
          bundle_cmd("meduet_diffusion", "train", d.preset, "training", extra=("ldae",), resume=False))
    d.run("meduet_diffusion: LDAE autoencoding of test scans (code + inverted noise)",
          bundle_cmd("meduet_diffusion", "autoencode", d.preset, output_dir=str(out / "autoencode"), max_cases=6))
    d.run("meduet_diffusion: linear probes (lesion, organ_b volume, age) on the longitudinal cohort",
          bundle_cmd("meduet_diffusion", "probe", d.preset, output_dir=str(out / "probe")))
    d.run("meduet_diffusion: semantic interpolation to the middle visit of the longitudinal cohort",
          bundle_cmd("meduet_diffusion", "interpolate", d.preset, output_dir=str(out / "interpolate"),
                     max_subjects=8))
    d.run("meduet_diffusion: attribute manipulation along the organ_b volume probe",
          bundle_cmd("meduet_diffusion", "manipulate", d.preset, output_dir=str(out / "manipulate"),
                     attribute="organ_b_ml", max_cases=3))
    ae = json.loads((out / "autoencode" / "autoencode.json").read_text())
    pr = json.loads((out / "probe" / "probe.json").read_text())
    ip = json.loads((out / "interpolate" / "interpolate.json").read_text())
    mp = json.loads((out / "manipulate" / "manipulate.json").read_text())
    m, c = ae["mean"], ae["ci95"]
    lines = ["## Stage 3c — LDAE (latent diffusion autoencoder, meduet_diffusion condition `semantic`)\n",
             f"A semantic encoder trained with the DiT by the diffusion loss ({ae['objective']}, "
             f"{ae['num_steps']} {ae['sampler']} steps for inversion and sampling). Autoencoding "
             f"{len(ae['cases'])} test scans (PSNR dB / SSIM against the preprocessed scan, 95 % intervals over "
             "cases):\n",
             "| reconstruction | PSNR | SSIM |", "|---|---|---|"]
    for row, what in ae["rows"].items():
        lines.append(f"| {row}: {what} | {_ci(m, c, f'psnr_{row}', 2)} | {_ci(m, c, f'ssim_{row}')} |")
    lines += [f"\n![autoencoding]({d.rel(out / 'autoencode' / ae['picture'])})\n",
              f"Linear probes on {pr['cases']} cases of {pr['subjects']} subjects (split {', '.join(pr['splits'])}; "
              "subject-wise folds, 95 % intervals over subjects; computed by probe.yaml):\n",
              (out / "probe" / "probe.md").read_text().strip(),
              f"\n![probes]({d.rel(out / 'probe' / pr['picture'])})\n"]
    lines += _edit_lines(d, out, ip, mp)
    d.sections.append("\n".join(lines))


def _edit_lines(d: Any, out: Any, ip: dict, mp: dict) -> list[str]:
    """Report lines of an interpolation (interpolate.json) and a manipulation (manipulate.json) in ``out``."""
    im, ic = ip["mean"], ip["ci95"]
    lines = [f"Semantic interpolation: first and last visits of {ip['subjects']} cohort subjects -> the middle "
             "visit (10 years from each), against the true middle visit (`ldae` = the codes' interpolation):\n",
             "| method | SSIM | MSE |", "|---|---|---|"]
    for name in [*ip["methods"], "ldae_vae_ceiling"]:
        lines.append(f"| {name} | {_ci(im, ic, f'ssim_{name}')} | {_ci(im, ic, f'mse_{name}', 4)} |")
    return lines + [
        f"\n![interpolation]({d.rel(out / 'interpolate' / ip['picture'])})\n",
        f"Attribute manipulation along the `{mp['attribute']}` probe (steps {mp['steps']} in standard deviations "
        f"of the codes along its direction; one step moves its reading by {_f(mp.get('reading_per_step'))} "
        f"against the cohort's spread of {_f(mp['probe_unit'])}): Spearman rho of step vs the probe's reading of "
        f"the re-encoded edit "
        f"{_f(mp['rho_probe'])}, vs organ_b's volume measured on the decoded image {_f(mp['rho_volume'])} "
        f"({mp['rho_volume_monotone_cases']} of {len(mp['cases'])} cases monotone); mean absolute change at the "
        f"end steps outside the organ {_f(mp['change_outside_at_ends'], 4)}, inside "
        f"{_f(mp['change_inside_at_ends'], 4)}.\n",
        f"![manipulation]({d.rel(out / 'manipulate' / mp['picture'])})\n"]


def stage_codes(d: Any, bundle_cmd: Any) -> None:
    """Interpolation and manipulation with the demo generator (condition factors: MeDUET content + style as the
    code); appends the report section to ``d.sections``."""
    out = d.out / "codes"
    model = "bundles/meduet_diffusion/models/model.pt"
    d.run("meduet_diffusion: semantic interpolation to the middle visit (code: MeDUET content + style)",
          bundle_cmd("meduet_diffusion", "interpolate", d.preset, output_dir=str(out / "interpolate"),
                     model_ckpt=model, max_subjects=4, num_steps=30))
    d.run("meduet_diffusion: attribute manipulation along the organ_b volume probe (code: MeDUET content + style)",
          bundle_cmd("meduet_diffusion", "manipulate", d.preset, output_dir=str(out / "manipulate"),
                     model_ckpt=model, attribute="organ_b_ml", max_cases=2, num_steps=30))
    ip = json.loads((out / "interpolate" / "interpolate.json").read_text())
    mp = json.loads((out / "manipulate" / "manipulate.json").read_text())
    lines = ["## Stage 3b — editing scans through their code (the Stage 3 generator; code = MeDUET content + style)\n",
             "The Stage 3 generator is conditioned on the frozen MeDUET encoder's pooled content and style: that pair "
             "is a code per scan, as an LDAE's semantic code is (the optional `--stages ldae` trains an LDAE, whose "
             "encoder learns with the generator). Each scan is inverted to noise under its own code (Euler steps of "
             "the rectified flow); interpolation slerps two scans' noises and lerps their codes, manipulation moves "
             "the code along a linear probe's direction (fitted on the cohort's codes) and decodes from the scan's "
             "own noise. Computed by interpolate.yaml and manipulate.yaml (`--model_ckpt` = the Stage 3 generator).\n"]
    d.sections.append("\n".join(lines + _edit_lines(d, out, ip, mp)))
