"""Baselines of bench/controlnet_study.py: the supervised MONAI UNet (degraded -> clean, image space) and the VAE
ceiling (encode / decode of the clean volume).

The UNet's training pairs are the ControlNet's: the training split's clean scans preprocessed as the latent cache's
(``ControlCache.load``), degraded by the same ``ControlTask.degrade`` with the same per-scan seed (``item_seed``), in
[0, 1]. It predicts ``input + gate * UNet(input)`` with a learnable ``gate`` starting at 0 (a residual that starts
at the input: at a few hundred steps a UNet asked for the whole image is still far below it), MSE loss, Adam, batch
4, random crops of 32^3 (scans smaller than that along an axis edge-padded first) with independent flips per axis,
the given number of optimiser steps and seed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["UNET_CHANNELS", "ResidualUNet", "build_unet", "train_unet", "unet_predict", "vae_roundtrip"]

UNET_CHANNELS = (16, 32, 64, 128)


class ResidualUNet(torch.nn.Module):
    """``x + gate * UNet(x)`` with a learnable scalar ``gate`` starting at 0 (so training starts at the degraded
    input itself; MONAI's UNet ends in a residual unit whose identity path a zeroed last convolution would not
    silence). ``x``: ``(B, 1, S1, S2, S3)``, every ``S`` a multiple of 8."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=UNET_CHANNELS, strides=(2, 2, 2),
                         num_res_units=1)
        self.gate = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.unet(x)


def build_unet() -> torch.nn.Module:
    """MONAI's 3D UNet (1 -> 1 channel, channels 16/32/64/128, strides 2, one residual unit: ~0.6 M parameters) as a
    gated residual on its input (``ResidualUNet``)."""
    return ResidualUNet()


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(C, S1, S2, S3)`` edge-padded (at the end) to at least ``size`` per axis."""
    pad = [p for s in reversed(x.shape[1:]) for p in (0, max(0, size - int(s)))]
    return F.pad(x[None], pad, mode="replicate")[0] if any(pad) else x


def training_pairs(task: Any, latent_datalist: str, split: str = "training") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(degraded (1, *S), clean (1, *S))]`` of ``split``, exactly the ControlNet's training inputs in image space."""
    from meduet.data.controls import item_seed
    from meduet.engines.controlnet import ControlCache

    with tempfile.TemporaryDirectory() as tmp:
        cache = ControlCache(latent_datalist, task, tmp)
        pairs = []
        for item in cache.datalist.items(split):
            clean = torch.as_tensor(cache.load(item)["image"]).float()[:1].clamp(0, 1)
            degraded = task.degrade(clean[None], seed=item_seed(task.seed, Path(item["latent"]).name))[0]
            pairs.append((degraded, clean))
    return pairs


def train_unet(task: Any, latent_datalist: str, steps: int, seed: int = 0, batch: int = 4, crop: int = 32,
               lr: float = 1e-3, threads: int = 2) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained UNet (eval mode) and ``{"parameters", "steps", "final_loss", ...}``."""
    torch.set_num_threads(threads)
    pairs = [(_pad_to(d, crop), _pad_to(c, crop)) for d, c in training_pairs(task, latent_datalist)]
    torch.manual_seed(seed)
    net = build_unet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    net.train()
    for _ in range(int(steps)):
        xs, ys = [], []
        for _ in range(batch):
            if not order:
                order = torch.randperm(len(pairs), generator=gen).tolist()
            d, c = pairs[order.pop()]
            corner = [int(torch.randint(0, int(s) - crop + 1, (1,), generator=gen)) for s in d.shape[1:]]
            sl = (slice(None), *(slice(o, o + crop) for o in corner))
            x, y = d[sl], c[sl]
            flips = [a + 1 for a in range(3) if bool(torch.rand(1, generator=gen) < 0.5)]
            if flips:
                x, y = x.flip(flips), y.flip(flips)
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    net.eval()
    info = {"parameters": sum(p.numel() for p in net.parameters()), "channels": list(UNET_CHANNELS), "steps": steps,
            "batch": batch, "crop": crop, "lr": lr, "optimizer": "Adam", "seed": seed,
            "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    return net, info


@torch.no_grad()
def unet_predict(net: torch.nn.Module, degraded: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """``(1, 1, *S)`` degraded image -> the UNet's clean estimate ``(1, 1, *S)`` in [0, 1] (the whole volume,
    edge-padded to a multiple of ``multiple``, cropped back)."""
    shape = degraded.shape[2:]
    pad = [p for s in reversed(shape) for p in (0, (-int(s)) % multiple)]
    x = F.pad(degraded.float(), pad, mode="replicate") if any(pad) else degraded.float()
    y = net(x)
    return y[(..., *(slice(0, int(s)) for s in shape))].clamp(0.0, 1.0)


@torch.no_grad()
def vae_roundtrip(vae: torch.nn.Module, latent_datalist: str, clean: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """The clean volume ``(S1, S2, S3)`` in [0, 1] encoded and decoded as ControlNet inference encodes its controls
    (``encode_image_control``: the latent cache's patch encoding, scaled; zero-padded to a multiple of
    ``multiple``) -> ``(S1, S2, S3)``."""
    from meduet.engines.consistency import decode_image
    from meduet.engines.controlnet import control_encoding, encode_image_control
    from meduet.latent import LatentDatalist

    dl = LatentDatalist(latent_datalist)
    scheme = control_encoding(vae, dl.data)
    shape = tuple(int(s) for s in clean.shape[-3:])
    size = [-(-s // multiple) * multiple for s in shape]
    x = torch.zeros((1, 1, *size))
    region = tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(size, shape))
    x[(0, 0, *region)] = clean.reshape(shape).float()
    z = encode_image_control(vae, scheme, dl.space, x)
    return decode_image(vae, scheme, dl.space, z)[(0, 0, *region)]
