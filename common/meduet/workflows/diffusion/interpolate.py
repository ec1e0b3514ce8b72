"""meduet_diffusion interpolate.yaml: semantic interpolation with a generator that has a code per scan (an LDAE,
condition ``semantic``, or MeDUET factors, condition ``factors``: ``meduet.workflows.diffusion.codes``) between two
scans of one subject -- invert both latents to noise under their own codes, slerp the noises, lerp the codes, decode
the intermediate -- measured on the longitudinal phantoms, whose true intermediate visit exists, against linear
interpolation of the latents and of the images."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data import get_load_transforms
from meduet.engines.diffusion import center_crop_or_pad
from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.reconstruction import reconstruction_metrics
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.codes import GeneratorCodes
from meduet.workflows.diffusion.common import check_vae, decode, fit_slices, save_volume

__all__ = ["Config", "run", "slerp", "lerp", "triplets", "METHODS"]

#: how the intermediate scan is made
METHODS = {"ldae": "slerp of the inverted noises + lerp of the codes -> diffusion decoder -> VAE",
           "latent_lerp": "linear interpolation of the two latents -> VAE",
           "image_lerp": "linear interpolation of the two preprocessed scans"}


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per sample of ``a, b (B, ...)`` at weight ``w`` in [0, 1] (the angle between the
    flattened samples; linear where they are parallel)."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    s = torch.sin(theta)
    small = s < 1e-6
    s = torch.where(small, torch.ones_like(s), s)
    ka = torch.where(small, 1.0 - w, torch.sin((1.0 - w) * theta) / s)
    kb = torch.where(small, torch.full_like(s, w), torch.sin(w * theta) / s)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return ka.view(shape) * a + kb.view(shape) * b


def lerp(a: Any, b: Any, w: float) -> Any:
    return (1.0 - w) * a + w * b


def triplets(items: list[dict[str, Any]]) -> list[tuple[dict, dict, dict, float]]:
    """``(first, middle, last, weight)`` per subject with >= 3 scans ordered by ``age`` (else ``visit``): the first
    and last scans are the ends, every scan between them a target at ``weight = (age - age_first) /
    (age_last - age_first)``."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        by_subject[str(it.get("subject"))].append(it)
    out = []
    for subject in sorted(by_subject):
        scans = sorted(by_subject[subject], key=lambda it: float(it.get("age", it.get("visit", 0))))
        if len(scans) < 3 or subject == "None":
            continue
        t0, t1 = (float(scans[k].get("age", scans[k].get("visit", k))) for k in (0, -1))
        for mid in scans[1:-1]:
            w = (float(mid.get("age", mid.get("visit", 0))) - t0) / (t1 - t0) if t1 > t0 else 0.5
            out.append((scans[0], mid, scans[-1], w))
    return out


@dataclasses.dataclass
class Config(WorkflowConfig):
    """interpolate.yaml: the generator (LDAE, or factors-conditioned with its ``pretrain_ckpt``), the VAE, the latent
    datalist split with several scans per subject
    (``longitudinal``: ``subject``, ``age``/``visit`` keys) or two named scans (``cases``), the sampler steps."""

    model_ckpt: str
    vae_ckpt: str
    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    split: str = "longitudinal"
    #: two case names (latent file names without .nii.gz) to interpolate between at ``weights``, instead of the
    #: evaluation on every subject's visits
    cases: list | None = None
    weights: list | None = None
    allow_different_subjects: bool = False
    max_subjects: int = 0
    num_steps: int = 50
    save_volumes: bool = True
    device: str | torch.device = "cpu"


class _Interpolator:
    """What every interpolation shares: the generator, the VAE, the crop and the image transform."""

    def __init__(self, cfg: Config) -> None:
        self.device = torch.device(cfg.device)
        self.codes = GeneratorCodes(cfg.model_ckpt, cfg.pretrain_ckpt, self.device)
        self.net, self.objective, self.rec = self.codes.net, self.codes.objective, self.codes.rec
        self.vae = records.load(cfg.vae_ckpt, self.device, expect="vae")
        check_vae(self.vae, self.rec, cfg.vae_ckpt, cfg.model_ckpt)
        self.space = LatentSpace.from_record(self.rec, cfg.model_ckpt)
        self.crop = [int(c) for c in self.rec["crop_size"]]
        self.f = int(self.rec.get("downsample_factor") or 4)
        self.sampler = "rflow" if self.objective.objective == "rflow" else "ddim"
        self.steps = int(cfg.num_steps)
        self.transform = get_load_transforms(**dict(self.rec.get("preprocessing") or {}), keys=("image",))
        self._ends: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def latent(self, item: dict[str, Any]) -> torch.Tensor:
        return self.space.scale(center_crop_or_pad(load_latent(item["latent"]), self.crop)[None].float()
                                .to(self.device))

    def image(self, item: dict[str, Any]) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The preprocessed scan in the crop's frame (zero outside the scan) and the region the scan fills."""
        img = np.asarray(self.transform({"image": item["image"]})["image"])[0].astype(np.float32)
        fit, src = fit_slices([s // self.f for s in img.shape], self.crop)
        out = np.zeros([c * self.f for c in self.crop], dtype=np.float32)
        region = tuple(slice(s.start * self.f, s.stop * self.f) for s in fit)
        out[region] = img[tuple(slice(s.start * self.f, s.stop * self.f) for s in src)]
        return out, region

    def ends(self, item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latent, code, inverted noise)`` of an end scan (cached: a subject's ends serve every target)."""
        key = item["latent"]
        if key not in self._ends:
            x = self.latent(item)
            code = self.codes.encode(x)
            noise = invert_latents(self.net, x, self.codes.cond(code), self.objective, num_steps=self.steps)
            if len(self._ends) >= 4:  # a subject's two ends serve its targets; older subjects' are dropped
                self._ends.clear()
            self._ends[key] = (x, code, noise)
        return self._ends[key]

    def between(self, a: dict[str, Any], b: dict[str, Any], w: float) -> dict[str, np.ndarray]:
        """The intermediate at weight ``w`` by every method of ``METHODS`` (images in the crop's frame)."""
        xa, ca, na = self.ends(a)
        xb, cb, nb = self.ends(b)
        z = sample_latents(self.net, list(xa.shape), self.codes.cond(lerp(ca, cb, w)), self.objective, self.sampler,
                           self.steps, noise=slerp(na, nb, w))
        ldae, latent_lerp = decode(self.vae, torch.cat([z, lerp(xa, xb, w)]), self.space)
        ia, ib = self.image(a)[0], self.image(b)[0]
        return {"ldae": ldae, "latent_lerp": latent_lerp, "image_lerp": lerp(ia, ib, w)}


def _named(items: list[dict[str, Any]], name: str, split: str, datalist: str) -> dict[str, Any]:
    for it in items:
        if Path(it["latent"]).name.replace(".nii.gz", "") == str(name):
            return it
    raise MeduetInputError(f"case '{name}' is not in split '{split}' of '{datalist}'; --cases takes two latent file "
                           "names of that split (without .nii.gz)")


def _two_scans(cfg: Config, items: list[dict[str, Any]], ip: _Interpolator, out: Path) -> dict[str, Any]:
    if len(cfg.cases or []) != 2:
        raise MeduetConfigError(f"cases must name exactly two scans, got {cfg.cases}")
    a, b = (_named(items, c, cfg.split, cfg.latent_datalist) for c in cfg.cases)  # type: ignore[union-attr]
    if a.get("subject") != b.get("subject") and not cfg.allow_different_subjects:
        raise MeduetInputError(f"'{cfg.cases[0]}' (subject {a.get('subject')}) and '{cfg.cases[1]}' (subject "
                               f"{b.get('subject')}) are scans of different subjects; interpolation is meant between "
                               "scans of one subject; pass --allow_different_subjects True to do it anyway")
    weights = [float(w) for w in (cfg.weights or [0.25, 0.5, 0.75])]
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise MeduetConfigError(f"weights must lie in [0, 1], got {weights}")
    row = [("A", ip.image(a)[0])]
    files = []
    for w in weights:
        vol = ip.between(a, b, w)["ldae"]
        row.append((f"w={w:g}", vol))
        if cfg.save_volumes:
            files.append(save_volume(out / f"interp_{w:g}.nii.gz", vol, ip.rec).name)
    row.append(("B", ip.image(b)[0]))
    mid = [(name, v[:, :, v.shape[2] // 2]) for name, v in row]
    picture = save_pair_grid(out / "interpolate.png", [mid], title=f"semantic interpolation ({ip.codes.condition}) "
                                                                   f"{cfg.cases[0]} -> {cfg.cases[1]}")
    summary = {"cases": list(cfg.cases), "weights": weights, "volumes": files, "picture": picture.name}  # type: ignore
    write_json(out / "interpolate.json", summary)
    return summary


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Interpolate -> ``<output_dir>/interpolate.json`` and ``interpolate.png``.

    Evaluation (``cases`` unset): for every subject of ``split`` with >= 3 scans, its first and last scans are the
    ends and every scan between them a target; each method of ``METHODS`` makes the intermediate at the target's
    weight (its age between the ends' ages) and is scored against the true intermediate scan (preprocessed, in the
    generator's crop) by SSIM, MS-SSIM, PSNR and MSE over the region the scan fills, with 95 % bootstrap intervals
    over targets. ``ldae_vae_ceiling``: the VAE decoding the target's own latent (what any latent-space method can
    reach). Two named scans (``cases``): their intermediates at ``weights`` as NIfTI volumes and a picture; scans
    of different subjects need ``allow_different_subjects``."""
    cfg = config
    items = LatentDatalist(cfg.latent_datalist).items(cfg.split)
    if not items:
        raise MeduetConfigError(f"split '{cfg.split}' of '{cfg.latent_datalist}' has no latents; make the sample data "
                                "with --longitudinal-subjects N and encode it (meduet_vae encode.yaml), or choose "
                                "another --split")
    out = Path(cfg.output_dir)
    ip = _Interpolator(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.cases:
        return _two_scans(cfg, items, ip, out)
    chosen = triplets(items)
    if not chosen:
        raise MeduetConfigError(f"split '{cfg.split}' of '{cfg.latent_datalist}' has no subject with 3 or more scans "
                                "(items need 'subject' and 'age' or 'visit' keys): nothing between two scans to "
                                "compare with")
    if cfg.max_subjects:
        keep = sorted({str(a.get("subject")) for a, _, _, _ in chosen})[: cfg.max_subjects]
        chosen = [t for t in chosen if str(t[0].get("subject")) in keep]
    rows, pictures = [], []
    for a, mid, b, w in chosen:
        truth, region = ip.image(mid)
        made = ip.between(a, b, w)
        made["ldae_vae_ceiling"] = decode(ip.vae, ip.latent(mid), ip.space)[0]
        target = torch.as_tensor(truth[region])[None, None]
        row: dict[str, Any] = {"subject": a.get("subject"), "target": Path(mid["latent"]).name, "weight": w,
                               "age": mid.get("age")}
        for name, vol in made.items():
            v = vol[region]
            m = reconstruction_metrics(torch.as_tensor(v)[None, None], target)
            row.update({f"ssim_{name}": m["ssim"], f"ms_ssim_{name}": m["ms_ssim"], f"psnr_{name}": m["psnr"],
                        f"mse_{name}": float(np.mean((np.clip(v, 0, 1) - truth[region]) ** 2))})
        rows.append(row)
        if cfg.save_volumes:
            save_volume(out / f"{Path(mid['latent']).name.replace('.nii.gz', '')}_ldae.nii.gz", made["ldae"], ip.rec)
        if len(pictures) < 4:
            k = truth.shape[2] // 2
            pictures.append([("first", ip.image(a)[0][:, :, k]), ("true middle", truth[:, :, k])]
                            + [(name, made[name][:, :, k]) for name in METHODS] + [("last", ip.image(b)[0][:, :, k])])
    keys = [k for k in rows[0] if k.split("_")[0] in ("ssim", "ms", "psnr", "mse")]
    summary: dict[str, Any] = {
        "model_ckpt": os.path.abspath(cfg.model_ckpt), "condition": ip.codes.condition, "code": ip.codes.what,
        "split": cfg.split, "methods": METHODS,
        "sampler": ip.sampler, "num_steps": ip.steps, "targets": rows,
        "subjects": len({r["subject"] for r in rows}),
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
        "ci95": {k: list(bootstrap_mean_interval([r[k] for r in rows])) for k in keys},
    }
    summary["picture"] = save_pair_grid(out / "interpolate.png", pictures,
                                        title=f"interpolation to the middle visit: codes ({ip.codes.condition}) vs "
                                              "linear baselines").name
    write_json(out / "interpolate.json", summary)
    mean = summary["mean"]
    print("| method | SSIM | MSE |\n|---|---|---|")
    for name in [*METHODS, "ldae_vae_ceiling"]:
        print(f"| {name} | {mean[f'ssim_{name}']:.3f} | {mean[f'mse_{name}']:.4f} |")
    return summary
