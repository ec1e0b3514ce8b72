"""meduet_diffusion harmonisation, served: one scan re-rendered with a site's style (or a reference scan's), its
anatomy kept (``harmonise.json``; the MONAI Label task calls the same pieces through ``harmonise_serve``).

``Harmoniser`` (an ``nn.Module``: meduet_vae's VAE, the generator and, for ``factors`` generators, meduet_pretrain's
frozen encoder) maps a scan preprocessed as meduet_vae reads it (``load_transforms``: RAS, the VAE's spacing, CT
window or MR percentiles to [0, 1], body crop, padding) to the same grid in the target style:

1. encode the whole scan with the VAE's own patch-wise scheme (its record's ``patch_encoding``; any size);
2. pad the scaled latent by edge replication, centred, to at least the generator's training crop and to a multiple
   of its patch (what training did to the whole phantom latents), and take the source condition: the pooled
   MeDUET content and style of that latent (``factors``) or the source site / the null condition (``metadata``);
3. the target condition: the source's content with the target site's *mean style* (``SiteStyles``: the mean pooled
   style of that site's scans in the latent cache's ``style_split``, stored in ``models/site_styles.json`` by
   ``harmonise.json``'s run id ``site_styles``) or a reference scan's style; for ``metadata`` the target site;
4. RFlow generators: invert the latent to noise under the source condition (Euler ODE steps) and integrate back
   under the target condition; DDPM generators: SDEdit at ``strength`` (as transfer.yaml);
5. crop the padding off and decode with the VAE's decoding scheme.

Latents larger than the generator's crop go, by default (``generate="windows"``), through MONAI sliding windows of
the crop at every ODE step (Gaussian blend, ``WindowedGenerator``: the network only sees the grid it was trained on,
memory bounded by one window), or with ``generate="whole"`` through the network in one pass (the DiT's sin-cos
positions are computed for any grid). Measured on 96^3 phantoms (latents 22x16x24 > the demo's 16^3 crop): windows
closed slightly more of the gap (+0.012 [0.006, 0.019], paired), kept the anatomy as well, and took 1.25x the time
on CPU (docs, "Harmonisation (served)"). Latents that fit the crop are padded to it: both modes are then the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from meduet import records
from meduet.data import get_load_transforms
from meduet.engines.diffusion import Conditioner, center_crop_or_pad
from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.io import write_json
from meduet.latent import LatentDatalist, LatentSpace, load_latent
from meduet.networks.vae import PatchEncoding
from meduet.workflows.diffusion.common import check_vae, conditioner_for, fit_slices, load_generator
from meduet.workflows.diffusion.transfer import sdedit
from meduet.workflows.vae.common import preprocessing_for
from meduet.workflows.vae.encode import UNTUNED_ENCODING

__all__ = ["SERVED_CONDITIONS", "GENERATE_MODES", "SiteStyles", "WindowedGenerator", "Encoded", "Harmoniser",
           "load_harmoniser", "save_site_styles"]

SERVED_CONDITIONS = ("factors", "metadata")
GENERATE_MODES = ("whole", "windows")
_TRAIN_HINT = ("harmonise with a generator conditioned on factors (meduet_diffusion train.yaml's default, "
               "models/model.pt) or on metadata (train.yaml --condition metadata)")


def _fingerprint(module: nn.Module) -> str:
    """A short hash of a network's weights (which encoder a style bank was made with)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if torch.is_tensor(t) and t.is_floating_point():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class SiteStyles:
    """Per-site mean pooled MeDUET style: ``styles[site] (1, Ds)``, ``counts[site]`` scans, the split they came from
    and the encoder's weight fingerprint (a bank made with another encoder is refused)."""

    styles: dict[str, torch.Tensor]
    counts: dict[str, int]
    split: str
    encoder: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "meduet_site_styles", "encoder": self.encoder, "split": self.split,
                "sites": {s: {"n": int(self.counts[s]), "style": [float(v) for v in self.styles[s].reshape(-1)]}
                          for s in sorted(self.styles)}}

    @classmethod
    def read(cls, path: str | os.PathLike, encoder: str) -> SiteStyles:
        try:
            data = json.loads(Path(path).read_text())
            sites = data["sites"]
            bank = cls({s: torch.tensor(v["style"], dtype=torch.float32)[None] for s, v in sites.items()},
                       {s: int(v["n"]) for s, v in sites.items()}, str(data.get("split", "")), str(data["encoder"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MeduetConfigError(f"site styles '{path}' cannot be read ({type(e).__name__}: {e}); rebuild it: "
                                    "python -m monai.bundle run site_styles --config_file <harmonise.json>") from None
        if bank.encoder != encoder:
            raise MeduetConfigError(f"site styles '{path}' were made with another meduet_pretrain encoder than the "
                                    "one given (pretrain_ckpt); rebuild them: python -m monai.bundle run site_styles "
                                    "--config_file <harmonise.json>")
        return bank


class WindowedGenerator(nn.Module):
    """The generator's prediction on a latent larger than its training crop by MONAI sliding windows of ``roi``
    (``overlap``, Gaussian blend), so the network only ever sees its training grid; used at every step of the
    inversion and the sampling (``meduet.engines.sampling`` calls ``forward_with_cfg``). Conditions are global
    (pooled factors, site): every window gets the same one. Batches of one latent."""

    def __init__(self, net: nn.Module, roi: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 4) -> None:
        super().__init__()
        self.net = net
        self.arch = net.arch
        self.roi = [int(r) for r in roi]
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None,
                         guidance_scale: float = 1.0) -> torch.Tensor:
        if x.shape[0] != 1:
            raise MeduetConfigError(f"WindowedGenerator takes one latent at a time, got a batch of {x.shape[0]}")
        t0 = torch.as_tensor(t, device=x.device).reshape(-1)[:1]

        def predictor(window: torch.Tensor) -> torch.Tensor:
            n = window.shape[0]
            c = None if cond is None else {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
            return self.net.forward_with_cfg(window, t0.expand(n), c, guidance_scale)

        return sliding_window_inference(x, self.roi, self.sw_batch_size, predictor, overlap=self.overlap,
                                        mode="gaussian")


@dataclasses.dataclass
class Encoded:
    """A scan in the generator's space: ``latent`` (1, C, *P) scaled and padded, ``inner`` the slices of the scan's
    own latent in it, ``cond`` the source condition (None: the null condition)."""

    latent: torch.Tensor
    inner: tuple[slice, ...]
    cond: dict[str, torch.Tensor] | None


class Harmoniser(nn.Module):
    """VAE + generator (+ conditioner): a preprocessed scan ``(1, 1, H, W, D)`` in [0, 1] -> the same grid in a
    target site's (or a reference scan's) style (module docstring). Build it with ``load_harmoniser``."""

    def __init__(self, vae: nn.Module, generator: nn.Module, objective: Any, record: Mapping[str, Any],
                 conditioner: Conditioner | None = None, site_styles: SiteStyles | None = None,
                 encoding: PatchEncoding | None = None, where: str = "the generator") -> None:
        super().__init__()
        self.vae, self.generator, self.conditioner = vae, generator, conditioner
        self.objective, self.record, self.where = objective, dict(record), where
        self.condition = str(self.record.get("condition", "none"))
        self.site_styles = site_styles
        self.encoding = encoding or PatchEncoding.of(vae, default=UNTUNED_ENCODING)
        self.space = LatentSpace.from_record(self.record, where)
        self.crop = [int(c) for c in self.record["crop_size"]]
        self.patch = int(generator.arch.get("patch_size", 2))
        self.domains = [str(d) for d in self.record.get("domains") or []]
        self.preprocessing = preprocessing_for(vae)
        self.bank_error: MeduetConfigError | None = None

    # -- what it accepts ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def modality(self) -> str:
        return str(self.preprocessing.get("modality", "CT")).upper()

    def known_sites(self) -> list[str]:
        """The sites a ``target_site`` may name: the style bank's (factors) or the trained sites (metadata)."""
        if self.condition == "factors":
            if self.bank_error is not None:
                raise self.bank_error
            return sorted(self.site_styles.styles) if self.site_styles is not None else []
        held = set(self.record.get("heldout_domains") or [])
        return [d for d in self.domains if d not in held]

    def load_transforms(self, **overrides: Any):
        """meduet_vae's preprocessing of one ``{"image": path}`` item (input checks and modality check on), the
        VAE's spacing/window/crop; ``overrides`` as ``meduet.data.get_load_transforms`` arguments."""
        args = {**self.preprocessing, "modality_check": True, "expected_channels": 1, **overrides}
        if str(args.get("modality", "CT")).upper() != self.modality:
            raise MeduetConfigError(f"this chain's VAE and generator were trained on {self.modality} scans, not "
                                    f"{args['modality']}; harmonise {args['modality']} scans with a chain trained on "
                                    f"them (leave preprocessing_args#modality at {self.modality})")
        args["pad_multiple"] = int(self.space.downsample_factor or self.vae.downsample_factor)
        return get_load_transforms(**args, keys=["image"])

    # -- the steps ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: torch.Tensor, source_site: str | None = None) -> Encoded:
        """Step 1-2 of the module docstring for ``image (1, 1, H, W, D)``."""
        x = torch.as_tensor(image).float().to(self.device)
        if x.ndim != 5 or x.shape[0] != 1:
            raise MeduetConfigError(f"Harmoniser.encode takes one image (1, 1, H, W, D), got {tuple(x.shape)}")
        z = self.space.scale(self.encoding.encode(self.vae, x))
        shape = [int(s) for s in z.shape[2:]]
        grid = [-(-max(s, c) // self.patch) * self.patch for s, c in zip(shape, self.crop)]
        inner, _ = fit_slices(shape, grid)
        latent = center_crop_or_pad(z[0], grid)[None].to(self.device)
        return Encoded(latent, (slice(None), slice(None), *inner), self.source_condition(latent, source_site))

    def source_condition(self, latent: torch.Tensor, source_site: str | None = None) -> dict[str, torch.Tensor] | None:
        if self.condition == "factors":
            return self.conditioner.factors(latent)
        if source_site is None:
            return None  # the null condition (the generator was trained with condition dropout)
        return self.site_condition(source_site, "source_site")

    def site_condition(self, site: str, key: str = "target_site") -> dict[str, torch.Tensor]:
        """The metadata condition of a site (its index, and its mean metadata when the generator takes any)."""
        known = self.known_sites()
        if site not in known:
            raise MeduetConfigError(f"unknown {key} '{site}'; known sites: {', '.join(known) or 'none'} (the sites "
                                    f"{self.where} was trained on); pass one of them")
        cond = {"domain": torch.tensor([self.domains.index(site)], device=self.device)}
        if self.record.get("metadata_keys"):
            values = (self.record.get("metadata_by_site") or {}).get(site) or self.record.get("metadata_mean")
            cond["metadata"] = torch.tensor([values], dtype=torch.float32, device=self.device)
        return cond

    def check_reference(self) -> None:
        """A reference scan gives a style only to generators conditioned on factors."""
        if self.condition != "factors":
            raise MeduetConfigError(f"{self.where} is conditioned on the site (metadata), so a reference scan gives "
                                    "it no style; name a target_site instead, or use a generator conditioned on "
                                    "factors")

    def style_of(self, image: torch.Tensor) -> torch.Tensor:
        """The pooled MeDUET style ``(1, Ds)`` of a preprocessed reference scan."""
        return self.encode(image).cond["style"]  # type: ignore[index]

    def site_style(self, site: str) -> torch.Tensor:
        known = self.known_sites()
        if site not in known:
            where = (f"the site style bank ({self.site_styles.split} split)" if self.site_styles is not None
                     else "no site style bank (site_styles / latent_datalist)")
            raise MeduetConfigError(f"unknown target_site '{site}'; known sites: {', '.join(known) or 'none'} "
                                    f"({where}); pass one of them, or a scan of that site as reference")
        return self.site_styles.styles[site].to(self.device)  # type: ignore[union-attr]

    def target_condition(self, source: Encoded, target_site: str | None = None,
                         reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Step 3: the source content with the target style (``reference``: a preprocessed scan, or its style)."""
        if (target_site is None) == (reference is None):
            raise MeduetConfigError("name either a target_site (one of "
                                    f"{', '.join(self.known_sites()) or 'none'}) or a reference scan, not "
                                    f"{'both' if target_site is not None else 'neither'}; set --target_site or "
                                    "--reference")
        if reference is not None:
            self.check_reference()
        if self.condition == "metadata":
            return self.site_condition(str(target_site))
        cond = dict(source.cond or {})
        if reference is not None:
            style = reference if reference.ndim == 2 else self.style_of(reference)
        else:
            style = self.site_style(str(target_site))
        cond["style"] = style.to(self.device)
        return cond

    @torch.no_grad()
    def render(self, source: Encoded, cond: Mapping[str, torch.Tensor] | None, noise: torch.Tensor | None = None,
               num_steps: int = 30, guidance_scale: float = 1.5, strength: float = 0.6, generate: str = "windows",
               window_overlap: float = 0.5, seed: int = 0) -> torch.Tensor:
        """Step 4-5: ``source`` re-rendered under ``cond`` -> image ``(1, 1, H, W, D)`` in [0, 1]. RFlow takes the
        inverted ``noise`` (``invert``; computed when None)."""
        model = self.model_for(source.latent, generate, window_overlap)
        if self.objective.objective == "rflow":
            noise = self.invert(source, num_steps, generate, window_overlap) if noise is None else noise
            z = sample_latents(model, list(source.latent.shape), cond, self.objective, num_steps=num_steps,
                               guidance_scale=guidance_scale if cond is not None else 1.0, noise=noise)
        else:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            z = sdedit(model, source.latent, cond, self.objective, strength, num_steps,
                       guidance_scale if cond is not None else 1.0, gen)
        return self.decode(z[source.inner])

    @torch.no_grad()
    def invert(self, source: Encoded, num_steps: int = 30, generate: str = "windows",
               window_overlap: float = 0.5) -> torch.Tensor:
        """The RFlow noise of the source latent under its own condition (deterministic)."""
        model = self.model_for(source.latent, generate, window_overlap)
        return invert_latents(model, source.latent, source.cond, self.objective, num_steps=num_steps,
                              guidance_scale=1.0)

    def model_for(self, latent: torch.Tensor, generate: str, window_overlap: float) -> nn.Module:
        if generate not in GENERATE_MODES:
            raise MeduetConfigError(f"generate must be one of {GENERATE_MODES}, got {generate!r}")
        if generate == "whole" or list(latent.shape[2:]) == self.crop:
            return self.generator
        if self.record.get("content_map"):
            raise MeduetConfigError(f"{self.where} takes a content map, whose grid is the whole latent's; use "
                                    "generate 'whole'")
        return WindowedGenerator(self.generator, self.crop, window_overlap)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.encoding.decode(self.vae, self.space.unscale(z)).clamp(0.0, 1.0)

    @torch.no_grad()
    def harmonise(self, image: torch.Tensor, target_site: str | None = None, reference: torch.Tensor | None = None,
                  source_site: str | None = None, **settings: Any) -> torch.Tensor:
        """``image (1, 1, H, W, D)`` in [0, 1] -> the same grid in the target style (``render``'s ``settings``)."""
        source = self.encode(image, source_site)
        return self.render(source, self.target_condition(source, target_site, reference), **settings)

    def forward(self, image: torch.Tensor, target_site: str | None = None, **settings: Any) -> torch.Tensor:
        return self.harmonise(image, target_site, **settings)


def _site_styles(conditioner: Conditioner, items: Sequence[Mapping[str, Any]], space: LatentSpace,
                 grid_of, split: str, device: torch.device) -> SiteStyles:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for it in items:
        z = space.scale(load_latent(it["latent"]))
        latent = center_crop_or_pad(z, grid_of([int(s) for s in z.shape[1:]]))[None].to(device)
        style = conditioner.factors(latent)["style"].cpu()
        site = str(it["domain"])
        sums[site] = sums.get(site, 0) + style
        counts[site] = counts.get(site, 0) + 1
    return SiteStyles({s: sums[s] / counts[s] for s in sums}, counts, split, _fingerprint(conditioner.encoder))


def _check_file(path: str | None, bundle: str, key: str) -> str:
    if not path or not os.path.isfile(path):
        raise MeduetConfigError(f"{key} '{path}' does not exist; {records.fix_hint(bundle)}")
    return str(path)


def load_harmoniser(model_ckpt: str, vae_ckpt: str, pretrain_ckpt: str | None = None,
                    site_styles: str | None = None, latent_datalist: str | None = None,
                    style_split: str = "training", device: str | torch.device = "cpu") -> Harmoniser:
    """The ``Harmoniser`` of a trained chain (``harmonise.json``'s ``network_def``; weights and facts from the
    checkpoints' records). Site styles (factors generators): ``site_styles`` when that file exists, else computed
    from ``latent_datalist``'s ``style_split`` (none when neither is there: only reference scans then). A generator
    conditioned on ``none`` or ``semantic``, or a missing checkpoint, is a one-line error."""
    device = torch.device(device)
    _check_file(model_ckpt, "meduet_diffusion", "generator checkpoint")
    net, objective, rec = load_generator(model_ckpt, device)
    condition = rec.get("condition", "none")
    if condition not in SERVED_CONDITIONS:
        what = ("an unconditional generator" if condition == "none" else
                f"a generator conditioned on '{condition}' (a code of the scan itself)")
        raise MeduetConfigError(f"'{model_ckpt}' is {what}, which takes no target style; {_TRAIN_HINT}")
    vae = records.load(_check_file(vae_ckpt, "meduet_vae", "VAE checkpoint"), device, expect="vae")
    check_vae(vae, rec, vae_ckpt, model_ckpt)
    conditioner, bank = None, None
    if condition == "factors":
        conditioner = conditioner_for(rec, _check_file(pretrain_ckpt, "meduet_pretrain", "pretraining checkpoint"),
                                      device)
    bank_error = None
    if condition == "factors" and site_styles and os.path.isfile(site_styles):
        try:
            bank = SiteStyles.read(site_styles, _fingerprint(conditioner.encoder))
        except MeduetConfigError as e:  # raised when a target site is asked for (run id site_styles rebuilds it)
            bank_error = e
    h = Harmoniser(vae, net, objective, rec, conditioner, bank, where=f"'{model_ckpt}'").to(device).eval()
    h.bank_error = bank_error
    if condition == "factors" and bank is None and bank_error is None and latent_datalist \
            and os.path.isfile(latent_datalist):
        h.site_styles = site_styles_of(h, latent_datalist, style_split)
    return h


def site_styles_of(h: Harmoniser, latent_datalist: str, style_split: str = "training") -> SiteStyles:
    """The mean pooled style per site of ``style_split``'s latents, each padded as ``Harmoniser.encode`` pads."""
    cache = LatentDatalist(latent_datalist)
    cache.space.check_same(h.space, latent_datalist, h.where)
    items = cache.items(style_split)
    if not items:
        raise MeduetConfigError(f"'{latent_datalist}' has no '{style_split}' items to take site styles from; set "
                                "style_split to a split of it")

    def grid_of(shape: Sequence[int]) -> list[int]:
        return [-(-max(s, c) // h.patch) * h.patch for s, c in zip(shape, h.crop)]

    return _site_styles(h.conditioner, items, h.space, grid_of, style_split, h.device)  # type: ignore[arg-type]


def save_site_styles(harmoniser: Harmoniser, path: str, latent_datalist: str, style_split: str = "training") -> str:
    """``harmonise.json``'s run id ``site_styles``: compute the per-site mean styles from the latent cache and write
    them to ``path`` (JSON, atomically); returns the path."""
    if harmoniser.condition != "factors":
        raise MeduetConfigError(f"{harmoniser.where} is conditioned on '{harmoniser.condition}'; site styles are for "
                                "generators conditioned on factors (a metadata generator takes the site itself)")
    if not latent_datalist or not os.path.isfile(latent_datalist):
        raise MeduetConfigError(f"latent datalist '{latent_datalist}' does not exist; run meduet_vae's encode.yaml "
                                "first, or pass --latent_datalist")
    bank = site_styles_of(harmoniser, latent_datalist, style_split)
    harmoniser.site_styles, harmoniser.bank_error = bank, None
    out = write_json(path, bank.to_json())
    print(f"meduet_diffusion site styles: {', '.join(f'{s} ({bank.counts[s]} scans)' for s in sorted(bank.counts))}"
          f" -> {out}")
    return out
