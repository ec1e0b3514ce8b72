"""meduet_pretrain's style swap (part of evaluate.yaml): case A's content rendered with case B's pooled style through
MeDUET's decoder and meduet_vae's decoder, measured against A's subject scanned at B's site
(``meduet.metrics.transfer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet.data import case_name, get_load_transforms
from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace, load_latent
from meduet.metrics.disentanglement import bootstrap_mean_interval
from meduet.metrics.transfer import eta_squared, oracle_paint, swap_gaps, swap_pairs
from meduet.networks.windows import crop_size_of, encode_latents, pad_for_windows, sliding_windows
from meduet.viz import save_pair_grid

__all__ = ["style_swap_study"]


@torch.no_grad()
def style_swap_study(model, vae, latents: dict[str, Any], items: list[dict[str, Any]], output_dir: Path,
                     swaps: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Render case A's content with case B's pooled style and measure it against A's subject scanned at B's site
    (T), which the phantom data has.

    For each pair (A = subject i at site a, B = subject j at site b, i != j, a != b, with T = subject i at site b in
    ``items``; ``swap_pairs(items, swaps)``, by default one pair per site so that held-out sites are rendered as
    content too), decoded through the VAE on A's preprocessed grid:

    * ``rec`` = A's content with A's own pooled style, ``swap`` = A's content with B's pooled style;
    * intensity (``swap_gaps``): per label region, how much of the gap between ``rec`` and T the swap closes,
      with T *as the VAE renders it* (T's cached latent decoded) as the target of ``gap_closed`` (1 = the swap
      has the target site's intensities as far as this VAE can render them, 0 = unchanged). Pretraining works
      on latents and cannot do better than the VAE's own rendering of T; a small VAE moves region means by as
      much as sites differ, so against the real scan even T's own latent closes little of the gap. That is
      reported too: ``gap_closed_vs_scan`` and ``vae_ceiling``;
    * anatomy: ``eta2(x)`` = variance of the image inside the body explained by A's label regions; compared with
      ``eta2(T)`` on T's own label (what a real scan of that site reaches); ``anatomy_kept = eta2(swap) /
      eta2(T)``.
    """
    prep = dict(latents.get("preprocessing") or {})
    transform = get_load_transforms(**prep, keys=("image", "label"))
    space = LatentSpace.from_record(latents, "the latent datalist")
    pairs = swap_pairs(items, swaps)
    if not pairs:
        return {"pairs": [], "note": "needs items with 'subject' keys rendered at several sites (phantom data)"}

    def load(item):
        data = transform({"image": item["image"], "label": item["label"]})
        img, lab = data["image"], data["label"]
        return (np.asarray(img)[0].astype(np.float32), np.rint(np.asarray(lab)[0]).astype(np.int64))

    def decode(z: torch.Tensor, shape) -> np.ndarray:
        z = space.unscale(z[..., : shape[0], : shape[1], : shape[2]])
        return vae.decode(z).clamp(0, 1)[0, 0].float().cpu().numpy()

    crop = crop_size_of(model)
    gen = torch.Generator(device=device).manual_seed(0)

    def render(z: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        def predictor(t: torch.Tensor) -> torch.Tensor:
            enc = model.encode(t, erase=False)  # the decoder was trained on the content head before the eraser
            return model.render(enc["content_tokens"], style.to(t).expand(t.shape[0], -1),
                                enc["content_map"].shape[2:], generator=gen)
        return sliding_windows(z, crop, predictor)

    factor = int(latents.get("downsample_factor") or 4)

    def oracle_gap(lab_a, lab_t, z_a, z_t, t_vae, img_t) -> float:
        own, other = oracle_paint(lab_a, z_a, factor), oracle_paint(lab_a, z_a, factor, (lab_t, z_t))
        if own is None or other is None:
            return float("nan")
        rec_o, swap_o = (decode(space.scale(v[None].to(device)), tuple(v.shape[1:])) for v in (own, other))
        return swap_gaps(rec_o, swap_o, lab_a, t_vae, img_t, lab_t)["gap_closed"]

    rows, panels = [], []
    for a_item, b_item, t_item in pairs:
        z_a = load_latent(a_item["latent"])
        za, shape_a = pad_for_windows(space.scale(z_a[None].to(device)), model.patch_size, crop)
        (emb_a, emb_b) = encode_latents(model, [z_a, load_latent(b_item["latent"])],
                                        space, device, desc="style swap", crop=crop)
        rec = decode(render(za, emb_a["style"][None]), shape_a)
        swap = decode(render(za, emb_b["style"][None]), shape_a)
        z_t = load_latent(t_item["latent"])
        t_vae = decode(space.scale(z_t[None].to(device)), tuple(z_t.shape[1:]))
        img_a, lab_a = load(a_item)
        img_t, lab_t = load(t_item)
        img_b, _ = load(b_item)
        for decoded, image, item in ((rec, img_a, a_item), (t_vae, img_t, t_item)):
            if decoded.shape != image.shape:
                raise MeduetConfigError(f"decoded shape {decoded.shape} != preprocessed image {image.shape} for "
                                        f"{item['image']}: the latent cache and the VAE preprocessing disagree")
        eta_t, eta_swap, eta_rec = eta_squared(img_t, lab_t), eta_squared(swap, lab_a), eta_squared(rec, lab_a)
        rows.append({
            "content_case": case_name(a_item), "style_case": case_name(b_item), "target_case": case_name(t_item),
            "content_site": a_item["domain"], "style_site": b_item["domain"],
            **swap_gaps(rec, swap, lab_a, t_vae, img_t, lab_t),
            "oracle_gap_closed": oracle_gap(lab_a, lab_t, z_a, z_t, t_vae, img_t),
            "eta2_target": eta_t, "eta2_rec": eta_rec, "eta2_swap": eta_swap,
            "anatomy_kept": eta_swap / max(eta_t, 1e-8),
        })
        z = img_a.shape[2] // 2
        zt = img_t.shape[2] // 2
        zb = img_b.shape[2] // 2
        panels.append([
            (f"A: {case_name(a_item)}", img_a[:, :, z]), (f"B (style): {case_name(b_item)}", img_b[:, :, zb]),
            ("A content + A style", rec[:, :, z]), ("A content + B style", swap[:, :, z]),
            ("T through the VAE (target)", t_vae[:, :, zt]), (f"T (real): {case_name(t_item)}", img_t[:, :, zt]),
        ])
    save_pair_grid(output_dir / "style_swap.png", panels, title="Style swap: content of A rendered in B's style, "
                   "compared with A's subject scanned at B's site (T), as the VAE renders it and as scanned")
    summary = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], float)}
    # how far the mean gap closed could move with another draw of as many pairs (pairs resampled)
    interval = list(bootstrap_mean_interval([r["gap_closed"] for r in rows]))
    return {"pairs": rows, "mean": summary, "gap_closed_ci95": interval, "picture": "style_swap.png"}
