"""What ``meduet.deploy.export`` exports: each deterministic part of a bundle as a plain module (tensors in, tensors
out) built from its ``model.pt`` alone, with a default example shape from the checkpoint's record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from meduet import records
from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.windows import crop_size_of

__all__ = ["WHATS", "VAEEncodeMean", "VAEDecode", "SegLogits", "PooledFactors", "Built", "build_wrapper"]

WHATS = ("vae_encode", "vae_decode", "seg", "encoder")


# ----------------------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------------------
class VAEEncodeMean(nn.Module):
    """``image (B, C_in, X, Y, Z) -> latent (B, c, X/f, Y/f, Z/f)``: the VAE's posterior mean (``encode_mean``).
    The latent is *unscaled* (``meduet.latent.LatentSpace.scale`` gives what the downstream stages take)."""

    input_names = ("image",)
    output_names = ("latent",)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_mean(image)


class VAEDecode(nn.Module):
    """``latent (B, c, x, y, z) -> image (B, C_out, f x, f y, f z)``: the VAE's decoder on an unscaled latent."""

    input_names = ("latent",)
    output_names = ("image",)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)


class SegLogits(nn.Module):
    """``image (B, 1, X, Y, Z) -> pred (B, classes, X, Y, Z)`` logits of meduet_seg's network (VAE encoder
    included)."""

    input_names = ("image",)
    output_names = ("pred",)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class PooledFactors(nn.Module):
    """``latent (B, c, x, y, z)`` (unscaled) -> ``content (B, D)`` and, for MeDUET, ``style (B, Ds or 2 Ds)``: the
    mean of the (site-erased) content tokens and the pooled smoothed style tokens (``style_pool``) of the scaled
    latent (as ``meduet.networks.windows.encode_latents`` pools one window)."""

    input_names = ("latent",)

    def __init__(self, encoder: nn.Module, space: LatentSpace) -> None:
        super().__init__()
        self.encoder = encoder
        self.space = space
        self.has_style = getattr(encoder, "objective", encoder.kind) == "meduet"
        self.output_names = ("content", "style") if self.has_style else ("content",)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        enc = self.encoder.encode(self.space.scale(latent))
        if self.has_style:
            return enc["content"], enc["style"]
        return (enc["content"],)


@dataclass
class Built:
    module: nn.Module
    shape: tuple[int, ...]
    record: dict[str, Any]
    spatial_dynamic: bool
    ckpt: Path


def _record(net: nn.Module) -> dict[str, Any]:
    return records.decode(net.get_extra_state())


def build_wrapper(what: str, ckpt: str | Path, shape: Sequence[int] | None = None,
                  roi: Sequence[int] | None = None) -> Built:
    """The eval-mode wrapper for ``what`` loaded from ``ckpt`` (missing/invalid file: one-line
    ``MeduetConfigError``), with the export shape: ``shape`` (B C X Y Z), else the default batch and channels with
    the spatial size ``roi`` (X Y Z, or one side for a cube), else the default from the checkpoint's record.
    Spatial sizes must be multiples of what the wrapper consumes per output voxel/token."""
    if what not in WHATS:
        raise MeduetConfigError(f"--what must be one of {WHATS}, got {what!r}")
    if shape and roi:
        raise MeduetConfigError("give either --shape (B C X Y Z) or --roi (X Y Z), not both")
    ckpt = Path(ckpt)
    if what in ("vae_encode", "vae_decode"):
        vae = records.load(ckpt, expect="vae")
        arch, f = vae.architecture, vae.downsample_factor
        record = _record(vae)
        if what == "vae_encode":
            module: nn.Module = VAEEncodeMean(vae)
            default = (1, arch["in_channels"], 16 * f, 16 * f, 16 * f)
            multiple = f
        else:
            module = VAEDecode(vae)
            default = (1, arch["latent_channels"], 16, 16, 16)
            multiple = 1
        spatial_dynamic = True
    elif what == "seg":
        net = records.load(ckpt, expect="meduet_seg")
        record = _record(net)
        module = SegLogits(net)
        multiple = int(net.image_per_token)
        in_ch = int(net.arch.get("vae_architecture", {}).get("in_channels", net.arch.get("in_channels", 1)))
        default = (1, in_ch, *_seg_roi(net, record, multiple))
        spatial_dynamic = False
    else:
        enc = records.load_part(ckpt, PretrainedEncoder)
        record = _record(enc)
        module = PooledFactors(enc, LatentSpace.from_record(record, f"pretraining checkpoint '{ckpt}'"))
        default = (1, int(enc.in_channels), *crop_size_of(enc))
        multiple = int(enc.patch_size)
        spatial_dynamic = False
    module.eval()
    if roi:
        roi_ = [int(r) for r in roi]
        if len(roi_) not in (1, 3):
            raise MeduetConfigError(f"--roi must be 1 or 3 integers (X [Y Z]), got {roi_}")
        shape = (*default[:2], *(roi_ * 3 if len(roi_) == 1 else roi_))
    shape_ = tuple(int(s) for s in (shape if shape else default))
    if len(shape_) != 5:
        raise MeduetConfigError(f"--shape must be 5 integers (B C X Y Z), got {list(shape_)}")
    if shape_[1] != default[1]:
        raise MeduetConfigError(f"--what {what} of '{ckpt}' takes {default[1]} input channels, --shape gives "
                                f"{shape_[1]}")
    if min(shape_) < 1 or any(s % multiple for s in shape_[2:]):
        raise MeduetConfigError(f"--what {what} of '{ckpt}' needs spatial sizes that are positive multiples of "
                                f"{multiple}, got {list(shape_[2:])}")
    return Built(module, shape_, record, spatial_dynamic, ckpt)


def _seg_roi(net: nn.Module, record: dict[str, Any], multiple: int) -> tuple[int, int, int]:
    """The image window the seg network was trained on (and inference.json slides): the record's ``roi_size``, else
    the ViT's ``input_size`` latent crop times the VAE's downsampling, else four tokens per side."""
    v = record.get("roi_size")
    if isinstance(v, int):
        v = [v] * 3
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(int(x) > 0 and int(x) % multiple == 0 for x in v):
        return int(v[0]), int(v[1]), int(v[2])
    vit_in = net.arch.get("vit", {}).get("input_size")
    latent = getattr(net, "latent_encoder", None)
    if vit_in is not None and latent is not None:
        side = [int(vit_in)] * 3 if isinstance(vit_in, int) else [int(x) for x in vit_in]
        roi = tuple(s * int(latent.downsample_factor) for s in side)
        if len(roi) == 3 and all(r % multiple == 0 for r in roi):
            return roi  # type: ignore[return-value]
    return (4 * multiple,) * 3
