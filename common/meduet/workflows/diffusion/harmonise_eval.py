"""meduet_diffusion harmonise_eval.yaml: served harmonisation measured on travelling subjects (the sample phantoms'
test split renders every subject at every site): each scan of a subject harmonised to every other site, compared on
the input grid with the real scan of that subject at that site."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, Invertd, ScaleIntensityRanged

from meduet.data import case_name, get_split
from meduet.errors import MeduetConfigError
from meduet.io import atomic_path, removes_partial_outputs, write_json
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.transfer import eta_squared, region_means
from meduet.viz import save_pair_grid
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.diffusion.common import progress_enabled
from meduet.workflows.diffusion.harmonise import GENERATE_MODES, Harmoniser
from meduet.workflows.diffusion.harmonise_serve import as_prediction

__all__ = ["Config", "run", "METRICS"]

#: per-pair numbers averaged (with 95 % bootstrap intervals) in ``harmonise_eval.json``
METRICS = ("gap_closed", "gap_closed_vs_rec", "rec_gap_closed", "vae_ceiling", "regions_moved_toward",
           "anatomy_kept", "anatomy_rec", "anatomy_source")


@dataclasses.dataclass
class Config(WorkflowConfig):
    """harmonise_eval.yaml: the ``Harmoniser`` (harmonise.json's network), the image datalist and split of travelling
    subjects, which sources and targets, the sampling settings (as harmonise.json's inferer)."""

    network: Any
    datalist: str
    output_dir: str
    data_split: str = "test"
    targets: Sequence[str] | None = None
    max_sources: int | None = None
    heldout_styles: bool = True
    num_steps: int = 30
    guidance_scale: float = 1.5
    strength: float = 0.6
    generate: str = "windows"
    window_overlap: float = 0.5
    seed: int = 0
    resamples: int = 2000
    pictures: int = 6


def _to_grid(h: Harmoniser, preprocessing) -> Compose:
    """harmonise.json's postprocessing without the writer: back to the input grid, Hounsfield units for CT."""
    lo, hi = (float(v) for v in h.preprocessing.get("ct_window", (-175.0, 250.0))) if h.modality == "CT" else (0.0, 1.0)
    return Compose([Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False,
                            to_tensor=True),
                    ScaleIntensityRanged(keys="pred", a_min=0.0, a_max=1.0, b_min=lo, b_max=hi, clip=True)])


def _volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def _sources(items: list[dict], max_sources: int | None) -> list[dict]:
    """Scans of subjects rendered at two sites or more, sorted by subject and site; ``max_sources`` spread evenly."""
    counts: dict[str, int] = {}
    for it in items:
        counts[str(it.get("subject"))] = counts.get(str(it.get("subject")), 0) + 1
    chosen = sorted((it for it in items if it.get("subject") is not None and counts[str(it["subject"])] > 1),
                    key=lambda it: (str(it["subject"]), str(it["domain"])))
    if max_sources is not None and 0 < max_sources < len(chosen):
        chosen = [chosen[int(i)] for i in np.linspace(0, len(chosen) - 1, max_sources).round()]
    return chosen


def _summary(rows: list[dict], resamples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": len(rows)}
    for key in METRICS:
        values = [r[key] for r in rows if np.isfinite(r[key])]
        if not values:
            continue
        out[key] = float(np.mean(values))
        out[f"{key}_ci95"] = list(bootstrap_mean_interval(values, resamples=resamples)) if len(values) > 1 else [
            out[key], out[key]]
    return out


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """For every scan A (subject s, site a) of ``data_split`` (``max_sources`` of them) and every other site b of s
    (``targets``): A harmonised to b through the served pipeline (harmonise.json's preprocessing, ``Harmoniser``,
    MONAI ``Invertd`` back to A's grid, HU), compared with T = s's real scan at b on s's label map (the same grid).

    Target style: site b's mean style from the network's style bank; for a site the bank lacks (held out of
    training) with ``heldout_styles``, the mean style of the split's scans of b from the *other* subjects (never T).
    With ``d(x)`` = mean over label regions of ``|mean_r(x) - mean_r(T)|`` (real scans clipped to the CT window,
    the range the chain renders), per pair: ``gap_closed = 1 - d(out) / d(A)`` (the served answer against the
    unchanged input), ``gap_closed_vs_rec = 1 - d(out) / d(rec)`` (against the round trip under A's own condition,
    transfer.yaml's number), ``rec_gap_closed = 1 - d(rec) / d(A)`` (what the round trip alone moves),
    ``vae_ceiling = 1 - d(vae(T)) / d(A)`` (T's own VAE round trip: what this VAE renders of T),
    ``regions_moved_toward`` (share of regions whose mean got closer to T's), ``anatomy_kept = eta2(out) / eta2(T)``
    (variance in the body explained by s's label regions, as transfer.yaml), ``anatomy_rec``, ``anatomy_source``.
    Means with 95 % bootstrap intervals over pairs (pairs resampled; pairs share subjects and source scans, so
    the intervals are narrower than independent pairs would give), overall and by target group (sites in the style
    bank / held out). Writes ``harmonise_eval.json``, ``harmonise_eval.md`` and ``harmonise_eval.png``.
    """
    cfg = config
    h: Harmoniser = cfg.network
    if cfg.generate not in GENERATE_MODES:
        raise MeduetConfigError(f"generate must be one of {GENERATE_MODES}, got {cfg.generate!r}; fix --generate")
    items = get_split(cfg.datalist, cfg.data_split)
    missing = [k for k in ("subject", "label") if not all(k in it for it in items)]
    if missing:
        raise MeduetConfigError(f"{cfg.datalist}: split '{cfg.data_split}' items lack {missing}; harmonisation is "
                                "measured on travelling subjects (items with 'subject' and 'label' rendered at several "
                                "sites, as the sample phantoms' test split)")
    preprocessing = h.load_transforms()
    to_grid = _to_grid(h, preprocessing)
    lo, hi = (float(v) for v in h.preprocessing.get("ct_window", (-175.0, 250.0))) if h.modality == "CT" else (0, 1)
    known = set(h.known_sites())
    settings = {"num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale, "strength": cfg.strength,
                "generate": cfg.generate, "window_overlap": cfg.window_overlap, "seed": cfg.seed}
    by_key = {(str(it["subject"]), str(it["domain"])): it for it in items}
    styles: dict[str, torch.Tensor] = {}

    def load(it: dict) -> tuple[dict, Any]:
        """Preprocessed scan and its encoding (its style kept for the held-out sites' leave-subject-out means)."""
        data = preprocessing({"image": it["image"]})
        enc = h.encode(data["image"].as_tensor()[None])
        if enc.cond and "style" in enc.cond:
            styles[it["image"]] = enc.cond["style"]
        return data, enc

    def style(it: dict) -> torch.Tensor:
        if it["image"] not in styles:
            load(it)
        return styles[it["image"]]

    def on_grid(data: dict, image01: torch.Tensor) -> np.ndarray:
        pred = as_prediction(data["image"], image01[0].cpu())
        return np.asarray(to_grid({"image": data["image"], "pred": pred})["pred"], dtype=np.float32)[0]

    def target_cond(enc, a_item: dict, site: str):
        if site in known:
            return h.target_condition(enc, site), "bank"
        if h.condition != "factors" or not cfg.heldout_styles:
            return None, None
        refs = [it for (s, d), it in by_key.items() if d == site and s != str(a_item["subject"])]
        if not refs:
            return None, None
        return h.target_condition(enc, None, torch.cat([style(r) for r in refs]).mean(0, keepdim=True)), "heldout"

    rows, pictures, skipped = [], [], []
    sources = _sources(items, cfg.max_sources)
    if not sources:
        raise MeduetConfigError(f"{cfg.datalist}: no subject of split '{cfg.data_split}' is rendered at two sites; "
                                "harmonisation needs travelling subjects")
    ceiling: dict[str, float] = {}
    for n, a in enumerate(sources):
        if progress_enabled():
            print(f"harmonise_eval: source {n + 1}/{len(sources)} {case_name(a)}", flush=True)
        data, enc = load(a)
        a_img = _volume(a["image"])[0]
        lab = np.rint(_volume(a["label"])[0]).astype(np.int64)
        noise = (h.invert(enc, cfg.num_steps, cfg.generate, cfg.window_overlap)
                 if h.objective.objective == "rflow" else None)
        rec = on_grid(data, h.render(enc, enc.cond, noise, **settings))
        sites = [d for (s, d) in by_key if s == str(a["subject"]) and d != str(a["domain"])]
        for site in sorted(sites):
            if cfg.targets is not None and site not in cfg.targets:
                continue
            t = by_key[(str(a["subject"]), site)]
            cond, group = target_cond(enc, a, site)
            if cond is None:
                skipped.append(f"{case_name(a)} -> {site}")
                continue
            out = on_grid(data, h.render(enc, cond, noise, **settings))
            t_img = _volume(t["image"])[0]
            if t_img.shape != a_img.shape or out.shape != a_img.shape:
                raise MeduetConfigError(f"{t['image']}: not on the grid of {a['image']} ({t_img.shape} vs "
                                        f"{a_img.shape}); travelling subjects must share their label map's grid")
            regions = [r for r in range(1, int(lab.max()) + 1) if (lab == r).sum() >= 8]
            a_c, t_c = np.clip(a_img, lo, hi), np.clip(t_img, lo, hi)
            mu_t = region_means(t_c, lab, regions)

            def gap(x: np.ndarray) -> float:
                return float(np.abs(region_means(x, lab, regions) - mu_t).mean())

            if t["image"] not in ceiling:
                t_data, t_enc = load(t)
                ceiling[t["image"]] = gap(on_grid(t_data, h.decode(t_enc.latent[t_enc.inner])))
            d_a, d_rec, d_out = gap(a_c), gap(rec), gap(out)
            eta_t = eta_squared(t_c, lab)
            moved = np.abs(region_means(out, lab, regions) - mu_t) < np.abs(region_means(a_c, lab, regions) - mu_t)
            rows.append({"source": case_name(a), "target": case_name(t), "site_from": str(a["domain"]),
                         "site_to": site, "style": group, "d_source": d_a, "d_rec": d_rec, "d_out": d_out,
                         "d_vae": ceiling[t["image"]],
                         "gap_closed": 1.0 - d_out / max(d_a, 1e-8), "gap_closed_vs_rec": 1.0 - d_out / max(d_rec, 1e-8),
                         "rec_gap_closed": 1.0 - d_rec / max(d_a, 1e-8),
                         "vae_ceiling": 1.0 - ceiling[t["image"]] / max(d_a, 1e-8),
                         "regions_moved_toward": float(moved.mean()),
                         "anatomy_kept": eta_squared(out, lab) / eta_t if eta_t > 0 else float("nan"),
                         "anatomy_rec": eta_squared(rec, lab) / eta_t if eta_t > 0 else float("nan"),
                         "anatomy_source": eta_squared(a_c, lab) / eta_t if eta_t > 0 else float("nan")})
            if len(pictures) < cfg.pictures and site not in {p[0] for p in pictures}:
                z = a_img.shape[2] // 2
                scale = (lambda v: (np.clip(v, lo, hi) - lo) / (hi - lo))  # noqa: E731
                pictures.append((site, [(f"A {a['domain']}", scale(a_img[:, :, z])), ("round trip", scale(rec[:, :, z])),
                                        (f"A -> {site}", scale(out[:, :, z])), (f"real {site} (T)", scale(t_img[:, :, z]))]))
    if not rows:
        raise MeduetConfigError(f"no (source, target) pair could be harmonised on '{cfg.datalist}' split "
                                f"'{cfg.data_split}' (targets {cfg.targets}); known sites: {sorted(known)}")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "objective": h.objective.objective, "condition": h.condition, "generate": cfg.generate,
        "method": "rflow inversion" if h.objective.objective == "rflow" else f"sdedit strength {cfg.strength}",
        "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale, "style_bank": sorted(known),
        "style_bank_split": getattr(h.site_styles, "split", None), "sources": len(sources),
        "all": _summary(rows, cfg.resamples),
        "by_target": {g: _summary([r for r in rows if r["style"] == g], cfg.resamples)
                      for g in ("bank", "heldout") if any(r["style"] == g for r in rows)},
        "skipped": skipped, "rows": rows}
    summary["picture"] = save_pair_grid(out_dir / "harmonise_eval.png", [p[1] for p in pictures],
                                        title=f"served harmonisation ({summary['method']}, {cfg.generate})").name
    write_json(out_dir / "harmonise_eval.json", summary)
    table = markdown_table(summary)
    with atomic_path(out_dir / "harmonise_eval.md", suffix=".md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """The means and intervals of ``harmonise_eval.json`` as a markdown table (rows: all pairs, by target group)."""
    groups = [("all pairs", summary["all"])] + [
        (f"targets {'in the style bank' if g == 'bank' else 'held out (leave-subject-out style)'}", s)
        for g, s in summary["by_target"].items()]
    keys = ("gap_closed", "gap_closed_vs_rec", "rec_gap_closed", "vae_ceiling", "regions_moved_toward",
            "anatomy_kept", "anatomy_rec")
    lines = ["| pairs | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, s in groups:
        cells = [f"{s[k]:.3f} [{s[k + '_ci95'][0]:.3f}, {s[k + '_ci95'][1]:.3f}]" if k in s else "-" for k in keys]
        lines.append(f"| {name} ({s['pairs']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
