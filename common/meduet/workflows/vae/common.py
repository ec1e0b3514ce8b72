"""What the meduet_vae workflows share: the VAE's stored preprocessing and loading one case onto its grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from meduet.networks.vae import MeduetVAE

__all__ = ["preprocessing_for", "load_case"]


def preprocessing_for(vae: MeduetVAE, datalist: dict[str, Any] | None = None, **override: Any) -> dict[str, Any]:
    """The VAE's stored preprocessing, with the datalist's ``modality`` and explicit overrides applied."""
    prep = dict(vae.meta.get("preprocessing") or {})
    if datalist is not None and datalist.get("modality"):
        prep["modality"] = datalist["modality"]
    prep.update({k: v for k, v in override.items() if v is not None})
    prep.setdefault("pad_multiple", vae.downsample_factor)
    return prep


def affine_of(t: torch.Tensor) -> np.ndarray:
    aff = getattr(t, "affine", None)
    return np.eye(4) if aff is None else np.asarray(aff.cpu().numpy() if hasattr(aff, "cpu") else aff, dtype=np.float64)


def load_case(transform, item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, np.ndarray, dict]:
    data = transform({k: v for k, v in item.items() if k in ("image", "label")})
    image = data["image"]
    affine = affine_of(image)
    x = (image.as_tensor() if hasattr(image, "as_tensor") else image).unsqueeze(0).float().to(device)
    return x, affine, data
