"""meduet_diffusion controlnet_infer.yaml: a trained ControlNet (controlnet_train.yaml) turns a task input into a
volume: the zero-filled reconstruction of undersampled MRI, the FBP of sparse-view CT (each from a measurement file
and its acquisition JSON, ``meduet.data.measurements``) or a label map; optionally (not in 3D MedDiffusion) with
data consistency to the measurements. Writes NIfTI volumes on the input's grid, ``controlnet.json`` and a picture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data.controls import label_control
from meduet.engines.consistency import DataConsistency, LatentConsistency, decode_image
from meduet.engines.controlnet import control_encoding, encode_image_control
from meduet.engines.diffusion import center_crop_or_pad
from meduet.engines.factor_prior import sample_factors
from meduet.engines.sampling import sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace
from meduet.losses.diffusion import SAMPLERS
from meduet.metrics.reconstruction import reconstruction_metrics
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.common import (check_vae, conditioner_for, factors_of, generator_parts, load_prior,
                                               progress_enabled, save_volume)
from meduet.workflows.diffusion.controlnet_inputs import (Case, label_case, measurement_case, simulated_cases,
                                                          task_of)

__all__ = ["Config", "run", "FACTORS_FROM"]

FACTORS_FROM = ("control", "prior", "reference")


@dataclasses.dataclass
class Config(WorkflowConfig):
    """controlnet_infer.yaml: the ControlNet, its chain (VAE, factor encoder, factor prior), one input (a
    ``measurement`` + ``acquisition``, a ``label_map`` or ``simulate_from`` a latent datalist split), the factors'
    source, sampling and the optional data consistency."""

    controlnet_ckpt: str
    vae_ckpt: str
    output_dir: str
    measurement: str | None = None
    acquisition: str | None = None
    label_map: str | None = None
    simulate_from: str | None = None
    latent_datalist: str | None = None
    max_cases: int = 2
    truth_image: str | None = None
    #: ``"warn"``: a measurement acquired with other settings than the training's (acceleration, views, mask,
    #: spacing) is a warning, recorded in controlnet.json; ``"error"``: a one-line error
    on_mismatch: str = "warn"
    pretrain_ckpt: str | None = None
    prior_ckpt: str | None = None
    #: factors of a factors-conditioned base: ``control`` (the frozen encoder's pooled factors of the control's own
    #: latent), ``prior`` (the factor prior of ``site``), ``reference`` (the first scan of ``site`` in
    #: ``reference_split``); None: control for image tasks, prior for label
    factors_from: str | None = None
    site: str | None = None
    reference_split: str = "test"
    sampler: str | None = None
    num_steps: int | None = None
    guidance_scale: float = 1.5
    seed: int = 0
    #: not in 3D MedDiffusion (off by default and in the paper preset): projected gradient steps towards the
    #: measurements on the decoded result, and with ``data_consistency_every`` on the predicted clean latent
    data_consistency: bool = False
    data_consistency_steps: int = 5
    data_consistency_every: int | None = None
    device: str | torch.device = "cpu"


def _padded(shape: Sequence[int], multiple: int) -> tuple[list[int], tuple[slice, ...]]:
    """The grid padded up to ``multiple`` per axis (symmetric) and where the original sits in it."""
    size = [-(-int(s) // multiple) * multiple for s in shape]
    return size, tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(size, shape))


def _pad(x: torch.Tensor, size: Sequence[int], region: Sequence[slice]) -> torch.Tensor:
    """``(..., S1, S2, S3)`` zero-padded to ``size`` with the original at ``region``."""
    out = x.new_zeros((*x.shape[:-3], *size))
    out[(..., *region)] = x
    return out


class _Conditions:
    """The base generator's condition for one case (``factors_from`` / ``site``, see ``Config``)."""

    def __init__(self, cfg: Config, rec: dict[str, Any], image_task: bool, device: torch.device,
                 gen: torch.Generator) -> None:
        self.rec, self.device, self.gen = rec, device, gen
        self.condition = str(rec.get("condition", "none"))
        if self.condition == "semantic":
            raise MeduetConfigError("controlnet_infer does not take a semantic (LDAE) base generator; train the "
                                    "ControlNet on a generator with condition none, metadata or factors")
        if rec.get("content_map"):
            raise MeduetConfigError("controlnet_infer does not take a base generator with content_map (its content "
                                    "token map is tied to the training crop); use one without")
        domains, held = list(rec.get("domains") or []), set(rec.get("heldout_domains") or [])
        self.site = cfg.site or next((d for d in domains if d not in held), domains[0] if domains else None)
        if cfg.site is not None and cfg.site not in domains:
            raise MeduetConfigError(f"unknown site {cfg.site!r}; the generator knows {domains}")
        self.domains = domains
        self.source = cfg.factors_from or ("control" if image_task else "prior")
        if self.condition != "factors":
            self.source = None
            return
        if self.source not in FACTORS_FROM:
            raise MeduetConfigError(f"factors_from {self.source!r} is unknown; set --factors_from to one of "
                                    f"{', '.join(FACTORS_FROM)}")
        if self.source == "control" and not image_task:
            raise MeduetConfigError("factors_from 'control' needs an image control (mri / ct); use prior or "
                                    "reference for the label task")
        self.conditioner = conditioner_for(rec, cfg.pretrain_ckpt, device)
        self.prior = load_prior(cfg.prior_ckpt, device, " or use factors_from control / reference") \
            if self.source == "prior" else None
        self.refs = None
        if self.source == "reference":
            if not cfg.latent_datalist:
                raise MeduetConfigError("factors_from 'reference' needs latent_datalist (meduet_vae's latent cache)")
            self.refs = [it for it in LatentDatalist(cfg.latent_datalist).items(cfg.reference_split)
                         if it.get("domain") == self.site]
            if not self.refs:
                raise MeduetConfigError(f"no scan of site {self.site!r} in split '{cfg.reference_split}' of "
                                        f"{cfg.latent_datalist}; set --site or --reference_split")

    def __call__(self, control: torch.Tensor, image_control: bool) -> dict[str, torch.Tensor]:
        """The base condition for a latent control ``(1, Cc, *S)`` (empty for an unconditional base)."""
        if self.condition == "metadata":
            cond = {"domain": torch.tensor([self.domains.index(self.site)], device=self.device)}
            if self.rec.get("metadata_keys"):
                values = (self.rec.get("metadata_by_site") or {}).get(self.site) or self.rec.get("metadata_mean")
                cond["metadata"] = torch.tensor([values], dtype=torch.float32, device=self.device)
            return cond
        if self.condition != "factors":
            return {}
        if self.source == "control":
            crop = center_crop_or_pad(control[0].cpu(), self.rec["crop_size"])[None].to(self.device)
            return self.conditioner.factors(crop)
        if self.source == "reference":
            return factors_of(self.conditioner, self.refs[:1], self.rec, self.device)
        idx = self.domains.index(self.site) if self.prior.arch.get("num_domains") else None
        content, style = sample_factors(self.prior, 1, generator=self.gen, domain=idx)
        cond = {"content": content.to(self.device)}
        if style is not None and self.rec.get("style_dim", 0) is not None:
            cond["style"] = style.to(self.device)
        return cond


def _caption(case: Case) -> str:
    """What the degraded input is, for the picture."""
    if case.measurement is None:
        return "label map"
    acq = case.measurement.acquisition
    if acq.modality == "ct":
        return f"FBP, {acq.num_angles} views"
    return f"zero-filled x{acq.acceleration:g}" if acq.mask == "cartesian" else "zero-filled"


def _metrics(pred: torch.Tensor | None, truth: torch.Tensor | None) -> dict[str, float] | None:
    if pred is None or truth is None:
        return None
    m = reconstruction_metrics(pred.reshape(1, 1, *pred.shape[-3:]).float(), truth.reshape(1, 1, *truth.shape[-3:]))
    return {"psnr": m["psnr"], "ssim": m["ssim"]}


def _cases(cfg: Config, rec: dict[str, Any], task, net) -> list[Case]:
    given = [k for k in ("measurement", "label_map", "simulate_from") if getattr(cfg, k)]
    if len(given) != 1:
        raise MeduetConfigError(f"controlnet_infer got {len(given)} inputs {given}; give exactly one: --measurement "
                                "(with --acquisition), --label_map or --simulate_from")
    prep = dict(rec.get("preprocessing") or {})
    if cfg.measurement:
        return [measurement_case(cfg.measurement, cfg.acquisition, task, prep, cfg.on_mismatch, cfg.truth_image)]
    if cfg.label_map:
        if task.is_image:
            raise MeduetConfigError(f"a label map is the input of a label ControlNet, this one is '{task.task}'; "
                                    "pass measurement + acquisition")
        return [label_case(cfg.label_map, net.control_channels, cfg.truth_image, prep)]
    if not cfg.latent_datalist:
        raise MeduetConfigError("simulate_from needs latent_datalist (meduet_vae's latent cache)")
    return simulated_cases(cfg.latent_datalist, cfg.simulate_from, cfg.max_cases, task, cfg.vae_ckpt,
                           Path(cfg.output_dir))


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """ControlNet inference on every case (see the module docstring). Per case ``<name>`` writes
    ``<name>_controlnet.nii.gz`` (the output on the input's grid and affine; HU for a CT chain) and, for image tasks,
    ``<name>_classical.nii.gz`` (the clipped classical reconstruction, the degraded input); then ``controlnet.json``
    (settings, acquisition checks, PSNR / SSIM of the degraded input and the output against the truth when known,
    measurement residuals ``||A x - y|| / ||y||``) and ``controlnet.png`` (degraded input | ControlNet output |
    truth, middle axial slices)."""
    cfg = config
    if cfg.on_mismatch not in ("warn", "error"):
        raise MeduetConfigError(f"on_mismatch {cfg.on_mismatch!r} is unknown; set --on_mismatch warn or error")
    if not Path(cfg.controlnet_ckpt).is_file():
        raise MeduetConfigError(f"ControlNet checkpoint '{cfg.controlnet_ckpt}' does not exist; run "
                                "controlnet_train.yaml first (python -m monai.bundle run training --config_file \"["
                                "'<meduet_diffusion>/configs/train.yaml','<meduet_diffusion>/configs/controlnet_train"
                                ".yaml','<meduet_diffusion>/configs/presets/demo.yaml']\" --control_task <task>)")
    records.require(cfg.controlnet_ckpt, "meduet_diffusion")
    device = torch.device(cfg.device)
    net, objective, rec = generator_parts(records.load(cfg.controlnet_ckpt, device, expect="controlnet"),
                                          cfg.controlnet_ckpt)
    rec["content_map"] = bool(net.base.arch.get("content_map", False))
    task = task_of(rec.get("control") or {})
    vae = records.load(cfg.vae_ckpt, device, expect="vae").eval()
    check_vae(vae, rec, cfg.vae_ckpt, cfg.controlnet_ckpt)
    space = LatentSpace.from_record(rec, cfg.controlnet_ckpt)
    latents = LatentDatalist(cfg.latent_datalist).data if cfg.latent_datalist and Path(cfg.latent_datalist).is_file() \
        else None
    scheme = control_encoding(vae, latents)
    f = int(rec.get("downsample_factor") or vae.downsample_factor)
    multiple = f * int(net.base.patch_size)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    conditions = _Conditions(cfg, rec, task.is_image, device, gen)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = _cases(cfg, rec, task, net)
    sampler = cfg.sampler or SAMPLERS[objective.objective][0]
    num_steps = cfg.num_steps or {"ddpm": objective.num_train_timesteps, "ddim": 50, "rflow": 30}[sampler]
    rows, results = [], []
    for case in cases:
        size, region = _padded(case.shape, multiple)
        if case.control_image is not None:
            control = encode_image_control(vae, scheme, space, _pad(case.control_image.to(device), size, region))
        else:
            control = label_control(_pad(case.label, size, region), net.control_channels, f)[None].to(device)
        cond = {**conditions(control, case.control_image is not None), "control": control}
        dc = DataConsistency(case.measurement, cfg.data_consistency_steps) \
            if cfg.data_consistency and case.measurement is not None else None
        callback = None
        if dc is not None and cfg.data_consistency_every:
            callback = LatentConsistency(dc, vae, scheme, space, region, cfg.data_consistency_every, num_steps)
        z = sample_latents(net, [1, int(rec["latent_channels"]), *(s // f for s in size)], cond, objective,
                           sampler=sampler, num_steps=num_steps, guidance_scale=cfg.guidance_scale, generator=gen,
                           progress=progress_enabled(), step_callback=callback)
        with torch.no_grad():
            sampled = decode_image(vae, scheme, space, z)[(..., *region)].cpu()
        result = dc(sampled) if dc is not None else sampled
        vol = result[0, 0].numpy()
        save_volume(out / f"{case.name}_controlnet.nii.gz", vol, rec, affine=case.affine)
        files = {**case.files, "output": f"{case.name}_controlnet.nii.gz"}
        if case.control_image is not None:
            save_volume(out / f"{case.name}_classical.nii.gz", case.control_image[0, 0].numpy(), rec,
                        affine=case.affine)
            files["classical"] = f"{case.name}_classical.nii.gz"
            shown = case.control_image[0, 0].numpy()
        else:
            shown = case.label.numpy() / max(1, net.control_channels - 1)
        row = {"name": case.name, "domain": case.domain, "shape": list(case.shape), "files": files,
               "affine": case.affine.tolist(), "acquisition_check": case.acquisition_check or None,
               "metrics": {"input": _metrics(case.control_image, case.truth), "output": _metrics(result, case.truth),
                           "output_before_consistency": _metrics(sampled, case.truth) if dc is not None else None}}
        if case.measurement is not None:
            probe = dc or DataConsistency(case.measurement)
            row["acquisition"] = case.measurement.acquisition.to_json(base_dir=out)
            row["residual"] = {"input": probe.residual(case.control_image), "output": probe.residual(result),
                               "output_before_consistency": probe.residual(sampled) if dc is not None else None}
            if callback is not None:
                row["latent_consistency_calls"] = callback.calls
        results.append(row)
        z_mid = case.shape[2] // 2
        panels = [(_caption(case), shown[:, :, z_mid])]
        if dc is not None:  # the ControlNet's own output beside the one with the measurements enforced
            panels.append(("ControlNet", sampled[0, 0].numpy()[:, :, z_mid]))
        panels.append(("ControlNet" + (" + DC" if dc else ""), vol[:, :, z_mid]))
        if case.truth is not None:
            panels.append(("truth", case.truth.numpy()[:, :, z_mid]))
        rows.append(panels)
    picture = save_pair_grid(out / "controlnet.png", rows,
                             title=f"ControlNet {task.task} ({objective.objective}, {sampler} {num_steps} steps)")

    def mean(part: str, key: str) -> float | None:
        vals = [r["metrics"][part][key] for r in results if r["metrics"][part] is not None]
        return float(np.mean(vals)) if vals else None

    summary = {
        "controlnet_ckpt": str(Path(cfg.controlnet_ckpt).resolve()), "control": rec.get("control"),
        "input": "measurement" if cfg.measurement else "label_map" if cfg.label_map else "simulate_from",
        "simulate_from": cfg.simulate_from, "objective": objective.objective, "condition": conditions.condition,
        "factors_from": conditions.source, "site": conditions.site if conditions.condition != "none" else None,
        "sampler": sampler, "num_steps": num_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
        "data_consistency": {"enabled": bool(cfg.data_consistency), "steps": cfg.data_consistency_steps,
                             "every": cfg.data_consistency_every, "in_paper": False},
        "cases": results,
        "mean": {part: {"psnr": mean(part, "psnr"), "ssim": mean(part, "ssim")} for part in ("input", "output")},
        "picture": picture.name,
    }
    write_json(out / "controlnet.json", summary)
    return summary

