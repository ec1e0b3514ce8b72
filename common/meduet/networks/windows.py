"""Whole latents through a network trained on latent crops (meduet_pretrain's encoder and everything that uses it).

A latent ViT generalises to the token grid it was trained on, not to any grid: a whole latent is padded at its far
ends by edge replication to a multiple of the latent patch (and to at least one crop), and run through MONAI
sliding windows of the pretraining crop (overlap 0.5, constant blending). Pooled vectors are means over all tokens
(style: ``pool_style`` with the network's ``style_pool``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from meduet.latent import LatentSpace
from meduet.networks.factors import pool_style
from meduet.networks.latent_vit import to_3tuple, tokens_to_map

__all__ = ["pad_to_multiple", "pad_for_windows", "crop_size_of", "factor_map", "sliding_windows", "style_vector",
           "encode_latents"]


def pad_to_multiple(z: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad ``(B, C, X, Y, Z)`` at the far ends (edge replication) to multiples of ``multiple``; returns the padded
    tensor and the original spatial shape (crop ``[..., :X, :Y, :Z]`` to undo)."""
    shape = tuple(int(s) for s in z.shape[2:])
    pads = [(-s) % multiple for s in shape]
    if any(pads):
        z = F.pad(z, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
    return z, shape  # type: ignore[return-value]


def pad_for_windows(z: torch.Tensor, patch: int, crop: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``pad_to_multiple`` of the latent patch, then at least one crop per axis (edge replication at the far ends);
    returns the padded tensor and the original spatial shape."""
    x, shape = pad_to_multiple(z, patch)
    short = [max(0, int(c) - int(s)) for c, s in zip(crop, x.shape[2:])]
    if any(short):
        x = F.pad(x, (0, short[2], 0, short[1], 0, short[0]), mode="replicate")
    return x, shape


def crop_size_of(network: torch.nn.Module) -> tuple[int, int, int]:
    """The latent crop size the network was pretrained on (its record's ``crop_size``, else ``input_size``)."""
    crop = (getattr(network, "meta", {}) or {}).get("crop_size") or network.arch["input_size"]
    return to_3tuple(crop)


def factor_map(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Content (then style, if the network has one) token maps of ``x``: ``(B, D [+ Ds], g1, g2, g3)``."""
    enc = network.encode(x)
    if enc.get("style_tokens") is None:
        return enc["content_map"]
    return torch.cat([enc["content_map"], tokens_to_map(enc["style_tokens"], enc["content_map"].shape[2:])], dim=1)


def sliding_windows(z: torch.Tensor, crop: Sequence[int], predictor, overlap: float = 0.5) -> torch.Tensor:
    """MONAI sliding windows of the pretraining crop size over a latent padded to patch multiples (and to at
    least one crop), so the ViT always sees the token grid it was trained on."""
    return sliding_window_inference(z, roi_size=list(crop), sw_batch_size=8, predictor=predictor, overlap=overlap,
                                    mode="constant")


def style_vector(style_map: torch.Tensor, style_pool: str = "mean") -> torch.Tensor:
    """A case's style vector from its style map ``(Ds, g1, g2, g3)`` (``pool_style`` over all its tokens)."""
    return pool_style(style_map.flatten(1).T[None], None, style_pool)[0]


@torch.no_grad()
def encode_latents(network: torch.nn.Module, latents: Sequence[torch.Tensor], space: LatentSpace,
                   device: str | torch.device = "cpu", desc: str = "encode",
                   crop: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Embeddings of whole cached latents ``(C, X, Y, Z)`` (scaled by ``space``): the factor map by sliding windows
    of the pretraining crop size (``crop``, default from the network's record; overlap 0.5), and pooled vectors.

    Returns CPU tensors without the batch axis: ``content (D,)`` (mean), ``content_map (D, g1, g2, g3)`` and, for
    MeDUET, ``style (Ds,)`` or ``(2 Ds,)`` (``style_vector`` with the network's ``style_pool``), ``style_map
    (Ds, g...)`` (the token grid of the latent padded to patch multiples).
    """
    network = network.to(device).eval()
    patch, dim = int(network.patch_size), int(network.dim)
    crop = crop_size_of(network) if crop is None else tuple(crop)
    out = []
    for z in tqdm(latents, desc=desc, disable=os.environ.get("MEDUET_PROGRESS") == "0"):
        x, _ = pad_for_windows(space.scale(z[None].to(device)), patch, crop)
        fmap = sliding_windows(x, crop, lambda t: factor_map(network, t))[0].cpu()
        row = {"content_map": fmap[:dim], "content": fmap[:dim].flatten(1).mean(1)}
        if fmap.shape[0] > dim:
            row["style_map"] = fmap[dim:]
            row["style"] = style_vector(fmap[dim:], getattr(network, "style_pool", "mean"))
        out.append(row)
    return out
