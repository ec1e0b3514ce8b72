"""The code a scan gets from a conditioned generator, as one vector per scan, for the workflows that edit codes
(autoencode, interpolate, manipulate):

* condition ``semantic`` (LDAE): the semantic encoder trained with the generator (``net.encode_semantic``);
* condition ``factors`` (MeDUET): the frozen meduet_pretrain encoder's pooled content and style of the clean latent,
  concatenated in that order -- the variant of diffusion autoencoding whose encoder is pretrained and frozen rather
  than trained with the generator. Generators conditioned on the content token map (``content_map``) are refused:
  their condition is a map, not a vector to move along a direction.

``codes.encode(x)`` gives ``(B, D)``; ``codes.cond(code)`` the ``cond`` dict the generator reads."""

from __future__ import annotations

from typing import Any

import torch

from meduet.errors import MeduetConfigError
from meduet.workflows.diffusion.common import conditioner_for, load_generator

__all__ = ["GeneratorCodes", "CODE_CONDITIONS"]

#: the conditions whose generators have a vector code per scan, and what the code is
CODE_CONDITIONS = {"semantic": "LDAE semantic code (encoder trained with the generator)",
                   "factors": "MeDUET pooled content + style (frozen meduet_pretrain encoder)"}


class GeneratorCodes:
    """A generator with its code: ``net``, ``objective``, ``rec`` (its record), ``condition``, ``what`` (the code in
    words), ``dim`` (the code's length), ``encode`` and ``cond``."""

    def __init__(self, model_ckpt: str, pretrain_ckpt: str | None, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.net, self.objective, self.rec = load_generator(model_ckpt, self.device)
        self.condition = str(self.rec.get("condition", "none"))
        if self.condition not in CODE_CONDITIONS:
            raise MeduetConfigError(f"'{model_ckpt}' is a generator conditioned on '{self.condition}', which gives no "
                                    "code per scan; use an LDAE (configs/ldae.yaml, models/ldae/model.pt) or a "
                                    "generator conditioned on MeDUET factors (train.yaml, models/model.pt)")
        self.what = CODE_CONDITIONS[self.condition]
        self.keys: tuple[str, ...] = tuple(self.net.cond_keys)
        self.conditioner = None
        if self.condition == "factors":
            if "content_map" in self.keys:
                raise MeduetConfigError(f"'{model_ckpt}' is conditioned on the content token map (content_map), not a "
                                        "vector code; use a generator trained without content_map")
            self.conditioner = conditioner_for(self.rec, pretrain_ckpt, self.device)
            self.sizes = [int(getattr(self.net, f"{k}_dim")) for k in self.keys]
        else:
            self.sizes = [int(self.net.code_dim)]

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Codes ``(B, D)`` of clean scaled latents ``x (B, C, S1, S2, S3)`` (in chunks of ``batch``)."""
        out = []
        for i in range(0, len(x), batch):
            xi = x[i:i + batch].to(self.device)
            if self.condition == "semantic":
                parts = [self.net.encode_semantic(xi)]
            else:
                f = self.conditioner.factors(xi)  # type: ignore[union-attr]
                parts = [f[k].flatten(1) for k in self.keys]
            out.append(torch.cat(parts, 1))
        return torch.cat(out)

    def cond(self, code: torch.Tensor) -> dict[str, Any]:
        """The generator's ``cond`` for codes ``(B, D)`` (as ``encode`` made them)."""
        if self.condition == "semantic":
            return {"semantic": code}
        return dict(zip(self.keys, torch.split(code, self.sizes, dim=1)))
