"""meduet_diffusion probe.yaml: linear probes of per-case attributes (a lesion present or not, an organ's volume, the
age, ...) on the features of each encoder of the chain side by side, as LDAE evaluates its semantic code:

* ``meduet_content`` / ``meduet_style``: meduet_pretrain's pooled content and style (its ``model.pt`` as shipped,
  encoded over the whole latent by sliding windows of its pretraining crop, as its evaluate.yaml does);
* ``mae``: the masked-autoencoder baseline's pooled tokens (``models/baseline_mae/model.pt`` of meduet_pretrain);
* ``ldae``: the semantic code of a meduet_diffusion generator trained with ``condition: semantic`` (train.yaml with
  ldae.yaml merged on top writes ``models/ldae/model.pt``): ``net.encode_semantic`` of the latent centre-cropped /
  padded to the generator's crop and scaled. A generator with another condition leaves the row out with a note in
  ``probe.json``; it is not an error.

The probes, their subject-wise folds, bootstrap intervals and chance levels: ``meduet.metrics.probes``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data import case_name
from meduet.engines.diffusion import center_crop_or_pad
from meduet.errors import MeduetConfigError
from meduet.io import atomic_path, removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.probes import TASKS, attribute_values, check_varies, probe_attribute, subject_folds
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.windows import encode_latents
from meduet.viz import save_interval_bars
from meduet.workflows.config import WorkflowConfig

__all__ = ["Config", "run", "SOURCES", "DEFAULT_ATTRIBUTES", "markdown_table"]

#: the feature sources, in the order they are reported
SOURCES = ("meduet_content", "meduet_style", "mae", "ldae")
#: ``attributes: null`` probes those of these that every item carries (the phantoms' lesion, organ volume, age)
DEFAULT_ATTRIBUTES = ("lesion", "organ_b_ml", "age")
_MAE_HINT = ("train meduet_pretrain's masked-autoencoder baseline first (python -m monai.bundle run training "
             "--config_file \"['<meduet_pretrain>/configs/train.yaml','<meduet_pretrain>/configs/mae_baseline.yaml',"
             "'<meduet_pretrain>/configs/presets/demo.yaml']\" from the folder that holds the bundles)")
_LDAE_HINT = ("train the LDAE generator first: meduet_diffusion's train.yaml with ldae.yaml merged on top (python -m "
              "monai.bundle run training --config_file \"['<meduet_diffusion>/configs/train.yaml',"
              "'<meduet_diffusion>/configs/ldae.yaml','<meduet_diffusion>/configs/presets/demo.yaml']\" from the "
              "folder that holds the bundles; it writes models/ldae/model.pt)")
_METRICS = {"classification": (("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC-AUC")),
            "regression": (("mae", "MAE"), ("rmse", "RMSE"))}


@dataclasses.dataclass
class Config(WorkflowConfig):
    """probe.yaml: the latent datalist and its ``splits`` (null: ``longitudinal`` when the datalist has it, else
    ``test``), the ``attributes`` (a list of item keys, or ``{key: auto | classification | regression}``; null: those
    of ``DEFAULT_ATTRIBUTES`` that every item carries), the feature ``sources`` and their checkpoints, the folds, the
    bootstrap and where the report goes."""

    latent_datalist: str
    output_dir: str
    pretrain_ckpt: str | None = None
    baseline_ckpt: str | None = None
    model_ckpt: str | None = None
    splits: list | None = None
    attributes: list | dict | None = None
    sources: list = dataclasses.field(default_factory=lambda: list(SOURCES))
    folds: int = 5
    c: float = 1.0
    level: float = 0.95
    resamples: int = 2000
    seed: int = 0
    batch_size: int = 8
    device: str | torch.device = "cpu"


def _need(path: str | None, source: str, key: str, fix: str) -> str:
    """``path`` if the file exists, else a one-line error naming the source, the key and how to make the file."""
    if not path or not os.path.isfile(path):
        raise MeduetConfigError(f"{source}: checkpoint '{path}' ({key}) does not exist; {fix}, or leave '{source}' "
                                "out of sources")
    return path


def _splits(cfg: Config, cache: LatentDatalist) -> list[str]:
    present = [k for k, v in cache.data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if cfg.splits is None:
        return ["longitudinal"] if "longitudinal" in present else ["test"]
    splits = [str(s) for s in cfg.splits]
    missing = [s for s in splits if s not in present]
    if not splits or missing:
        raise MeduetConfigError(f"'{cfg.latent_datalist}' has no split {missing or splits} with items (it has "
                                f"{present}); fix the config key splits")
    return splits


def _attributes(cfg: Config, by_split: Mapping[str, list[dict]], where: str,
                notes: dict[str, str]) -> dict[str, str]:
    """``{attribute: task}``: the configured ones (each must be on every item and vary: one-line errors naming the
    datalist, split, attribute and count otherwise), or the defaults every item carries and that vary (the others
    noted)."""
    in_split = {sp: f"'{cfg.latent_datalist}' split '{sp}'" for sp in by_split}
    if cfg.attributes is not None:
        wanted = ({str(a): "auto" for a in cfg.attributes} if isinstance(cfg.attributes, (list, tuple))
                  else {str(k): str(v) for k, v in cfg.attributes.items()})
        if not wanted:
            raise MeduetConfigError("attributes is empty; name the item keys to probe (key attributes)")
        for name, task in wanted.items():
            if task not in ("auto", *TASKS):
                raise MeduetConfigError(f"attributes: task of '{name}' must be auto, classification or regression, "
                                        f"got {task!r}; fix the config key attributes")
            values = [v for sp, items in by_split.items() for v in attribute_values(items, name, in_split[sp])]
            check_varies(values, name, where)
        return wanted
    chosen = {}
    for name in DEFAULT_ATTRIBUTES:
        lacking = {sp: sum(it.get(name) is None for it in items) for sp, items in by_split.items()}
        values = {str(it.get(name)) for items in by_split.values() for it in items}
        if any(lacking.values()):
            notes[name] = (f"not probed: missing from {sum(lacking.values())} of "
                           f"{sum(len(v) for v in by_split.values())} items")
        elif len(values) < 2:
            notes[name] = f"not probed: the same value ({values.pop()}) on every item"
        else:
            chosen[name] = "auto"
    if not chosen:
        raise MeduetConfigError(f"none of the default attributes {list(DEFAULT_ATTRIBUTES)} varies over every item of "
                                f"'{cfg.latent_datalist}' splits {list(by_split)} ({notes}); name the item keys to "
                                "probe (key attributes) or set splits")
    return chosen


def _encoder(path: str, objective: str, source: str, space: LatentSpace, datalist: str,
             device: torch.device) -> PretrainedEncoder:
    model = records.load_part(path, PretrainedEncoder, device)
    if model.objective != objective:
        key = "pretrain_ckpt" if objective == "meduet" else "baseline_ckpt"
        raise MeduetConfigError(f"{source}: '{path}' ({key}) holds a {model.objective!r} encoder, not a {objective!r} "
                                "one; pass MeDUET's model.pt as pretrain_ckpt and the masked-autoencoder baseline's "
                                "as baseline_ckpt")
    LatentSpace.from_record(model.meta, path).check_same(space, path, datalist)
    return model


@torch.no_grad()
def _semantic_codes(net: torch.nn.Module, latents: Sequence[torch.Tensor], batch_size: int,
                    device: torch.device) -> np.ndarray:
    """``net.encode_semantic`` of the latents centre-cropped/padded to the generator's crop and scaled: ``(n, D)``."""
    crop = [int(c) for c in net.meta["crop_size"]]
    space = LatentSpace.from_record(net.meta)
    out = []
    for start in range(0, len(latents), batch_size):
        x = torch.stack([center_crop_or_pad(z, crop) for z in latents[start:start + batch_size]]).float()
        out.append(net.encode_semantic(space.scale(x.to(device))).float().cpu().numpy())
    return np.concatenate(out).reshape(len(latents), -1)


def _features(cfg: Config, cache: LatentDatalist, latents: list[torch.Tensor], device: torch.device,
              notes: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({source: features (n, f)}, {source: checkpoint})``; every requested checkpoint is checked before any
    encoding. ``ldae`` of a generator that is not semantic-conditioned is left out with a note."""
    unknown = [s for s in cfg.sources if s not in SOURCES]
    if unknown or not cfg.sources:
        raise MeduetConfigError(f"sources must be a non-empty list of {list(SOURCES)}, got {cfg.sources!r}; fix the "
                                "config key sources")
    wanted = [s for s in SOURCES if s in cfg.sources]
    ckpts: dict[str, str] = {}
    for s in ("meduet_content", "meduet_style"):
        if s in wanted:
            ckpts[s] = _need(cfg.pretrain_ckpt, s, "pretrain_ckpt", records.fix_hint("meduet_pretrain"))
    if "mae" in wanted:
        ckpts["mae"] = _need(cfg.baseline_ckpt, "mae", "baseline_ckpt", _MAE_HINT)
    if "ldae" in wanted:
        ckpts["ldae"] = _need(cfg.model_ckpt, "ldae", "model_ckpt", _LDAE_HINT)
    space = cache.space
    features: dict[str, np.ndarray] = {}
    if "meduet_content" in wanted or "meduet_style" in wanted:
        path = ckpts.get("meduet_content") or ckpts["meduet_style"]
        enc = encode_latents(_encoder(path, "meduet", "meduet_content", space, cfg.latent_datalist, device), latents,
                             space, device, desc="encode (MeDUET)")
        if "meduet_content" in wanted:
            features["meduet_content"] = np.stack([e["content"].numpy() for e in enc])
        if "meduet_style" in wanted:
            if "style" not in enc[0]:
                raise MeduetConfigError(f"meduet_style: '{path}' has no style head; leave meduet_style out of sources")
            features["meduet_style"] = np.stack([e["style"].numpy() for e in enc])
    if "mae" in wanted:
        base = _encoder(ckpts["mae"], "mae", "mae", space, cfg.latent_datalist, device)
        features["mae"] = np.stack([e["content"].numpy()
                                    for e in encode_latents(base, latents, space, device, desc="encode (MAE)")])
    if "ldae" in wanted:
        net = records.load(ckpts["ldae"], device, expect="dit")
        condition = getattr(net, "condition", None) or dict(net.meta).get("condition", "none")
        if condition != "semantic":
            notes["ldae"] = (f"the generator is conditioned on {condition}, not semantic; train with --condition "
                             "semantic (train.yaml with ldae.yaml merged on top)")
            del ckpts["ldae"]
        else:
            LatentSpace.from_record(net.meta, ckpts["ldae"]).check_same(space, ckpts["ldae"], cfg.latent_datalist)
            features["ldae"] = _semantic_codes(net, latents, int(cfg.batch_size), device)
    return features, ckpts


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 100 else f"{v:.3f}"


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The report as a markdown table: a row per attribute x source x metric, with its 95 % interval and the
    chance level (``results[attribute][source]`` as ``probe.json`` has them)."""
    lines = ["| attribute | task | source | metric | value | 95 % interval | chance |",
             "|---|---|---|---|---:|---|---:|"]
    for attr, by_source in results.items():
        for source, r in by_source.items():
            for key, label in _METRICS[r["task"]]:
                lo, hi = r[f"{key}_ci95"]
                lines.append(f"| {attr} | {r['task']} | {source} | {label} | {_fmt(r[key])} | [{_fmt(lo)}, {_fmt(hi)}] "
                             f"| {_fmt(r['chance'][key])} |")
    return "\n".join(lines)


def _picture(path: Path, results: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str) -> Path:
    panels = []
    for attr, by_source in results.items():
        task = next(iter(by_source.values()))["task"]
        keys = _METRICS[task]
        panels.append({
            "title": f"{attr} ({task}; dashed: chance)", "groups": [label for _, label in keys],
            "series": {s: [(r[k], *r[f"{k}_ci95"]) for k, _ in keys] for s, r in by_source.items()},
            "reference": [next(iter(by_source.values()))["chance"][k] for k, _ in keys],
            "ylabel": "higher is better" if task == "classification" else "lower is better (attribute's units)"})
    return save_interval_bars(path, panels, title=title)


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """Probe every attribute on every source's features of the items of ``splits`` -> ``<output_dir>/probe.json``
    (``results[attribute][source]``: the task, the metrics with 95 % subject-bootstrap intervals, the chance level,
    the numbers of cases and subjects; ``notes`` for what was left out and why), ``probe.png`` (bars with intervals
    per attribute, sources side by side, chance dashed) and ``probe.md`` (the markdown table, also printed)."""
    cfg = config
    device = torch.device(cfg.device)
    cache = LatentDatalist(cfg.latent_datalist)
    splits = _splits(cfg, cache)
    by_split = {sp: cache.items(sp) for sp in splits}
    items = [it for sp in splits for it in by_split[sp]]
    notes: dict[str, str] = {}
    where = f"'{cfg.latent_datalist}' split{'s' if len(splits) > 1 else ''} {', '.join(repr(s) for s in splits)}"
    attributes = _attributes(cfg, by_split, where, notes)
    subjects = [str(it.get("subject", case_name(it))) for it in items]
    subject_folds(subjects, None, int(cfg.folds), where)  # enough subjects for the folds, before any encoding
    latents = [load_latent(it["latent"]) for it in items]
    features, ckpts = _features(cfg, cache, latents, device, notes)
    if not features:
        raise MeduetConfigError(f"no source left to probe ({notes}); fix the config key sources")
    results: dict[str, dict[str, Any]] = {}
    for attr, task in attributes.items():
        values = [it[attr] for it in items]
        results[attr] = {
            source: probe_attribute(x, values, subjects, task=task, folds=int(cfg.folds), c=float(cfg.c),
                                    level=float(cfg.level), resamples=int(cfg.resamples), seed=int(cfg.seed),
                                    attribute=attr, where=where)
            for source, x in features.items()}
    report = {
        "latent_datalist": os.path.abspath(cfg.latent_datalist), "splits": splits, "cases": len(items),
        "subjects": len(set(subjects)), "subject_key": all("subject" in it for it in items),
        "attributes": {a: next(iter(results[a].values()))["task"] for a in results},
        "sources": {s: {"checkpoint": os.path.abspath(ckpts[s]), "dim": int(features[s].shape[1])} for s in features},
        "folds_requested": int(cfg.folds), "level": float(cfg.level), "resamples": int(cfg.resamples),
        "seed": int(cfg.seed),
        "results": results, "notes": notes,
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    title = (f"linear probes, subject-wise folds: split{'s' if len(splits) > 1 else ''} {', '.join(splits)} "
             f"({len(items)} cases, {len(set(subjects))} subjects)")
    report["picture"] = _picture(out / "probe.png", results, title).name
    with atomic_path(out / "probe.md", suffix=".md") as tmp:
        tmp.write_text(table + "\n" + "".join(f"\n{k}: {v}" for k, v in notes.items()) + "\n", encoding="utf-8")
    write_json(out / "probe.json", report)
    print(table)
    for k, v in notes.items():
        print(f"{k}: {v}")
    return report
