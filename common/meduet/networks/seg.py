"""Segmentation on the pretrained latent encoder: frozen meduet_vae encoder -> latent ViT (meduet_pretrain's content
path, fine-tuned) -> UNETR-style decoder (MONAI's UNETR blocks) with convolutional skips from the image.

Scales (``f`` = the VAE's downsampling, 4; ``p`` = the latent patch; ``T = f p`` = image voxels per token side):

* image ``x (B, 1, H, W, D)`` in the VAE's preprocessed intensity range, ``H, W, D`` divisible by ``T``;
* latent ``z = vae.encode_mean(x) * latent_scale_factor`` ``(B, C, H/f, ...)``: the VAE is frozen and in eval mode;
* tokens on the grid ``H/T``; hidden states of ``log2(p)`` intermediate blocks give the skips at scales ``T/2 ..
  f`` (``UnetrPrUpBlock``: deeper blocks for coarser scales), the final tokens (content head, optionally with the
  style tokens concatenated: ``features="content+style"``) are the bottleneck;
* scales below ``f`` (2 and 1 for MAISI) get convolutional skips from the image itself (``UnetrBasicBlock``, stride
  2 and 1), so the prediction is at full resolution;
* decoder: ``UnetrUpBlock`` per scale from ``T/2`` to 1, then ``UnetOutBlock`` -> ``(B, out_channels, H, W, D)``
  logits.

Channel width at scale ``s`` is ``feature_size * min(s, 8)`` (UNETR's 16/32/64/128 for ``feature_size`` 16).

``init``: ``"meduet"`` (encoder + factor heads from a MeDUET checkpoint), ``"mae"`` (the masked-autoencoder
baseline's encoder; no factor heads, features = tokens), ``"scratch"`` (MeDUET's structure, random weights). The
whole network is one flat state dict (VAE encoder included), so ``model.pt`` is self-contained; its
``_extra_state`` record carries the architecture and the facts inference needs (labels, preprocessing, domains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNet

from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.latent_vit import tokens_to_map
from meduet.networks.meduet import NON_WEIGHT_ARGS
from meduet.networks.vae import MeduetVAE, build_vae
from meduet.records import RecordMixin, fill_by_name, register

__all__ = ["MeduetSegNet", "UNetSeg", "INITS", "VIT_KEYS"]

INITS = ("meduet", "mae", "scratch")  # plus "unet": MONAI's UNet baseline (UNetSeg)
VIT_KEYS = ("input_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio", "style_dim", "smooth_kernel",
             "qkv_bias", "style_pool")


class _FrozenVAEEncoder(nn.Module):
    """The encoder half of a ``MeduetVAE`` (encoder + ``quant_conv_mu``), frozen and always in eval mode.

    ``forward(x) -> z_mu * latent_scale_factor``. Its state-dict keys are ``vae.encoder.*``, ``vae.quant_conv_*``
    and the VAE's ``_extra_state`` record (architecture, scale factor, preprocessing)."""

    def __init__(self, vae_architecture: Mapping[str, Any]) -> None:
        super().__init__()
        vae = build_vae(dict(vae_architecture))
        del vae.decoder, vae.post_quant_conv  # not needed for segmentation
        self.vae = vae
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenVAEEncoder:
        return super().train(False)

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.vae.encoder(x)
            return LatentSpace.from_vae(self.vae).scale(self.vae.quant_conv_mu(h))


def _width(feature_size: int, scale: int) -> int:
    return feature_size * min(scale, 8)


@register
class MeduetSegNet(RecordMixin, nn.Module):
    """Segmentation network on the pretrained latent encoder (see the module docstring).

    Args:
        vae_architecture: meduet_vae's architecture dict (``MeduetVAE`` constructor arguments).
        vit: latent ViT arguments (``patch_size``, ``dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``style_dim``,
            ``smooth_kernel``, ``qkv_bias``, ``input_size``), e.g. ``MEDUET_PRESETS["demo"]``; extra keys ignored.
        out_channels: classes including background.
        init: ``"meduet"``, ``"mae"`` or ``"scratch"`` (sets the encoder structure; weights come from
            ``copy_vae`` / ``copy_encoder``).
        features: ``"content"`` or ``"content+style"`` (bottleneck tokens; the latter needs ``init != "mae"``).
        feature_size: decoder width at full resolution.
        norm_name, res_block: decoder blocks (as MONAI's UNETR).
    """

    kind = "meduet_seg"
    non_weight_args = NON_WEIGHT_ARGS

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **runtime: Any) -> nn.Module:
        """A record of MONAI's UNet baseline (``init: unet``) builds ``UNetSeg``."""
        arch = record["architecture"]
        return UNetSeg(**arch) if arch.get("init") == "unet" else cls(**arch)

    def __init__(self, vae_architecture: Mapping[str, Any], vit: Mapping[str, Any], out_channels: int = 2,
                 init: str = "meduet", features: str = "content", feature_size: int = 16,
                 norm_name: str | tuple = "instance", res_block: bool = True) -> None:
        super().__init__()
        if init not in INITS:
            raise MeduetConfigError(f"init must be one of {INITS}, got {init!r}")
        if features not in ("content", "content+style"):
            raise MeduetConfigError(f"features must be 'content' or 'content+style', got {features!r}")
        if features == "content+style" and init == "mae":
            raise MeduetConfigError("the masked-autoencoder baseline has no style factor: use features='content'")
        vit = {k: v for k, v in dict(vit).items() if k in VIT_KEYS}
        self.arch = dict(vae_architecture=dict(vae_architecture), vit=vit, out_channels=out_channels, init=init,
                         features=features, feature_size=feature_size, norm_name=norm_name, res_block=res_block)
        self.meta: dict[str, Any] = {}
        self.latent_encoder = _FrozenVAEEncoder(vae_architecture)
        f = self.latent_encoder.downsample_factor
        in_ch = int(vae_architecture.get("in_channels", 1))
        latent_ch = int(vae_architecture["latent_channels"])
        style_keys = ("style_dim", "smooth_kernel", "style_pool")
        enc_kw = {k: v for k, v in vit.items() if init != "mae" or k not in style_keys}
        self.encoder = PretrainedEncoder("mae" if init == "mae" else "meduet", in_channels=latent_ch, **enc_kw)
        self.arch["vit"] = {k: v for k, v in self.encoder.arch.items() if k in VIT_KEYS}  # defaults resolved
        p = self.encoder.patch_size
        if p & (p - 1) or f & (f - 1):
            raise MeduetConfigError(f"latent patch {p} and VAE downsampling {f} must be powers of two")
        self.image_per_token = f * p
        self.features = features
        self.use_content_head = init != "mae"
        if self.use_content_head and features == "content":
            # the style head is not used: frozen, so optimisers and DDP leave it alone
            factors = self.encoder.backbone.factors
            factors.style.requires_grad_(False)
            factors.smooth.requires_grad_(False)
        dim = self.encoder.dim
        bottleneck = dim + (self.encoder.style_dim if features == "content+style" else 0)
        t = self.image_per_token
        # token-derived skips at scales T/2 .. f, from intermediate blocks (deeper for coarser scales)
        self.token_scales = [t // 2 ** k for k in range(1, int(math.log2(p)) + 1)]  # e.g. [8, 4] for p = 4
        depth = len(self.encoder.vit.blocks)
        n = len(self.token_scales)
        shallow_to_deep = [max(0, depth * (i + 1) // (n + 1) - 1) for i in range(n)]
        self.skip_layers = list(reversed(shallow_to_deep))  # aligned with token_scales (coarse first)
        self.token_skips = nn.ModuleList([
            UnetrPrUpBlock(3, dim, _width(feature_size, s), num_layer=int(math.log2(t // s)) - 1, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for s in self.token_scales
        ])
        # convolutional skips from the image at scales below f (2 and 1 for MAISI's f = 4)
        self.image_scales = [f // 2 ** k for k in range(1, int(math.log2(f)) + 1)]  # e.g. [2, 1]
        self.image_skips = nn.ModuleList([
            UnetrBasicBlock(3, in_ch, _width(feature_size, s), kernel_size=3, stride=s, norm_name=norm_name,
                            res_block=res_block)
            for s in self.image_scales
        ])
        ups, prev = [], bottleneck
        for s in self.token_scales + self.image_scales:
            ups.append(UnetrUpBlock(3, prev, _width(feature_size, s), kernel_size=3, upsample_kernel_size=2,
                                    norm_name=norm_name, res_block=res_block))
            prev = _width(feature_size, s)
        self.ups = nn.ModuleList(ups)
        self.out = UnetOutBlock(3, feature_size, out_channels)

    @property
    def vae(self) -> MeduetVAE:
        return self.latent_encoder.vae

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The pretrained part (latent ViT + factor heads), e.g. for a lower learning rate."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def decoder_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.encoder.parameters()} | {id(p) for p in self.latent_encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in ids and p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.image_per_token
        if x.ndim != 5 or any(int(s) % t for s in x.shape[2:]):
            raise ValueError(f"expected images (B, C, H, W, D) with H, W, D divisible by {t}, got {tuple(x.shape)}")
        z = self.latent_encoder(x)
        vit = self.encoder.vit
        tokens, grid = vit.embed(z)
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in self.skip_layers:
                hidden[i] = tokens
        tokens = vit.norm(tokens)
        if self.use_content_head:
            heads = self.encoder.backbone.factors
            feats = heads.content_of(tokens)
            if self.features == "content+style":
                feats = torch.cat([feats, heads.smooth(heads.style(tokens), None, grid)], dim=-1)
        else:
            feats = tokens
        h = tokens_to_map(feats, grid)
        skips = [blk(tokens_to_map(hidden[i], grid)) for blk, i in zip(self.token_skips, self.skip_layers)]
        skips += [blk(x) for blk in self.image_skips]
        for up, skip in zip(self.ups, skips):
            h = up(h, skip)
        return self.out(h)

    # ------------------------------------------------------------------ weights from the upstream networks
    def copy_vae(self, vae: MeduetVAE) -> MeduetSegNet:
        """Copy a trained ``MeduetVAE``'s encoder (and its record); the architecture must match."""
        if vae.architecture != self.vae.architecture:
            diff = {k: (v, self.vae.architecture.get(k)) for k, v in vae.architecture.items()
                    if self.vae.architecture.get(k) != v}
            raise MeduetConfigError(f"the VAE has another architecture {diff} (VAE, segmentation network's config); "
                                    "set the `vae` keys to the VAE's (e.g. merge the same preset)")
        own = self.latent_encoder.vae.state_dict()
        self.latent_encoder.vae.load_state_dict({k: v for k, v in vae.state_dict().items() if k in own}, strict=True)
        return self

    def copy_encoder(self, state: Mapping[str, torch.Tensor], kind: str) -> MeduetSegNet:
        """Copy the latent ViT (and factor heads) from the state dict of meduet_pretrain's network of ``kind``
        (MeDUET for init "meduet", the masked-autoencoder baseline for "mae"), by name; kind and architecture
        must match."""
        want = "mae" if self.arch["init"] == "mae" else "meduet"
        if kind != want:
            raise MeduetConfigError(f"the pretrained network is a '{kind}' network but init '{self.arch['init']}' "
                                    f"needs '{want}'")
        missing = fill_by_name(self.encoder, state)
        if missing:
            raise MeduetConfigError(f"the pretrained network lacks {len(missing)} encoder weights (e.g. {missing[:2]})")
        return self


class UNetSeg(RecordMixin, nn.Module):
    """The image-space baseline: MONAI's ``UNet`` from scratch (channels ``feature_size * (1, 2, 4, 8, 16)``,
    four stride-2 levels, two residual units), with the same checkpoint record and parameter-group interface as
    ``MeduetSegNet`` so the bundle trains and evaluates it unchanged (``init: unet``)."""

    kind = "meduet_seg"
    non_weight_args = NON_WEIGHT_ARGS
    image_per_token = 16  # four stride-2 levels: inputs divisible by 16

    def __init__(self, out_channels: int = 2, feature_size: int = 16, in_channels: int = 1, init: str = "unet",
                 **_: Any) -> None:
        super().__init__()
        self.arch = dict(init="unet", out_channels=out_channels, feature_size=feature_size, in_channels=in_channels)
        self.meta: dict[str, Any] = {}
        f = feature_size
        self.unet = UNet(3, in_channels, out_channels, channels=(f, 2 * f, 4 * f, 8 * f, 16 * f),
                         strides=(2, 2, 2, 2), num_res_units=2, norm="instance")

    def encoder_parameters(self) -> list[nn.Parameter]:
        return []

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)
