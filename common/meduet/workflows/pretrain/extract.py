"""meduet_pretrain extract.yaml (``run``) and inference.json (``EmbeddingWriter``): content and style embeddings of
whole cached latents (``meduet.networks.windows.encode_latents``), for the downstream bundles and for probes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import decollate_batch

from meduet import records
from meduet.data import case_name
from meduet.engines.checkpoint import atomic_save
from meduet.io import removes_partial_outputs, write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.windows import encode_latents, style_vector
from meduet.workflows.config import WorkflowConfig

__all__ = ["Config", "run", "EmbeddingWriter"]


@dataclasses.dataclass
class Config(WorkflowConfig):
    """extract.yaml: the pretraining checkpoint, the latent datalist and splits to embed, where they go."""

    pretrain_ckpt: str
    latent_datalist: str
    output_dir: str
    splits: Sequence[str] = ("training", "validation", "test")
    maps: bool = True
    device: str | torch.device = "cpu"


@removes_partial_outputs
def run(config: Config) -> str:
    """Content and style embeddings of every item of the latent datalist's ``splits``.

    Writes ``<output_dir>/<split>/<case>.pt`` (``content (D,)``, ``style (Ds,)`` / ``(2 Ds,)``, with ``maps``:
    ``content_map (D, g1, g2, g3)``, ``style_map (Ds, g...)``; ``torch.load(weights_only=True)`` reads them) and
    ``<output_dir>/embeddings.json``: the items (with ``embedding`` paths relative to it, ``domain``,
    ``domain_index``) and what a downstream stage needs (``objective``, ``content_dim``, ``style_dim``,
    ``domains``, the latent facts). Returns the index path.
    """
    cfg = config
    pretrain_ckpt, latent_datalist, device = cfg.pretrain_ckpt, cfg.latent_datalist, cfg.device
    network = records.load_part(pretrain_ckpt, PretrainedEncoder, device)
    cache = LatentDatalist(latent_datalist)
    latents = cache.data
    space = cache.space
    LatentSpace.from_record(network.meta, pretrain_ckpt).check_same(space, pretrain_ckpt, latent_datalist)
    out = Path(cfg.output_dir)
    index: dict[str, Any] = {
        "name": f"{latents.get('name', 'latents')}_embeddings",
        "pretrain_ckpt": os.path.abspath(pretrain_ckpt),
        "latent_datalist": os.path.abspath(latent_datalist),
        "objective": network.objective,
        "content_dim": network.dim,
        "style_dim": network.style_dim,  # channels of style_map
        "style_pool": network.style_pool,
        "style_vector_dim": network.style_vector_dim,  # width of the pooled style
        "patch_size": network.patch_size,
        **{k: latents[k] for k in ("domains", "heldout_domains", "labels", "latent_channels", "downsample_factor",
                                   "latent_scale_factor", "vae_config_hash") if k in latents},
    }
    for split in cfg.splits:
        if split not in latents:
            continue
        items = cache.items(split)
        encoded = encode_latents(network, [load_latent(it["latent"]) for it in items], space, device,
                                 desc=f"extract {split}")
        rows = []
        for item, enc in zip(items, encoded):
            name = case_name(item)
            rel = f"{split}/{name}.pt"
            keep = {k: v for k, v in enc.items() if cfg.maps or not k.endswith("_map")}
            atomic_save(keep, out / rel)
            rows.append({**item, "embedding": rel})
        index[split] = rows
    path = write_json(out / "embeddings.json", index)
    print(f"meduet_pretrain extract: {sum(len(index.get(s, [])) for s in cfg.splits)} embeddings -> {path}")
    return str(path)


class EmbeddingWriter:
    """Ignite handler for inference.json: after every iteration writes ``<output_dir>/<case>.pt`` with the pooled
    ``content`` / ``style`` vectors and the ``content_map`` / ``style_map`` taken from the evaluator's ``pred`` (the
    ``PretrainedEncoder`` factor map ``(D [+ Ds], g1, g2, g3)`` per item; content channels first), and at the end
    ``<output_dir>/embeddings.json`` listing them with each item's ``domain``. Items name their case by
    ``latent_path`` (else the input's file name)."""

    def __init__(self, output_dir: str, content_dim: int, style_pool: str = "mean") -> None:
        self.output_dir = Path(output_dir)
        self.content_dim = int(content_dim)
        self.style_pool = style_pool
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._index)

    def _write(self, engine) -> None:
        batch, outputs = engine.state.batch, engine.state.output
        batch = batch if isinstance(batch, list) else decollate_batch(batch)
        outputs = outputs if isinstance(outputs, list) else decollate_batch(outputs)
        for item, out in zip(batch, outputs):
            fmap = out["pred"]
            fmap = (fmap.as_tensor() if hasattr(fmap, "as_tensor") else fmap).detach().float().cpu()
            path = item.get("latent_path") or getattr(item.get("image"), "meta", {}).get("filename_or_obj", "case")
            name = case_name({"image": str(path)})
            rec = {"content_map": fmap[: self.content_dim], "content": fmap[: self.content_dim].flatten(1).mean(1)}
            if fmap.shape[0] > self.content_dim:
                rec["style_map"] = fmap[self.content_dim:]
                rec["style"] = style_vector(rec["style_map"], self.style_pool)
            atomic_save(rec, self.output_dir / f"{name}.pt")
            self.rows.append({"latent": str(path), "domain": item.get("domain"), "embedding": f"{name}.pt"})

    def _index(self, engine) -> None:
        write_json(self.output_dir / "embeddings.json", {"content_dim": self.content_dim, "test": self.rows})
