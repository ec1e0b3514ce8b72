"""meduet_pretrain evaluate.yaml: the disentanglement report (the MeDUET paper's Figure 1) on cases held out of
pretraining: linear probes and similarity ratios of MeDUET's pooled content and style (and of the masked-autoencoder
baseline's features), 2D embeddings coloured by site and by anatomy, and the style swap (``swap.style_swap_study``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet import records
from meduet.data import case_name
from meduet.errors import MeduetConfigError
from meduet.io import atomic_path, removes_partial_outputs
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.metrics.disentanglement import (bootstrap_interval, chance_level, embed_2d, fit_linear_eraser,
                                            probe_predictions, similarity_ratio)
from meduet.metrics.transfer import SWAP_TARGET
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.windows import encode_latents
from meduet.workflows.config import WorkflowConfig
from meduet.workflows.pretrain.swap import style_swap_study

__all__ = ["Config", "run"]


def _factor_metrics(features: dict[str, np.ndarray], sites: list[str], subjects: list[str]) -> dict[str, Any]:
    """Probes and similarity ratios of each feature set; each probe's ``*_ci95`` is a 95% bootstrap interval over
    resampled groups (``metrics.disentanglement.bootstrap_interval``: subjects for the site probe, sites for the
    anatomy probe), i.e. how far another draw of test cases could move the number."""
    from sklearn.metrics import balanced_accuracy_score  # optional at import time (a packaged bundle's vendored copy)

    def probe(x, labels, groups):  # one set of out-of-fold predictions for the accuracy and its interval
        pred = probe_predictions(x, labels, groups=groups)
        return float(balanced_accuracy_score(labels, pred)), list(bootstrap_interval(labels, pred, groups))

    res: dict[str, Any] = {}
    multi_subject = len(set(subjects)) > 1 and all(subjects.count(s) > 1 for s in set(subjects))
    for name, x in features.items():
        # predict the site of cases whose subject the probe never saw (leave-one-subject-out)
        acc, ci = probe(x, sites, subjects if multi_subject else None)
        r: dict[str, Any] = {"site_probe_balanced_accuracy": acc, "site_probe_ci95": ci,
                             "site_similarity": similarity_ratio(x, sites)}
        if multi_subject and len(set(sites)) > 1:
            # predict the subject (anatomy) at sites the probe never saw (leave-one-site-out)
            acc, ci = probe(x, subjects, sites)
            r["anatomy_probe_balanced_accuracy"], r["anatomy_probe_ci95"] = acc, ci
            r["anatomy_similarity"] = similarity_ratio(x, subjects)
        res[name] = r
    res["chance"] = {"site": chance_level(sites), "anatomy": chance_level(subjects)}
    return res


def _plot_embeddings(path: Path, features: dict[str, np.ndarray], sites: list[str], subjects: list[str],
                     method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(features)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 8.0), squeeze=False)
    for col, name in enumerate(names):
        xy = embed_2d(features[name], method)
        for row, (labels, what) in enumerate(((sites, "site"), (subjects, "anatomy (subject)"))):
            ax = axes[row][col]
            cats = sorted(set(labels))
            cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
            for i, cat in enumerate(cats):
                sel = np.array([lab == cat for lab in labels])
                ax.scatter(xy[sel, 0], xy[sel, 1], s=28, color=cmap(i % cmap.N), label=cat)
            ax.set_title(f"{name} — coloured by {what}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == len(names) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{method.upper()} of pooled embeddings (held-out cases)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


@dataclasses.dataclass
class Config(WorkflowConfig):
    """evaluate.yaml: the MeDUET encoder (``pretrain_ckpt``, meduet_pretrain's ``model.pt``), optionally the
    masked-autoencoder baseline's, the whole MeDUET network and the VAE that decode the style swap, the latent
    datalist split, where the report goes. A ``baseline_ckpt`` or ``network_ckpt`` that does not exist is left out.
    ``erased_rows`` (not in the paper): also report both encoders' features after a linear site eraser (LEACE)
    fitted here on the pooled features of ``erase_splits``."""

    pretrain_ckpt: str
    latent_datalist: str
    output_dir: str
    baseline_ckpt: str | None = None
    network_ckpt: str | None = None
    vae_ckpt: str | None = None
    split: str = "test"
    method: str = "tsne"
    swaps: int | None = None
    erased_rows: bool = False
    erase_splits: list = dataclasses.field(default_factory=lambda: ["training", "validation", "pretraining"])
    erase_shrinkage: float = 0.1
    device: str | torch.device = "cpu"


def _pooled(model: PretrainedEncoder, z: list[torch.Tensor], space: LatentSpace, device: torch.device, desc: str,
            raw: bool = True) -> list[dict[str, torch.Tensor]]:
    """``encode_latents`` of ``z``; ``raw``: with a site eraser stored in the content head (train.yaml's
    ``content_eraser``, not in the paper) set to identity, i.e. the content head as pretraining left it."""
    eraser = model.backbone.factors.eraser if model.objective == "meduet" else None
    if not (raw and eraser is not None and bool(eraser.fitted)):
        return encode_latents(model, z, space, device, desc=desc)
    fitted = {k: v.clone() for k, v in eraser.state_dict().items()}
    eraser.set(None, None)
    try:
        return encode_latents(model, z, space, device, desc=desc)
    finally:
        eraser.load_state_dict(fitted)


def _erased_rows(encoders: dict[str, PretrainedEncoder], features: dict[str, np.ndarray], cache: LatentDatalist,
                 splits: list[str], shrinkage: float, device: torch.device) -> dict[str, Any]:
    """Rows ``<name> + LEACE`` for each encoder: its pooled (raw) content of the test cases through a linear site
    eraser fitted on the pooled content of ``splits`` (never the test split); returns what was fitted."""
    fit_items = [it for sp in splits if sp in cache.data for it in cache.items(sp)]
    sites = [it["domain"] for it in fit_items]
    if len(set(sites)) < 2:
        raise MeduetConfigError(f"erased_rows: splits {splits} of the latent datalist hold sites {sorted(set(sites))};"
                                " the site eraser needs two or more (set erase_splits)")
    z = [load_latent(it["latent"]) for it in fit_items]
    for name, model in encoders.items():
        fit = np.stack([e["content"].numpy() for e in _pooled(model, z, cache.space, device, f"fit eraser ({name})")])
        eraser = fit_linear_eraser(fit, sites, shrinkage)
        features[f"{name} + LEACE"] = eraser(features[name]).astype(np.float32)
    return {"splits": [sp for sp in splits if sp in cache.data], "cases": len(fit_items), "sites": sorted(set(sites)),
            "shrinkage": shrinkage, "rows": [f"{n} + LEACE" for n in encoders]}


@removes_partial_outputs
def run(config: Config) -> dict[str, Any]:
    """The disentanglement report (paper Figure 1) on the latent datalist's ``split`` (cases held out of
    pretraining): probes and similarity ratios for MeDUET's pooled content and style (and the masked-autoencoder
    baseline's pooled features when ``baseline_ckpt`` is given), t-SNE/PCA plots coloured by site and by anatomy
    (subject), and with ``network_ckpt`` + ``vae_ckpt`` the style-swap study. Writes ``metrics.json``,
    ``embeddings_2d.png``, ``style_swap.png`` to ``output_dir`` and returns the metrics.

    Every headline row is raw, as pretraining left the encoders: ``MeDUET content`` is the content head's output
    (a site eraser stored by train.yaml's ``content_eraser`` option is bypassed; it gets its own row, ``MeDUET
    content, stored eraser``), ``MAE baseline`` the baseline's pooled tokens. With ``erased_rows`` both get a
    ``+ LEACE`` row, erased the same way (not in the paper)."""
    cfg = config
    pretrain_ckpt, latent_datalist, split = cfg.pretrain_ckpt, cfg.latent_datalist, cfg.split
    device = torch.device(cfg.device)
    baseline_ckpt = cfg.baseline_ckpt if cfg.baseline_ckpt and os.path.isfile(cfg.baseline_ckpt) else None
    network_ckpt = cfg.network_ckpt if cfg.network_ckpt and os.path.isfile(cfg.network_ckpt) else None
    vae_ckpt = cfg.vae_ckpt
    out = Path(cfg.output_dir)
    model = records.load_part(pretrain_ckpt, PretrainedEncoder, device)
    if model.objective != "meduet":
        raise MeduetConfigError(f"'{pretrain_ckpt}' holds the masked-autoencoder baseline; pass it as baseline_ckpt "
                                f"and a MeDUET checkpoint as pretrain_ckpt")
    cache = LatentDatalist(latent_datalist)
    latents, space = cache.data, cache.space
    LatentSpace.from_record(model.meta, pretrain_ckpt).check_same(space, pretrain_ckpt, latent_datalist)
    items = cache.items(split)
    if len(items) < 4:
        raise MeduetConfigError(f"'{latent_datalist}' split '{split}' has {len(items)} items; the probes need more")
    z = [load_latent(it["latent"]) for it in items]
    enc = _pooled(model, z, space, device, "encode (MeDUET)")
    features = {"MeDUET content": np.stack([e["content"].numpy() for e in enc]),
                "MeDUET style": np.stack([e["style"].numpy() for e in enc])}
    encoders = {"MeDUET content": model}
    stored = model.meta.get("content_eraser") if bool(model.backbone.factors.eraser.fitted) else None
    if stored:
        erased = _pooled(model, z, space, device, "encode (MeDUET, stored eraser)", raw=False)
        features["MeDUET content, stored eraser"] = np.stack([e["content"].numpy() for e in erased])
    if baseline_ckpt:
        base = records.load_part(baseline_ckpt, PretrainedEncoder, device)
        LatentSpace.from_record(base.meta, baseline_ckpt).check_same(space, baseline_ckpt, latent_datalist)
        benc = _pooled(base, z, space, device, "encode (MAE baseline)")
        features["MAE baseline"] = np.stack([e["content"].numpy() for e in benc])
        encoders["MAE baseline"] = base
    erasure = (_erased_rows(encoders, features, cache, list(cfg.erase_splits), cfg.erase_shrinkage, device)
               if cfg.erased_rows else None)
    sites = [it["domain"] for it in items]
    subjects = [str(it.get("subject", case_name(it))) for it in items]
    metrics: dict[str, Any] = {
        "split": split, "cases": len(items), "sites": sorted(set(sites)), "subjects": len(set(subjects)),
        "pretrain_ckpt": os.path.abspath(pretrain_ckpt),
        "baseline_ckpt": baseline_ckpt and os.path.abspath(baseline_ckpt),
        "factors": _factor_metrics(features, sites, subjects),
    }
    if stored:
        metrics["stored_content_eraser"] = stored
    if erasure:
        metrics["erased_rows"] = erasure
    # how the model was pretrained, from its checkpoint record (older checkpoints lack these keys)
    metrics["pretraining"] = {k: model.meta[k] for k in ("loss", "augmentation") if k in model.meta}
    _plot_embeddings(out / "embeddings_2d.png", features, sites, subjects, cfg.method)
    metrics["plot"] = "embeddings_2d.png"
    if vae_ckpt and not network_ckpt:
        metrics["style_swap"] = {"note": f"skipped: no whole MeDUET network at '{cfg.network_ckpt}' (meduet_pretrain's "
                                         "models/training_network.pt, key network_ckpt)"}
    if vae_ckpt and network_ckpt:
        network = records.load(network_ckpt, device, expect="meduet")
        vae = records.load(records.require(vae_ckpt, "meduet_vae"), device, expect="vae")
        if latents.get("vae_config_hash") and vae.meta.get("config_hash") not in (None, latents["vae_config_hash"]):
            raise MeduetConfigError(f"VAE '{vae_ckpt}' is not the one that encoded '{latent_datalist}' (config hash "
                                    f"{vae.meta.get('config_hash')} vs {latents['vae_config_hash']}); set vae_ckpt")
        metrics["style_swap"] = style_swap_study(network, vae, latents, items, out, cfg.swaps, device)
    f = metrics["factors"]
    targets = {
        "style_site_probe>=0.9": f["MeDUET style"]["site_probe_balanced_accuracy"] >= 0.9,
        "content_site_probe<=chance+0.15": f["MeDUET content"]["site_probe_balanced_accuracy"]
        <= f["chance"]["site"] + 0.15,
    }
    swap = (metrics.get("style_swap") or {}).get("mean")
    if swap:
        # a quarter of the gap to the target site's intensities as this VAE renders them (docs/README.md)
        targets["style_swap_gap_closed>=0.25"] = swap["gap_closed"] >= SWAP_TARGET
    if "MAE baseline" in f:
        targets["baseline_site_probe>content_site_probe"] = (
            f["MAE baseline"]["site_probe_balanced_accuracy"] > f["MeDUET content"]["site_probe_balanced_accuracy"])
    metrics["targets_met"] = targets
    with atomic_path(out / "metrics.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    print(f"meduet_pretrain evaluate: {json.dumps(targets)} -> {out / 'metrics.json'}")
    return metrics
