"""The latent codec: MONAI's MAISI autoencoder plus what the next stages need to know about it.

``MeduetVAE`` is ``monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi`` with one
addition: the facts a downstream stage must not re-guess (the architecture, the latent scale factor, the
preprocessing, the domains it was trained on) travel inside the state dict as its checkpoint record
(``meduet.records``, key ``_extra_state``). ``models/model.pt`` therefore stays a flat state dict that
``monai.bundle.load``, MONAI's ``CheckpointLoader`` and MONAI Label load as usual, and
``meduet.records.load(path)`` rebuilds the network from the file alone.

Shapes: images ``(B, C_in, H, W, D)`` with ``H, W, D`` divisible by ``downsample_factor``; latents
``(B, latent_channels, H/f, W/f, D/f)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D

from meduet.errors import MeduetConfigError, require_bool
from meduet.records import RecordMixin, register

__all__ = [
    "MeduetVAE",
    "MAISI_CT_ARCHITECTURE",
    "build_vae",
    "encode_patchwise",
    "decode_patchwise",
    "reconstruct_patchwise",
    "PatchEncoding",
    "fit_windows",
    "fit_overlap",
    "fit_tiling",
]

#: MAISI's CT autoencoder (the tokenizer of the MeDUET paper): 4 latent channels, 4x downsampling.
MAISI_CT_ARCHITECTURE: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_checkpointing": False,
    "use_convtranspose": False,
}

# Arguments that change only how the network computes (memory/speed), never its weights.
_RUNTIME_ARGS = ("num_splits", "dim_split", "norm_float16", "use_checkpointing", "use_flash_attention", "fast_norm",
                 "forward_mode", "checkpoint_blocks")
FORWARD_MODES = ("train", "reconstruct")


def _use_torch_group_norm(module: torch.nn.Module) -> None:
    """Swap every ``MaisiGroupNorm3D`` for an equivalent ``torch.nn.GroupNorm`` (same state-dict keys)."""
    for name, child in list(module.named_children()):
        if isinstance(child, MaisiGroupNorm3D):
            norm = torch.nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            _use_torch_group_norm(child)


@register
class MeduetVAE(RecordMixin, AutoencoderKlMaisi):
    """MAISI KL-autoencoder whose state dict also carries its architecture and latent statistics.

    Args:
        spatial_dims, in_channels, out_channels, latent_channels, num_channels, num_res_blocks,
        norm_num_groups, norm_eps, attention_levels, with_encoder_nonlocal_attn, with_decoder_nonlocal_attn,
        use_checkpointing, use_convtranspose, num_splits, dim_split, norm_float16, use_flash_attention:
            as in ``AutoencoderKlMaisi``. ``num_splits``/``dim_split`` split convolutions along one spatial axis
            to bound memory (weights are unchanged); ``norm_float16`` needs CUDA.
        fast_norm: replace MAISI's group norm (a Python loop over groups, built to save GPU memory) by
            ``torch.nn.GroupNorm``, which computes the same function with the same parameters in one fused op;
            several times faster on CPU. Ignored when ``norm_float16`` is set.
        forward_mode: ``"train"`` (MONAI's: ``forward(x) -> (reconstruction, z_mu, z_sigma)`` with a sampled latent)
            or ``"reconstruct"``: ``forward(x) -> decode(encode_mean(x))``, one deterministic tensor, what the
            inference config declares (MONAI's ``verify_net_in_out`` and exporters call ``forward``). The weights
            are the same.
        checkpoint_blocks: checkpoint each decoder block on its own when gradients are on (decoder fine-tuning:
            the activations at the backward's peak fall 1.6x at the paper width, ``bench/decoder_memory.py``;
            ``decode``); MAISI's ``use_checkpointing`` does not lower them there. Values and gradients unchanged.
            Not in the seed papers (a memory option).
    """

    kind = "vae"
    derived_keys = ("downsample_factor",)
    runtime_args = _RUNTIME_ARGS

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        latent_channels: int = 4,
        num_channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: Sequence[int] = (2, 2, 2),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        attention_levels: Sequence[bool] | None = None,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        use_checkpointing: bool = False,
        use_convtranspose: bool = False,
        num_splits: int = 1,
        dim_split: int = 0,
        norm_float16: bool = False,
        use_flash_attention: bool = False,
        fast_norm: bool = True,
        forward_mode: str = "train",
        checkpoint_blocks: bool = False,
    ) -> None:
        if attention_levels is None:
            attention_levels = [False] * len(num_channels)
        if forward_mode not in FORWARD_MODES:
            raise MeduetConfigError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        if norm_float16 and not torch.cuda.is_available():
            raise MeduetConfigError(
                "norm_float16=True needs CUDA (MAISI's half-precision group norm fails on CPU); set it to false"
            )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=list(num_res_blocks),
            num_channels=list(num_channels),
            attention_levels=list(attention_levels),
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            use_checkpointing=use_checkpointing,
            use_convtranspose=use_convtranspose,
            use_flash_attention=use_flash_attention,
            num_splits=num_splits,
            dim_split=dim_split,
            norm_float16=norm_float16,
            save_mem=False,
        )
        if fast_norm and not norm_float16:
            _use_torch_group_norm(self)
        self.forward_mode = forward_mode
        self.checkpoint_blocks = require_bool(checkpoint_blocks, "checkpoint_blocks")
        self.architecture: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "latent_channels": latent_channels,
            "num_channels": [int(c) for c in num_channels],
            "num_res_blocks": [int(n) for n in num_res_blocks],
            "norm_num_groups": norm_num_groups,
            "norm_eps": float(norm_eps),
            "attention_levels": [bool(a) for a in attention_levels],
            "with_encoder_nonlocal_attn": with_encoder_nonlocal_attn,
            "with_decoder_nonlocal_attn": with_decoder_nonlocal_attn,
            "use_convtranspose": use_convtranspose,
        }
        #: What downstream stages read: latent scale factor (1/std of latents; ``meduet.latent.LatentSpace`` owns
        #: it), preprocessing, domains, ...
        self.meta: dict[str, Any] = {"latent_scale_factor": 1.0}

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (4 for three levels)."""
        return 2 ** (len(self.architecture["num_channels"]) - 1)

    @property
    def arch(self) -> dict[str, Any]:  # the record's name for the constructor arguments
        return self.architecture

    def record(self) -> dict[str, Any]:
        return {**super().record(), "downsample_factor": self.downsample_factor}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **runtime: Any) -> MeduetVAE:
        return build_vae(record["architecture"], **runtime)

    def forward(self, x: torch.Tensor):  # noqa: D102 - see forward_mode
        if self.forward_mode == "reconstruct":
            return self.decode(self.encode_mean(x))  # (B, C_out, H, W, D)
        return super().forward(x)  # (reconstruction, z_mu, z_sigma)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w, d) -> (B, C_out, h*f, w*f, d*f)``. With ``checkpoint_blocks`` and gradients on, each decoder
        block is checkpointed on its own (``torch.utils.checkpoint``): the backward keeps only the blocks' inputs and
        recomputes one block at a time. MAISI's ``use_checkpointing`` checkpoints the decoder as one piece, whose
        backward recomputes all of it at once, so it lowers the peak of a step only when the encoder trains too
        (``bench/decoder_memory.py``). Same values and gradients either way."""
        if not (self.checkpoint_blocks and torch.is_grad_enabled()):
            return super().decode(z)
        x = self.post_quant_conv(z)
        for block in self.decoder.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent: the posterior mean ``z_mu`` of ``x``; ``(B, C, H, W, D) -> (B, c, H/f, W/f, D/f)``."""
        return self.encode(x)[0]


def build_vae(architecture: dict[str, Any] | None = None, **runtime: Any) -> MeduetVAE:
    """Build a ``MeduetVAE`` from an architecture dict (as stored in checkpoints) plus runtime-only options."""
    arch = dict(MAISI_CT_ARCHITECTURE if architecture is None else architecture)
    arch.update(runtime)
    return MeduetVAE(**arch)


# patch-wise coding lives in meduet.networks.patchwise; its names stay importable from here
from meduet.networks.patchwise import (  # noqa: E402
    PatchEncoding,
    decode_patchwise,
    encode_patchwise,
    fit_overlap,
    fit_tiling,
    fit_windows,
    reconstruct_patchwise,
)
