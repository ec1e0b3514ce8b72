"""Patch-wise coding of whole volumes with a VAE (3D MedDiffusion's scheme): MONAI sliding windows over the image to
encode and over the latent to decode, the windows fitted to a volume (``fit_*``), where their borders fall
(``tile_borders``), and the one shared setting a checkpoint records (``PatchEncoding``). Networks take tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from meduet.errors import MeduetConfigError

__all__ = ["encode_patchwise", "decode_patchwise", "reconstruct_patchwise", "PatchEncoding", "fit_windows",
           "fit_overlap", "fit_tiling", "tile_borders"]


def _check_divisible(shape: Sequence[int], factor: int, what: str) -> None:
    if any(int(s) % factor for s in shape):
        raise ValueError(f"{what} {tuple(shape)} must be divisible by {factor} (pad with DivisiblePadd(k={factor}))")


def _window(size: Sequence[int] | int, shape: Sequence[int]) -> list[int]:
    """A sliding-window size per axis, no larger than the volume."""
    ps = [size] * len(shape) if isinstance(size, int) else list(size)
    return [min(int(p), int(s)) for p, s in zip(ps, shape)]


def _sliding(predictor, x, roi, overlap, sw_batch_size, mode, sw_device, device) -> torch.Tensor:
    # MONAI's sliding window handles outputs whose grid is a fixed zoom of the input's (encode: 1/f, decode: f)
    return sliding_window_inference(
        x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode=mode,
        sw_device=sw_device, device=device,
    )


def encode_patchwise(
    vae: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int] | int = 64,
    overlap: float = 0.0,
    sw_batch_size: int = 4,
    mode: str = "constant",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Encode a whole volume of any size patch by patch to its latent mean (bounded memory).

    ``image``: ``(B, C, H, W, D)`` with sides divisible by ``vae.downsample_factor``; returns
    ``(B, latent_channels, H/f, W/f, D/f)``. With ``overlap=0`` every patch is encoded independently
    (3D MedDiffusion's patch-wise encoding); with overlap > 0 overlapping patches are blended.
    ``device`` keeps the stitched output (e.g. CPU) while patches run on ``sw_device``.
    ``sw_batch_size`` windows go through the network per call (memory: that many windows' activations). On CPU
    the default 4 is also much faster than 1: for a batch of one, PyTorch runs small 3x3x3 convolutions (e.g.
    32^3 windows) with its native ``slow_conv3d`` instead of oneDNN; ``bench/sliding_batch.py`` measures 6-8x
    for encoding 32^3 windows and ~3.5x for decoding, with no more memory (BENCHMARKS.md).
    """
    f = vae.downsample_factor
    _check_divisible(image.shape[2:], f, "image spatial shape")
    ps = _window(patch_size, image.shape[2:])
    _check_divisible(ps, f, "patch size")
    return _sliding(vae.encode_mean, image, ps, overlap, sw_batch_size, mode, sw_device, device)


def decode_patchwise(
    vae: torch.nn.Module,
    latent: torch.Tensor,
    latent_patch_size: Sequence[int] | int = 16,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode a large latent through overlapping latent windows blended with Gaussian weights.

    ``latent``: ``(B, c, h, w, d)``; returns ``(B, C_out, h*f, w*f, d*f)``. ``sw_batch_size``: windows per
    network call (see ``encode_patchwise``).
    """
    ps = _window(latent_patch_size, latent.shape[2:])
    return _sliding(vae.decode, latent, ps, overlap, sw_batch_size, mode, sw_device, device)


def reconstruct_patchwise(
    vae: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int] | int | None = None,
    overlap: float = 0.0,
    decode_patch_size: Sequence[int] | int | None = None,
) -> torch.Tensor:
    """Image -> latent mean -> image. ``patch_size=None`` encodes the whole volume at once;
    ``decode_patch_size=None`` decodes the whole latent at once (volume-wise decoding)."""
    if patch_size is None:
        z = vae.encode_mean(image)
    else:
        z = encode_patchwise(vae, image, patch_size=patch_size, overlap=overlap)
    if decode_patch_size is None:
        return vae.decode(z)
    return decode_patchwise(vae, z, latent_patch_size=decode_patch_size)


def fit_windows(size: int, max_window: int, min_overlap: int = 0, multiple: int = 1) -> tuple[int, int]:
    """The fewest windows along one axis of ``size`` voxels that are at most ``max_window`` long and overlap their
    neighbours by at least ``min_overlap``: returns ``(window, count)``, the window as short as that count allows
    (rounded up to a multiple of ``multiple``; ``size``, ``max_window`` and ``min_overlap`` must be multiples of it).
    One window (``size``) when the axis fits. Placed by MONAI's sliding windows with the step ``window -
    min_overlap`` (``fit_overlap``), the last window shifted back to the face, so no overlap is below the minimum."""
    size, max_window, min_overlap, m = int(size), int(max_window), int(min_overlap), int(multiple)
    if any(v % m for v in (size, max_window, min_overlap)):
        raise MeduetConfigError(f"size {size}, maximum window {max_window} and minimum overlap {min_overlap} must be "
                                f"multiples of {m} (the VAE's downsampling factor)")
    if size <= max_window:
        return size, 1
    if not 0 <= min_overlap < max_window:
        raise MeduetConfigError(f"the minimum overlap ({min_overlap}) must be below the maximum window ({max_window})")
    length, most, over = size // m, max_window // m, min_overlap // m
    count = -(-(length - over) // (most - over))
    window = -(-(length + (count - 1) * over) // count)
    return window * m, count


def fit_overlap(window: int, size: int, min_overlap: int) -> float:
    """The overlap fraction for MONAI's ``sliding_window_inference`` whose step ``int(window * (1 - overlap))`` is
    exactly ``window - min_overlap`` (half a voxel of margin against rounding)."""
    if window >= size or min_overlap <= 0:
        return 0.0
    return (min_overlap - 0.5) / window


def fit_tiling(shape: Sequence[int], max_window: Sequence[int] | int, min_overlap: int = 0,
               multiple: int = 1) -> tuple[list[int], list[float]]:
    """``fit_windows`` per axis: MONAI ``roi_size`` and per-axis ``overlap`` for a volume of spatial ``shape``."""
    most = [max_window] * len(shape) if isinstance(max_window, int) else list(max_window)
    roi = [fit_windows(s, w, min_overlap, multiple)[0] for s, w in zip(shape, most)]
    return roi, [fit_overlap(r, s, min_overlap) for r, s in zip(roi, shape)]


def tile_borders(size: int, window: int, overlap: float = 0.0) -> list[int]:
    """Interior positions along one axis of ``size`` voxels where MONAI's sliding windows (``window`` voxels,
    ``overlap``) begin or end, i.e. where patch-wise coding can leave a seam. MONAI steps windows by
    ``int(window * (1 - overlap))`` and shifts the last one back to end at the face (``dense_patch_slices``), so
    borders are not at multiples of the window when the size is not one."""
    window = min(int(window), int(size))
    interval = window if window == size else max(int(window * (1 - overlap)), 1)
    slices = dense_patch_slices((int(size),), (window,), (interval,))
    return sorted({int(sl[0].start) for sl in slices if sl[0].start > 0} | {int(sl[0].stop) for sl in slices if sl[0].stop < size})



@dataclasses.dataclass(frozen=True)
class PatchEncoding:
    """How a whole volume is encoded patch by patch (and, optionally, decoded window by window): MONAI sliding
    windows, the last window along an axis shifted back to end at the volume's face.

    Encoding (``tiling``):
        ``"fixed"``: windows of ``patch_size`` (image voxels) stepped by ``overlap`` (a fraction), ``mode`` blending.
        3D MedDiffusion's patch-wise encoding is ``fixed`` with ``overlap=0`` (independent patches).
        ``"fit"`` (not in the paper): per volume, the fewest windows no larger than ``patch_size`` that overlap by at
        least ``min_overlap`` image voxels (``fit_windows``), e.g. a 256^3 volume with ``patch_size=128``: 2 x 2 x 2
        windows of 128^3.
    Decoding (``decode_window``):
        ``None``: one decoder call on the whole latent (3D MedDiffusion's volume-wise decoding; memory grows with
        the volume). A latent side (not in the paper): per volume, the fewest latent windows no larger than
        ``decode_window`` that overlap by at least ``decode_overlap`` latent voxels, blended with ``decode_mode``
        (memory bounded by one window), e.g. a 64^3 latent with ``decode_window=40, decode_overlap=2``: 2 x 2 x 2
        windows of 33^3 (1.10x the whole volume's decoder work, against 3.4x for 16^3 windows at overlap 0.25).
    ``sw_batch_size`` / ``decode_batch_size``: windows per encoder / decoder call (memory: that many windows'
    activations; fitted decoding windows are large, so one at a time by default).

    One setting, shared: decoder fine-tuning (``DecoderFinetuneTrainer``) encodes its training volumes with it and
    stores it in the VAE's record (``meta["patch_encoding"]``), the latent cache (encode.yaml) and the seam metric
    (evaluate.yaml) read it from there (``of``), so the decoder is fine-tuned on the latents the chain produces.
    """

    patch_size: tuple[int, ...] | int = 64
    overlap: float = 0.0
    mode: str = "constant"
    tiling: str = "fixed"
    min_overlap: int = 0
    decode_window: tuple[int, ...] | int | None = None
    decode_overlap: int = 2
    decode_mode: str = "gaussian"
    sw_batch_size: int = 4
    decode_batch_size: int = 1

    def __post_init__(self) -> None:
        def norm(size):
            return int(size) if isinstance(size, int) else tuple(int(p) for p in size)

        object.__setattr__(self, "patch_size", norm(self.patch_size))
        if self.decode_window is not None:
            object.__setattr__(self, "decode_window", norm(self.decode_window))
        if not 0.0 <= float(self.overlap) < 1.0:
            raise MeduetConfigError(f"patch encoding overlap must be in [0, 1), got {self.overlap}")
        for key in ("mode", "decode_mode"):
            if getattr(self, key) not in ("constant", "gaussian"):
                raise MeduetConfigError(f"patch encoding {key} must be 'constant' or 'gaussian', got "
                                        f"{getattr(self, key)!r}")
        if self.tiling not in ("fixed", "fit"):
            raise MeduetConfigError(f"patch encoding tiling must be 'fixed' or 'fit', got {self.tiling!r}")
        for key in ("min_overlap", "decode_overlap"):
            if int(getattr(self, key)) < 0:
                raise MeduetConfigError(f"patch encoding {key} must be >= 0 voxels, got {getattr(self, key)}")
        for key in ("sw_batch_size", "decode_batch_size"):
            if int(getattr(self, key)) < 1:
                raise MeduetConfigError(f"patch encoding {key} must be >= 1, got {getattr(self, key)}")

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode_tiling(self, shape: Sequence[int], multiple: int = 1) -> tuple[list[int], list[float]]:
        """MONAI ``roi_size`` and per-axis ``overlap`` of the encoding windows on a volume of spatial ``shape``."""
        if self.tiling == "fit":
            return fit_tiling(shape, self.patch_size, int(self.min_overlap), multiple)
        return _window(self.patch_size, shape), [float(self.overlap)] * len(shape)

    def encode(self, vae: torch.nn.Module, image: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The latent mean of ``image`` ``(B, C, H, W, D)``, window by window (``kwargs``: ``sw_batch_size``,
        ``sw_device``, ``device``)."""
        if self.tiling == "fixed":
            kwargs.setdefault("sw_batch_size", int(self.sw_batch_size))
            return encode_patchwise(vae, image, self.patch_size, float(self.overlap), mode=self.mode, **kwargs)
        f = vae.downsample_factor
        _check_divisible(image.shape[2:], f, "image spatial shape")
        roi, overlap = self.encode_tiling(image.shape[2:], f)
        return _sliding(vae.encode_mean, image, roi, overlap, kwargs.get("sw_batch_size", int(self.sw_batch_size)),
                        self.mode, kwargs.get("sw_device"), kwargs.get("device"))

    def window(self, shape: Sequence[int], multiple: int = 1) -> list[int]:
        """The encoding window actually used on a volume of ``shape`` (no larger than the volume)."""
        return self.encode_tiling(shape, multiple)[0]

    # -- decoding ------------------------------------------------------------------------------------------------
    def decode_tiling(self, latent_shape: Sequence[int]) -> tuple[list[int], list[float]] | None:
        """MONAI ``roi_size`` and per-axis ``overlap`` of the latent decoding windows (None: volume-wise)."""
        if self.decode_window is None:
            return None
        return fit_tiling(latent_shape, self.decode_window, int(self.decode_overlap))

    def decode(self, vae: torch.nn.Module, latent: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The image of ``latent`` ``(B, c, h, w, d)``: one decoder call (``decode_window=None``) or latent windows."""
        tiles = self.decode_tiling(latent.shape[2:])
        if tiles is None:
            return vae.decode(latent)
        return _sliding(vae.decode, latent, tiles[0], tiles[1], kwargs.get("sw_batch_size", int(self.decode_batch_size)),
                        self.decode_mode, kwargs.get("sw_device"), kwargs.get("device"))

    def reconstruct(self, vae: torch.nn.Module, image: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.decode(vae, self.encode(vae, image, **kwargs), **kwargs)

    def borders(self, shape: Sequence[int], downsample_factor: int) -> list[list[int]]:
        """Per axis of an image of spatial ``shape``: the interior positions where an encoding window or (with
        ``decode_window``) a decoding window begins or ends, i.e. where this scheme can leave a seam."""
        f = int(downsample_factor)
        roi, overlap = self.encode_tiling(shape, f)
        out = [set(tile_borders(s, r, o)) for s, r, o in zip(shape, roi, overlap)]
        latent = [int(s) // f for s in shape]
        tiles = self.decode_tiling(latent)
        if tiles is not None:
            for axis, (s, r, o) in enumerate(zip(latent, *tiles)):
                out[axis] |= {b * f for b in tile_borders(s, r, o)}
        return [sorted(b) for b in out]

    # -- record --------------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        def plain(size):
            return size if size is None or isinstance(size, int) else list(size)

        return {"patch_size": plain(self.patch_size), "overlap": float(self.overlap), "mode": self.mode,
                "tiling": self.tiling, "min_overlap": int(self.min_overlap),
                "decode_window": plain(self.decode_window), "decode_overlap": int(self.decode_overlap),
                "decode_mode": self.decode_mode, "sw_batch_size": int(self.sw_batch_size),
                "decode_batch_size": int(self.decode_batch_size)}

    @classmethod
    def of(cls, vae: torch.nn.Module, patch_size: Sequence[int] | int | None = None, overlap: float | None = None,
           mode: str | None = None, default: PatchEncoding | None = None, **replace: Any) -> PatchEncoding:
        """The scheme the VAE's decoder was fine-tuned with (its record's ``patch_encoding``; ``default`` for a VAE
        without one, e.g. before fine-tuning or MAISI's weights), with any argument that is not None replacing
        the stored value (``replace``: the other fields, e.g. ``decode_window``)."""
        stored = dict((getattr(vae, "meta", {}) or {}).get("patch_encoding") or {})
        base = cls(**stored) if stored else (default or cls())
        given = {"patch_size": patch_size, "overlap": overlap, "mode": mode, **replace}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
