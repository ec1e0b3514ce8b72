"""meduet_diffusion manipulate.yaml: attribute manipulation with a generator that has a code per scan (an LDAE,
condition ``semantic``, or MeDUET factors, condition ``factors``: ``meduet.workflows.diffusion.codes``): a linear probe
of an attribute on the codes gives a direction; a scan's code moved along it by a few steps and
decoded from the scan's own inverted noise gives the edited scans. Measured per step: the probe's reading of the
re-encoded edit, an independent measurement on the decoded image (the organ's volume by nearest class mean), and
how much the image changed outside the organ."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from meduet import records
from meduet.data import get_load_transforms
from meduet.engines.diffusion import center_crop_or_pad
from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.probes import attribute_values, check_varies, infer_task
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.codes import GeneratorCodes
from meduet.workflows.diffusion.common import check_vae, decode, fit_slices, save_volume

__all__ = ["Config", "run", "ProbeDirection", "fit_direction", "nearest_mean_volume", "MEASURED_LABELS"]

#: the label classes whose volume the image measurement counts, per attribute (phantom labels: 2 organ_a,
#: 3 organ_b, 4 lesion inside organ_a); ``age`` shrinks organ_b (meduet.data.phantoms.age_scales)
MEASURED_LABELS = {"organ_a_ml": [2, 4], "organ_b_ml": [3], "lesion_ml": [4], "lesion": [4], "age": [3]}


@dataclasses.dataclass
class ProbeDirection:
    """A linear probe on codes: ``read(codes) = (codes - mean) / sd @ coef + intercept`` (the attribute, or its
    log-odds for a binary one). ``step`` is the code change of one unit of editing: one standard deviation of the
    fitting codes along the probe's direction (the unit vector ``coef / |coef|`` in the standardised code space,
    mapped back by ``sd``) -- a move as large as the population's spread, whatever the probe's gain (a minimum-norm
    step that moves the reading by a fixed amount is vanishingly short for a probe that reads many dimensions).
    ``unit`` is the standard deviation of the reading over the fitting cases, to read the edits' readings against."""

    mean: np.ndarray
    sd: np.ndarray
    coef: np.ndarray
    intercept: float
    unit: float
    task: str

    def read(self, codes: np.ndarray) -> np.ndarray:
        return ((np.asarray(codes, dtype=np.float64) - self.mean) / self.sd) @ self.coef + self.intercept

    @property
    def step(self) -> np.ndarray:
        return self.sd * self.coef / max(float(np.linalg.norm(self.coef)), 1e-12)


def fit_direction(codes: np.ndarray, values: list, task: str = "auto") -> ProbeDirection:
    """Fit the probe: ridge regression (``RidgeCV``) for a continuous attribute, logistic regression for a binary
    one, on standardised codes (all fitting cases)."""
    from sklearn.linear_model import LogisticRegression, RidgeCV

    x = np.asarray(codes, dtype=np.float64)
    mean, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    xs = (x - mean) / sd
    task = infer_task(values) if task == "auto" else task
    if task == "classification":
        y = np.asarray(values)
        if len(set(y.tolist())) != 2:
            raise MeduetConfigError(f"manipulation along a classification probe needs a binary attribute, got classes "
                                    f"{sorted(set(y.tolist()))}")
        model = LogisticRegression(max_iter=5000).fit(xs, y)
        coef, intercept = model.coef_[0], float(model.intercept_[0])
    else:
        model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(xs, np.asarray(values, dtype=np.float64))
        coef, intercept = np.asarray(model.coef_), float(model.intercept_)
    reading = xs @ coef + intercept
    return ProbeDirection(mean, sd, coef, intercept, float(max(reading.std(), 1e-6)), task)


def nearest_mean_volume(volume: np.ndarray, means: dict[int, float], body: np.ndarray, labels: list[int],
                        voxel_ml: float) -> float:
    """Volume (ml) of the voxels inside ``body`` whose intensity is nearest to the mean of one of ``labels`` among
    ``means`` (class -> mean intensity, measured on the unedited decode)."""
    classes = np.asarray(sorted(means))
    centres = np.asarray([means[c] for c in classes])
    nearest = classes[np.abs(volume[body][:, None] - centres[None]).argmin(1)]
    return float(np.isin(nearest, labels).sum() * voxel_ml)


@dataclasses.dataclass
class Config(WorkflowConfig):
    """manipulate.yaml: the generator (LDAE, or factors-conditioned with its ``pretrain_ckpt``), the VAE, the
    attribute and the splits its probe is fitted on, the cases
    edited and the steps (in standard deviations of the codes along the probe's direction: ``ProbeDirection.step``)."""

    model_ckpt: str
    vae_ckpt: str
    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    attribute: str = "organ_b_ml"
    task: str = "auto"
    fit_splits: list = dataclasses.field(default_factory=lambda: ["longitudinal"])
    split: str = "longitudinal"
    max_cases: int = 4
    steps: list = dataclasses.field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    measured_labels: list | None = None
    num_steps: int = 50
    save_volumes: bool = True
    device: str | torch.device = "cpu"


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Edit ``max_cases`` scans of ``split`` along the probe direction of ``attribute`` -> ``<output_dir>/
    manipulate.json``, ``manipulate.png`` and ``<case>_step<s>.nii.gz``.

    Per case and step: ``probe`` = the probe's reading of the edited latent re-encoded by the code's encoder;
    ``volume_ml`` = the measured classes' volume (``MEASURED_LABELS``) in the decoded edit, each voxel of the body
    given the class whose mean intensity (on the step-0 decode, by the case's label map) is nearest;
    ``change_outside`` / ``change_inside`` = mean absolute difference to the step-0 decode outside / inside the
    measured organ's region (its label grown by 2 voxels). Per case, Spearman's rho of the steps against ``probe``
    and ``volume_ml``; means with 95 % bootstrap intervals over cases."""
    cfg = config
    device = torch.device(cfg.device)
    codes = GeneratorCodes(cfg.model_ckpt, cfg.pretrain_ckpt, device)
    net, objective, rec = codes.net, codes.objective, codes.rec
    vae = records.load(cfg.vae_ckpt, device, expect="vae")
    check_vae(vae, rec, cfg.vae_ckpt, cfg.model_ckpt)
    cache = LatentDatalist(cfg.latent_datalist)
    space = LatentSpace.from_record(rec, cfg.model_ckpt)
    crop = [int(c) for c in rec["crop_size"]]
    f = int(rec.get("downsample_factor") or 4)
    steps = sorted(float(s) for s in cfg.steps)
    if len(steps) < 3 or 0.0 not in steps:
        raise MeduetConfigError(f"steps must hold 0 and at least two other values, got {cfg.steps}")

    def code_of(items: list[dict[str, Any]]) -> torch.Tensor:
        x = torch.stack([center_crop_or_pad(load_latent(it["latent"]), crop) for it in items]).float()
        return codes.encode(space.scale(x))

    fit_items = [it for s in cfg.fit_splits for it in cache.items(s)]
    where = f"splits {list(cfg.fit_splits)} of '{cfg.latent_datalist}'"
    values = attribute_values(fit_items, cfg.attribute, where)
    check_varies(values, cfg.attribute, where)
    labels = [int(v) for v in (cfg.measured_labels or MEASURED_LABELS.get(cfg.attribute) or [])]
    if not labels:
        raise MeduetConfigError(f"no label classes to measure for attribute '{cfg.attribute}'; give --measured_labels "
                                f"(e.g. [3] for organ_b); known: {sorted(MEASURED_LABELS)}")
    direction = fit_direction(code_of(fit_items).cpu().numpy(), values, cfg.task)
    items = cache.items(cfg.split)[: cfg.max_cases or None]
    if not items or any("label" not in it for it in items):
        raise MeduetConfigError(f"split '{cfg.split}' of '{cfg.latent_datalist}' needs labelled items to measure the "
                                "edit on (the organ's region); choose a labelled --split")
    transform = get_load_transforms(**dict(rec.get("preprocessing") or {}), keys=("image", "label"))
    voxel_ml = float(np.prod(rec.get("preprocessing", {}).get("spacing") or (1.0, 1.0, 1.0))) / 1000.0
    sampler = "rflow" if objective.objective == "rflow" else "ddim"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases, pictures = [], []
    step_vec = torch.as_tensor(direction.step, dtype=torch.float32, device=device)
    for item in items:
        z = load_latent(item["latent"])
        fit, _ = fit_slices(z.shape[1:], crop)
        x = space.scale(center_crop_or_pad(z, crop)[None].float().to(device))
        code = codes.encode(x)
        noise = invert_latents(net, x, codes.cond(code), objective, num_steps=cfg.num_steps)
        moved = torch.cat([code + s * step_vec for s in steps])
        edits = sample_latents(net, [len(steps), *x.shape[1:]], codes.cond(moved), objective, sampler,
                               cfg.num_steps, noise=noise.expand(len(steps), *noise.shape[1:]).contiguous())
        readings = direction.read(codes.encode(edits).cpu().numpy())
        vols = decode(vae, edits, space)
        data = transform({"image": item["image"], "label": item["label"]})
        lab = np.rint(np.asarray(data["label"])[0]).astype(np.int64)
        lab_fit = np.zeros(vols.shape[1:], dtype=np.int64)
        img_fit = tuple(slice(s.start * f, s.stop * f) for s in fit)
        _, src = fit_slices([s // f for s in lab.shape], crop)
        lab_fit[img_fit] = lab[tuple(slice(s.start * f, s.stop * f) for s in src)]
        ref = vols[steps.index(0.0)]
        means = {int(c): float(ref[lab_fit == c].mean()) for c in np.unique(lab_fit) if c > 0}
        body = lab_fit > 0
        region = ndimage.binary_dilation(np.isin(lab_fit, labels), iterations=2)
        row: dict[str, Any] = {"case": Path(item["latent"]).name.replace(".nii.gz", ""),
                               "value": item.get(cfg.attribute), "steps": steps,
                               "probe": [float(r) for r in readings],
                               "volume_ml": [nearest_mean_volume(v, means, body, labels, voxel_ml) for v in vols],
                               "change_outside": [float(np.abs(v - ref)[body & ~region].mean()) for v in vols],
                               "change_inside": [float(np.abs(v - ref)[region].mean()) for v in vols]}
        row["rho_probe"] = float(stats.spearmanr(steps, row["probe"])[0])
        row["rho_volume"] = float(stats.spearmanr(steps, row["volume_ml"])[0])
        cases.append(row)
        if cfg.save_volumes:
            for s, v in zip(steps, vols):
                save_volume(out / f"{row['case']}_step{s:+g}.nii.gz", v, rec)
        if len(pictures) < 4:
            k = vols.shape[3] // 2
            pictures.append([(f"step {s:+g}", v[:, :, k]) for s, v in zip(steps, vols)])
    summary: dict[str, Any] = {
        "model_ckpt": os.path.abspath(cfg.model_ckpt), "condition": codes.condition, "code": codes.what,
        "attribute": cfg.attribute, "task": direction.task,
        "fit_splits": list(cfg.fit_splits), "fit_cases": len(fit_items), "measured_labels": labels,
        "probe_unit": direction.unit, "reading_per_step": float(np.linalg.norm(direction.coef)),
        "step_norm": float(np.linalg.norm(direction.step)), "steps": steps, "cases": cases,
    }
    for key in ("rho_probe", "rho_volume"):
        vals = [c[key] for c in cases if np.isfinite(c[key])]
        summary[key] = float(np.mean(vals)) if vals else float("nan")
        summary[f"{key}_ci95"] = list(bootstrap_mean_interval(vals)) if vals else []
        summary[f"{key}_monotone_cases"] = int(sum(abs(v) > 0.999 for v in vals))
    far = [steps.index(steps[0]), steps.index(steps[-1])]
    summary["change_outside_at_ends"] = float(np.mean([c["change_outside"][i] for c in cases for i in far]))
    summary["change_inside_at_ends"] = float(np.mean([c["change_inside"][i] for c in cases for i in far]))
    summary["picture"] = save_pair_grid(out / "manipulate.png", pictures,
                                        title=f"{codes.condition} code moved along the '{cfg.attribute}' probe").name
    write_json(out / "manipulate.json", summary)
    print(f"manipulate {cfg.attribute}: Spearman rho probe {summary['rho_probe']:.2f}, measured volume "
          f"{summary['rho_volume']:.2f}; change outside / inside the organ at the end steps "
          f"{summary['change_outside_at_ends']:.4f} / {summary['change_inside_at_ends']:.4f}")
    return summary
