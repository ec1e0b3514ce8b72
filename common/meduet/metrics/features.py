"""Feature extractors for the generation metrics (``meduet.metrics.generation``).

Feature extractors (``FeatureExtractor``: ``forward(x) -> (N, F)`` float32 on the CPU, ``name``, ``space``):

* ``MedicalNetFeatures``: global-average-pooled features of a MedicalNet 3D ResNet (MONAI's ``resnet10`` ...
  ``resnet200``) on *decoded images* ``(N, 1, H, W, D)``. The weights come from a local ``.pth`` only (nothing is
  downloaded), e.g. ``resnet_10_23dataset.pth`` of https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10.
  Name ``"medicalnet-resnet10"`` etc. This is the usual FID backbone for 3D medical images.
* ``EncoderFeatures``: meduet_pretrain's frozen encoder on *latents* ``(N, C, S1, S2, S3)``: sliding windows of the
  pretraining crop (``meduet.networks.windows.encode_latents``), feature = ``[pooled content, pooled style]``
  (content only for the masked-autoencoder baseline). Name ``"meduet-encoder (proxy)"``: the encoder was trained
  on the same data as the generator's conditioner, so its FID is a *proxy* that is comparable between runs of this
  project, not with published FIDs.

``build_feature_extractor("auto", weights_path=..., pretrain_ckpt=...)`` picks MedicalNet when a weights path is
given and the encoder proxy otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks import nets
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

from meduet import records
from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.latent import LatentSpace
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.windows import encode_latents

__all__ = ["Volumes", "FeatureExtractor", "EncoderFeatures", "MedicalNetFeatures", "build_feature_extractor",
           "MEDICALNET_FIX", "as_list"]

Volumes = torch.Tensor | Sequence[torch.Tensor]

MEDICALNET_FIX = ("download MedicalNet weights (e.g. resnet_10_23dataset.pth from "
                  "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10) and pass its path as weights_path, "
                  "or use the pretrained encoder's features (feature extractor 'encoder')")


# ----------------------------------------------------------------------------------------------------------------
# feature extractors
# ----------------------------------------------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """A frozen network giving one feature vector per volume.

    ``forward(x)``: ``x`` is a batch ``(N, C, S1, S2, S3)`` or a sequence of ``N`` volumes ``(C, S1, S2, S3)``
    (possibly of different sizes) -> ``(N, F)`` float32 on the CPU.

    Attributes: ``name`` (reported as ``fid_features``), ``space`` (``"latent"``: takes latents; ``"image"``: takes
    decoded images), ``feature_dim`` (``F``).
    """

    name: str = "features"
    space: str = "latent"

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def forward(self, x: Volumes) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def as_list(x: Volumes, what: str) -> list[torch.Tensor]:
    """``(N, C, ...)`` tensor or sequence of ``(C, ...)`` -> list of ``(C, ...)`` (each 4D)."""
    items = list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)
    for i, v in enumerate(items):
        v = v.as_tensor() if hasattr(v, "as_tensor") else v
        if not isinstance(v, torch.Tensor) or v.ndim != 4:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise MeduetInputError(f"{what} {i} has shape {shape}; expected (C, S1, S2, S3) volumes")
        items[i] = v
    if not items:
        raise MeduetInputError(f"no {what}s given")
    return items


class EncoderFeatures(FeatureExtractor):
    """Features of latents from meduet_pretrain's frozen encoder (a proxy FID backbone).

    Args:
        encoder: a pretraining checkpoint path (meduet_pretrain's ``model.pt``; its encoder and factor heads are
            loaded with ``meduet.records.load_part``), or a network with ``encode`` (``MeDUET``,
            ``MaskedAutoencoder``, ``PretrainedEncoder``).
        latent_space: the latent space (``meduet.latent.LatentSpace``); default: the one the checkpoint record
            describes (an error if it has no ``latent_scale_factor``).
        crop: sliding-window size in latent voxels; default the pretraining crop (record's ``crop_size``, else the
            network's ``input_size``).
        inputs: ``"raw"``: latents as cached by meduet_vae (scaled here, like the pretraining data); ``"scaled"``:
            already scaled (e.g. straight out of ``sample_latents``).
        device: where the encoder runs.

    ``forward(latents (N, C, S1, S2, S3) | [(C, S1, S2, S3)] * N) -> (N, D + Ds)``: the pooled content ``(D)`` and
    pooled style ``(Ds or 2 Ds)`` of ``encode_latents`` (windows with overlap 0.5); ``(N, D)`` for the baseline.
    """

    space = "latent"

    def __init__(self, encoder: nn.Module | str | Path, latent_space: LatentSpace | None = None,
                 crop: Sequence[int] | int | None = None, inputs: str = "raw",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if isinstance(encoder, (str, Path)):
            encoder = records.load_part(encoder, PretrainedEncoder, device)
        if not hasattr(encoder, "encode") or not hasattr(encoder, "patch_size"):
            raise MeduetConfigError(f"{type(encoder).__name__} is not a meduet_pretrain network (no encode/patch_size)")
        if inputs not in ("raw", "scaled"):
            raise ValueError(f"inputs must be 'raw' or 'scaled', got {inputs!r}")
        if latent_space is None:
            latent_space = LatentSpace.from_record(getattr(encoder, "meta", None) or {},
                                                   "the pretrained encoder's record (pass latent_space)")
        self.encoder = encoder.to(device).eval().requires_grad_(False)
        self.latent_space = latent_space
        self.inputs = inputs
        self.device = torch.device(device)
        if crop is not None:
            crop = (int(crop),) * 3 if isinstance(crop, int) else tuple(int(c) for c in crop)
        self.crop = crop
        self.kind = getattr(encoder, "objective", None) or getattr(encoder, "kind", "") or "meduet"
        self.style_dim = 0 if self.kind == "mae" else int(getattr(encoder, "style_vector_dim", 0) or 0)
        self.name = f"{self.kind}-encoder (proxy)"

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.dim) + self.style_dim

    @torch.no_grad()
    def forward(self, x: Volumes) -> torch.Tensor:
        latents = as_list(x, "latent")
        space = self.latent_space if self.inputs == "raw" else LatentSpace(1.0)
        rows = encode_latents(self.encoder, latents, space, device=self.device, desc="encoder features",
                              crop=self.crop)
        self.encoder.eval()
        feats = [torch.cat([r["content"], r["style"]]) if "style" in r else r["content"] for r in rows]
        return torch.stack(feats).float()


class MedicalNetFeatures(FeatureExtractor):
    """Global-average-pooled features of a MedicalNet 3D ResNet on decoded images.

    Args:
        weights_path: a local MedicalNet ``.pth`` (``{"state_dict": {"module.conv1.weight": ...}}`` or a flat state
            dict, ``module.`` prefix optional). Loaded with ``torch.load(weights_only=True)``; every backbone weight
            must be present with its shape (the segmentation/classification head ``conv_seg.*``/``fc.*`` is
            ignored). Nothing is downloaded: a missing file is a ``MeduetConfigError``.
        depth: 10, 18, 34, 50, 101, 152 or 200 (MONAI's ``resnet{depth}`` with MedicalNet's shortcut type and
            downsample bias, ``n_input_channels=1``, ``feed_forward=False``).
        normalize: ``"zscore"`` (MedicalNet's training input: each volume to zero mean, unit std) or ``"none"``.
        batch_size: volumes per forward pass.
        device: where the network runs.

    ``forward(images (N, 1, H, W, D) | [(1, H, W, D)] * N) -> (N, 512)`` (``(N, 2048)`` for depth >= 50).
    """

    space = "image"
    DEPTHS = (10, 18, 34, 50, 101, 152, 200)

    def __init__(self, weights_path: str | Path | None, depth: int = 10, normalize: str = "zscore",
                 batch_size: int = 4, device: str | torch.device = "cpu") -> None:
        super().__init__()
        depth = int(depth)
        if depth not in self.DEPTHS:
            raise MeduetConfigError(f"MedicalNet depth must be one of {self.DEPTHS}, got {depth}")
        if normalize not in ("zscore", "none"):
            raise ValueError(f"normalize must be 'zscore' or 'none', got {normalize!r}")
        if weights_path is None or str(weights_path) == "":
            raise MeduetConfigError(f"MedicalNet features need weights_path; {MEDICALNET_FIX}")
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        net = getattr(nets, f"resnet{depth}")(pretrained=False, spatial_dims=3, n_input_channels=1,
                                               feed_forward=False, shortcut_type=shortcut_type,
                                               bias_downsample=bias_downsample)
        state = records.read_state_dict(weights_path, "MedicalNet weights", MEDICALNET_FIX)
        state = {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}
        own = net.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            detail = "; ".join(f"{what} {keys[:2]}" for what, keys in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys)
            raise MeduetConfigError(f"MedicalNet weights '{weights_path}' do not fit resnet{depth} ({detail}); pass "
                                    f"the depth the file was trained with")
        net.load_state_dict(state, strict=False)  # strict on the backbone by the checks above
        self.net = net.to(device).eval().requires_grad_(False)
        self.depth, self.normalize, self.batch_size = depth, normalize, max(1, int(batch_size))
        self.device = torch.device(device)
        self.weights_path = str(weights_path)
        self.name = f"medicalnet-resnet{depth}"

    @property
    def feature_dim(self) -> int:
        return int(self.net.in_planes)  # channels of layer4's output = pooled feature size

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] != 1:
            raise MeduetInputError(f"MedicalNet takes single-channel images, got {v.shape[0]} channels")
        v = v.float()
        if self.normalize == "zscore":
            v = (v - v.mean()) / v.std().clamp_min(1e-6)
        return v

    @torch.no_grad()
    def forward(self, x: Volumes) -> torch.Tensor:
        images = [self._prepare(v) for v in as_list(x, "image")]
        self.net.eval()
        out = []
        i = 0
        while i < len(images):
            # volumes of one size go through together
            j = i + 1
            while j < len(images) and j - i < self.batch_size and images[j].shape == images[i].shape:
                j += 1
            out.append(self.net(torch.stack(images[i:j]).to(self.device)).float().cpu())
            i = j
        return torch.cat(out)


def build_feature_extractor(kind: str = "auto", *, weights_path: str | Path | None = None, depth: int = 10,
                            pretrain_ckpt: str | Path | None = None, encoder: nn.Module | None = None,
                            latent_space: LatentSpace | None = None, crop: Sequence[int] | int | None = None,
                            inputs: str = "raw", device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor of ``kind``:

    * ``"medicalnet"``: ``MedicalNetFeatures(weights_path, depth)`` (image space);
    * ``"encoder"``: ``EncoderFeatures(encoder or pretrain_ckpt, latent_space, crop, inputs)`` (latent space);
    * ``"auto"``: ``"medicalnet"`` when ``weights_path`` is given, else ``"encoder"`` (the issue's default).
    """
    if kind == "auto":
        kind = "medicalnet" if weights_path not in (None, "") else "encoder"
    if kind == "medicalnet":
        return MedicalNetFeatures(weights_path, depth=depth, device=device)
    if kind == "encoder":
        source = encoder if encoder is not None else pretrain_ckpt
        if source is None:
            raise MeduetConfigError("encoder features need pretrain_ckpt (meduet_pretrain's models/model.pt) or an "
                                    "encoder network")
        return EncoderFeatures(source, latent_space=latent_space, crop=crop, inputs=inputs,
                               device=device)
    raise MeduetConfigError(f"unknown feature extractor {kind!r}; use 'auto', 'encoder' or 'medicalnet'")
