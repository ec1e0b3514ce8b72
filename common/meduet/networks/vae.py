"""The latent codec: MONAI's MAISI autoencoder plus what the next stages need to know about it.

``MeduetVAE`` is ``monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi`` with one
addition: the facts a downstream stage must not re-guess (the architecture, the latent scale factor, the
preprocessing, the domains it was trained on) travel inside the state dict as PyTorch "extra state"
(key ``_extra_state``). ``models/model.pt`` therefore stays a flat state dict that ``monai.bundle.load``,
MONAI's ``CheckpointLoader`` and MONAI Label load as usual, and ``load_vae(path)`` rebuilds the network from
the file alone.

Shapes: images ``(B, C_in, H, W, D)`` with ``H, W, D`` divisible by ``downsample_factor``; latents
``(B, latent_channels, H/f, W/f, D/f)``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D
from monai.inferers import sliding_window_inference

from meduet.errors import MeduetConfigError

__all__ = [
    "MeduetVAE",
    "MAISI_CT_ARCHITECTURE",
    "build_vae",
    "load_vae",
    "load_pretrained_weights",
    "encode_patchwise",
    "decode_patchwise",
    "reconstruct_patchwise",
    "encode_record",
    "with_pretrained",
    "decode_record",
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

#: Size of the JSON record stored in the state dict under ``_extra_state``.
RECORD_BYTES = 8192

# Arguments that change only how the network computes (memory/speed), never its weights.
_RUNTIME_ARGS = ("num_splits", "dim_split", "norm_float16", "use_checkpointing", "use_flash_attention", "fast_norm")


def _use_torch_group_norm(module: torch.nn.Module) -> None:
    """Swap every ``MaisiGroupNorm3D`` for an equivalent ``torch.nn.GroupNorm`` (same state-dict keys)."""
    for name, child in list(module.named_children()):
        if isinstance(child, MaisiGroupNorm3D):
            norm = torch.nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            _use_torch_group_norm(child)


class MeduetVAE(AutoencoderKlMaisi):
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
    """

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
    ) -> None:
        if attention_levels is None:
            attention_levels = [False] * len(num_channels)
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
        #: What downstream stages read: latent scale factor (1/std of latents), preprocessing, domains, ...
        self.meta: dict[str, Any] = {"latent_scale_factor": 1.0}

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (4 for three levels)."""
        return 2 ** (len(self.architecture["num_channels"]) - 1)

    @property
    def latent_scale_factor(self) -> float:
        return float(self.meta.get("latent_scale_factor", 1.0))

    def get_extra_state(self) -> torch.Tensor:
        return encode_record(
            {"architecture": self.architecture, "downsample_factor": self.downsample_factor, **self.meta}
        )

    def set_extra_state(self, state: Any) -> None:
        state = decode_record(state)
        if not state:
            return
        arch = state.get("architecture")
        if arch is not None:
            mismatched = {k: (v, self.architecture.get(k)) for k, v in arch.items() if self.architecture.get(k) != v}
            if mismatched:
                raise MeduetConfigError(
                    f"checkpoint was trained with a different VAE architecture {mismatched} (checkpoint, network); "
                    "build the network with load_vae(path) or match the config to the checkpoint"
                )
        self.meta = {k: copy.deepcopy(v) for k, v in state.items() if k not in ("architecture", "downsample_factor")}

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent: the posterior mean ``z_mu`` of ``x``; ``(B, C, H, W, D) -> (B, c, H/f, W/f, D/f)``."""
        return self.encode(x)[0]


def encode_record(record: dict[str, Any]) -> torch.Tensor:
    """A JSON-able dict as a fixed-size uint8 tensor (``RECORD_BYTES``), so that every tool that copies state
    dicts by matching tensor shapes (``monai.networks.utils.copy_model_state``, ``monai.bundle.load``) and
    ``torch.load(weights_only=True)`` carry it along."""
    raw = json.dumps(record, sort_keys=True).encode("utf-8")
    if len(raw) > RECORD_BYTES:
        raise ValueError(f"checkpoint record is {len(raw)} bytes, more than {RECORD_BYTES}")
    buf = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf


def decode_record(state: Any) -> dict[str, Any]:
    """Inverse of ``encode_record``; also accepts a plain dict. Returns ``{}`` for an empty record."""
    if isinstance(state, dict):
        return state
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        return {}
    raw = bytes(state.cpu().numpy().tobytes()).rstrip(b"\x00")
    return json.loads(raw.decode("utf-8")) if raw else {}


def build_vae(architecture: dict[str, Any] | None = None, **runtime: Any) -> MeduetVAE:
    """Build a ``MeduetVAE`` from an architecture dict (as stored in checkpoints) plus runtime-only options."""
    arch = dict(MAISI_CT_ARCHITECTURE if architecture is None else architecture)
    arch.update(runtime)
    return MeduetVAE(**arch)


def _read_state_dict(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MeduetConfigError(f"{what} '{path}' does not exist; {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MeduetConfigError(f"{what} '{path}' cannot be loaded safely ({first}); {fix}") from None
    # accept the usual wrappers: {"model": sd}, {"state_dict": sd}, {"autoencoder": sd}
    for key in ("model", "state_dict", "autoencoder", "unet_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise MeduetConfigError(f"{what} '{path}' is not a state dict; {fix}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_vae(path: str | Path, device: str | torch.device = "cpu", **runtime: Any) -> MeduetVAE:
    """Rebuild a trained ``MeduetVAE`` from its ``model.pt`` alone (architecture and meta travel inside).

    ``runtime`` options (``num_splits``, ``dim_split``, ``use_checkpointing``, ...) change memory use only.
    """
    fix = "train it first (bundles/meduet_vae: python -m monai.bundle run training ...) or download the bundle"
    state = _read_state_dict(path, "VAE checkpoint", fix)
    extra = decode_record(state.get("_extra_state"))
    if not isinstance(extra, dict) or "architecture" not in extra:
        raise MeduetConfigError(
            f"VAE checkpoint '{path}' has no architecture record (not written by meduet_vae); "
            "for MAISI's published weights use load_pretrained_weights(build_vae(), path)"
        )
    unknown = set(runtime) - set(_RUNTIME_ARGS)
    if unknown:
        raise MeduetConfigError(f"load_vae: {sorted(unknown)} are not runtime options (allowed: {_RUNTIME_ARGS})")
    vae = build_vae(extra["architecture"], **runtime)
    vae.load_state_dict(state, strict=True)
    return vae.to(device).eval()


def load_pretrained_weights(vae: MeduetVAE, path: str | Path) -> MeduetVAE:
    """Load autoencoder weights saved as a plain ``AutoencoderKlMaisi`` state dict (MAISI's published format).

    Keys must match exactly (a ``module.`` prefix and ``{"state_dict"|"model": ...}`` wrappers are accepted);
    a mismatch is a one-line error rather than silently random weights.
    """
    fix = "set pretrained_ckpt to MAISI's autoencoder file for the paper architecture (or null)"
    state = _read_state_dict(path, "pretrained VAE weights", fix)
    own_extra = state.pop("_extra_state", None)
    expected = {k: v for k, v in vae.state_dict().items() if k != "_extra_state"}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise MeduetConfigError(
            f"pretrained VAE weights '{path}' do not fit the configured architecture ({len(missing)} missing keys "
            f"e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(wrong)} of another shape "
            f"e.g. {wrong[:2]}); {fix}"
        )
    vae.load_state_dict(state, strict=False)
    if own_extra is not None:
        vae.set_extra_state(own_extra)
    return vae


def with_pretrained(vae: MeduetVAE, path: str | Path | None) -> MeduetVAE:
    """``vae`` with the weights at ``path`` loaded (``None``/empty: unchanged). For configs' ``pretrained_ckpt``."""
    return load_pretrained_weights(vae, path) if path else vae


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
    vae: MeduetVAE,
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
    vae: MeduetVAE,
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
    vae: MeduetVAE,
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


def require_checkpoint(path: str | Path, bundle: str = "meduet_vae") -> str:
    """One-line error when a bundle's checkpoint is missing (before any workflow component is built)."""
    if not Path(path).is_file():
        raise MeduetConfigError(
            f"checkpoint '{path}' does not exist; train {bundle} first "
            f"(python -m monai.bundle run training --config_file bundles/{bundle}/configs/train.yaml, "
            "with a preset for CPU) or download the bundle"
        )
    return str(path)
