"""Initialising a latent DiT from meduet_pretrain's latent ViT (``LatentDiT.init_from_pretrained``).

The source is a module or a state dict (networks take tensors, not files: read a checkpoint with
``meduet.records.read_state_dict`` first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.errors import MeduetConfigError
from meduet.networks.latent_vit import LatentViT

__all__ = ["init_from_vit", "vit_state"]


def init_from_vit(dit: nn.Module, source: Any, gates: str = "open") -> dict[str, Any]:
    """Initialise the DiT from meduet_pretrain's latent ViT; returns a report of what was copied.

    Args:
        source: a ``LatentViT``, a module holding one (``MeDUET``, ``MaskedAutoencoder``, ``PretrainedEncoder``,
            ``FactorEncoder``), a state dict of any of them (keys ``backbone.encoder.*``, ``encoder.*`` or
            bare, ``module.`` prefixes allowed; read a ``model.pt`` with ``meduet.records.read_state_dict``).
        gates: ``"open"`` (default) sets the attention/MLP gates of the copied blocks to 1, so at init the DiT trunk
            computes exactly the pretrained ViT's blocks (with the ViT's LayerNorm affine in the adaLN
            biases); ``"zero"`` keeps adaLN-Zero's zero gates (copied blocks start as identities).

    What is copied, where shapes match: for the first ``min(depth, source depth)`` blocks ``attn.qkv``,
    ``attn.out_proj``, ``mlp.linear1``, ``mlp.linear2`` (weights and biases), and the ViT's ``norm1``/``norm2``
    (gamma, beta) as the adaLN bias (scale = gamma - 1, shift = beta; the modulation weights stay zero so the
    timestep/condition then learn to move them); the ViT's final norm into the final layer's adaLN bias; the
    patch-embedding convolution, trilinearly resampled to this ``patch_size`` (and multiplied by
    ``(p_src / p)^3`` so a smooth input gives the same response) when the patch sizes differ. Positions are not
    copied: both networks use the same fixed sin-cos function, evaluated on the DiT's own token grid. The final
    linear stays zero, so the network still outputs zeros at init. ``dim`` must equal the ViT's width;
    ``num_heads`` should equal the encoder's (a state dict does not record it, so it is not checked: other head
    counts still copy, but split the copied projections differently).
    """
    if gates not in ("open", "zero"):
        raise MeduetConfigError(f"gates must be 'open' or 'zero', got {gates!r}")
    state = vit_state(source)
    src_dim = state["patch_embed.weight"].shape[0]
    if src_dim != dit.dim:
        raise MeduetConfigError(f"init_from_pretrained: the pretrained encoder has width {src_dim} but this DiT "
                                f"has dim {dit.dim}; set the DiT's dim to {src_dim} or switch "
                                "init_from_pretrained off")
    src_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    copied, skipped = [], []

    def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if tuple(dst.shape) == tuple(src.shape):
            dst.copy_(src.to(dst.dtype))
            copied.append(name)
        else:
            skipped.append(f"{name} {tuple(src.shape)}->{tuple(dst.shape)}")

    with torch.no_grad():
        # patch embedding
        w = state["patch_embed.weight"].float()
        p_src = w.shape[-1]
        if p_src != dit.patch_size or w.shape[1] != dit.in_channels:
            if w.shape[1] != dit.in_channels:
                raise MeduetConfigError(f"init_from_pretrained: the encoder takes {w.shape[1]} latent channels, "
                                        f"the DiT {dit.in_channels}; use the same VAE")
            w = F.interpolate(w, size=(dit.patch_size,) * 3, mode="trilinear", align_corners=False)
            w = w * (p_src / dit.patch_size) ** 3
            patch_note = f"resampled {p_src}^3 -> {dit.patch_size}^3"
        else:
            patch_note = "copied"
        put(dit.patch_embed.weight, w, "patch_embed.weight")
        put(dit.patch_embed.bias, state["patch_embed.bias"], "patch_embed.bias")
        n = min(dit.depth, src_depth)
        for i in range(n):
            blk, pre = dit.blocks[i], f"blocks.{i}."
            for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.out_proj.weight", "attn.out_proj.bias",
                         "mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"):
                dst = blk.get_parameter(name) if _has_param(blk, name) else None
                if pre + name in state and dst is not None:
                    put(dst, state[pre + name], pre + name)
                elif pre + name in state or dst is not None:
                    skipped.append(pre + name + " (absent on one side)")
            bias = blk.adaLN_modulation[-1].bias
            d = dit.dim
            for j, norm in ((0, "norm1"), (3, "norm2")):
                gamma, beta = state.get(f"{pre}{norm}.weight"), state.get(f"{pre}{norm}.bias")
                if gamma is not None and beta is not None:
                    bias[j * d:(j + 1) * d].copy_(beta)
                    bias[(j + 1) * d:(j + 2) * d].copy_(gamma - 1)
                    copied.append(f"{pre}{norm} -> adaLN bias")
                if gates == "open":
                    bias[(j + 2) * d:(j + 3) * d].fill_(1.0)
        if "norm.weight" in state and "norm.bias" in state:
            fb = dit.final_layer.adaLN_modulation[-1].bias
            fb[: dit.dim].copy_(state["norm.bias"])
            fb[dit.dim:].copy_(state["norm.weight"] - 1)
            copied.append("norm -> final_layer adaLN bias")
    return {
        "blocks": n,
        "source_depth": src_depth,
        "depth": dit.depth,
        "patch_embed": patch_note,
        "gates": gates,
        "positions": "fixed sin-cos on the DiT's token grid (not copied)",
        "copied": copied,
        "skipped": skipped,
    }



def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def vit_state(source: Any) -> dict[str, torch.Tensor]:
    """The latent ViT's state dict (keys ``patch_embed.*``, ``blocks.i.*``, ``norm.*``) from a module or a state
    dict."""
    if isinstance(source, nn.Module):
        vit = source
        for attr in ("vit", "encoder"):
            if not isinstance(vit, LatentViT) and isinstance(getattr(vit, attr, None), nn.Module):
                vit = getattr(vit, attr)
        if not isinstance(vit, LatentViT):
            found = [m for m in source.modules() if isinstance(m, LatentViT)]
            if not found:
                raise MeduetConfigError(f"init_from_pretrained: {type(source).__name__} holds no latent ViT; pass "
                                        "meduet_pretrain's network, encoder or model.pt")
            vit = found[0]
        return {k: v.detach() for k, v in vit.state_dict().items() if torch.is_tensor(v) and k != "_extra_state"}
    if not isinstance(source, Mapping):
        raise MeduetConfigError(f"init_from_pretrained: expected a module or a state dict, got "
                                f"{type(source).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}
    for prefix in ("backbone.encoder.", "encoder.", ""):
        if prefix + "patch_embed.weight" in state and prefix + "blocks.0.attn.qkv.weight" in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    raise MeduetConfigError("init_from_pretrained: the state dict has no latent ViT (no '[backbone.]encoder."
                            "patch_embed.weight'); pass meduet_pretrain's model.pt")
