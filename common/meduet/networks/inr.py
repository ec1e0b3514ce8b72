"""DisINR's implicit neural representation: coordinates -> intensity, split into a shared encoder-decoder pair
(learned on many subjects, then frozen) and a small subject-specific encoder (the only part fitted for a new subject).

Coordinates are points ``(N, 3)`` in ``[-1, 1]``, one value per image axis ``(S1, S2, S3)``; the voxel centres of a
volume of shape ``(S1, S2, S3)`` are ``linspace(-1, 1, S_i)`` per axis (:func:`grid_coordinates`; a grid value at
``-1`` / ``1`` sits on the first / last voxel centre, ``align_corners=True``). The representation is continuous, so
the same network renders any grid of the same field of view.

* shared encoder (:class:`FeatureGrids`): dense multiresolution feature grids, one ``(F, R, R, R)`` grid per
  resolution ``R`` of ``shared_resolutions``, read by trilinear interpolation (``torch.nn.functional.grid_sample``)
  and concatenated: ``(N, L * F)``. A dense grid rather than a hash grid: no hashing collisions, plain torch, and
  at the sizes used here (up to 64^3 x 2 features per level) the memory is modest.
* subject encoders (:class:`SubjectGrids`): one coarse ``(F_s, R_s, R_s, R_s)`` grid per subject (``num_subjects``
  of them in pretraining, one in a ``model.pt``), read the same way: ``(N, F_s)``.
* shared decoder: an MLP (``depth`` hidden layers of ``hidden`` units, ReLU) on the concatenation
  ``[shared features, subject features]`` -> one intensity per point; ``output_activation`` ``"softplus"`` keeps it
  positive (PET activity), ``"none"`` leaves it linear.

``parameter_counts()`` gives the split (one subject encoder counted): with the defaults the subject encoder is about
1% of the parameters, as in the seed paper ("~1% of the total").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from meduet.errors import MeduetConfigError
from meduet.records import RecordMixin, register

__all__ = ["FeatureGrids", "SubjectGrids", "DisINR", "grid_coordinates", "OUTPUT_ACTIVATIONS", "SUBJECT_INITS"]

OUTPUT_ACTIVATIONS = ("none", "softplus")
SUBJECT_INITS = ("mean", "random")


def grid_coordinates(shape: Sequence[int], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The voxel centres of a ``(S1, S2, S3)`` grid as points ``(S1 * S2 * S3, 3)`` in ``[-1, 1]`` (row-major, so
    ``values.view(S1, S2, S3)`` is the volume); an axis of size 1 sits at 0."""
    axes = [torch.linspace(-1.0, 1.0, int(s), device=device, dtype=dtype) if int(s) > 1
            else torch.zeros(1, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _sample(grids: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear reads of ``grids (G, F, R1, R2, R3)`` at ``coords (N, 3)`` -> ``(G, N, F)``."""
    # grid_sample's last axis is (x, y, z) = (W, H, D) = (R3, R2, R1): flip ours (axis 1, 2, 3 order)
    where = coords.flip(-1).to(grids.dtype).view(1, -1, 1, 1, 3).expand(grids.shape[0], -1, -1, -1, -1)
    out = F.grid_sample(grids, where, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(grids.shape[0], grids.shape[1], -1).transpose(1, 2)


class FeatureGrids(nn.Module):
    """The shared encoder: dense feature grids at several resolutions, ``(N, 3) -> (N, len(resolutions) * F)``."""

    def __init__(self, resolutions: Sequence[int], features: int, init_scale: float = 1e-2) -> None:
        super().__init__()
        self.grids = nn.ParameterList(
            nn.Parameter(torch.empty(1, int(features), int(r), int(r), int(r)).uniform_(-init_scale, init_scale))
            for r in resolutions)

    @property
    def out_features(self) -> int:
        return sum(int(g.shape[1]) for g in self.grids)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return torch.cat([_sample(g, coords)[0] for g in self.grids], dim=1)


class SubjectGrids(nn.Module):
    """Subject encoders: one coarse feature grid per subject, ``codes (num_subjects, F, R, R, R)``;
    ``forward(coords (N, 3), subject) -> (N, F)`` reads the grid of subject ``subject`` (an index)."""

    def __init__(self, num_subjects: int, resolution: int, features: int, init_scale: float = 1e-2) -> None:
        super().__init__()
        r = int(resolution)
        self.init_scale = float(init_scale)
        self.codes = nn.Parameter(torch.empty(int(num_subjects), int(features), r, r, r).uniform_(-init_scale,
                                                                                                  init_scale))

    def forward(self, coords: torch.Tensor, subject: int = 0) -> torch.Tensor:
        return _sample(self.codes[int(subject): int(subject) + 1], coords)[0]


@register
class DisINR(RecordMixin, nn.Module):
    """The disentangled INR (kind ``"inr"``, meduet_recon's ``model.pt``).

    Args:
        shared_resolutions: grid sizes of the shared encoder, coarse to fine (e.g. ``(4, 8, 16)``).
        shared_features: features per shared grid.
        subject_resolution, subject_features: the subject encoder's grid size and features.
        hidden, depth: the shared decoder's width and hidden-layer count.
        num_subjects: subject encoders held (pretraining: one per training subject; a ``model.pt``: 1, the
            starting point of a new subject's encoder).
        output_activation: ``"none"`` (linear) or ``"softplus"`` (positive output, for PET activity).
        chunk_size: points per decoder call (bounded memory; with gradients each chunk is recomputed in backward,
            ``torch.utils.checkpoint``); not a weight argument.

    ``forward(coords, subject=0)``: points ``(N, 3) -> (N, 1)``, or MONAI's channel-first layout
    ``(B, 3, *spatial) -> (B, 1, *spatial)`` (each channel-3 vector is one point).
    """

    kind = "inr"
    non_weight_args = ("chunk_size",)
    runtime_args = ("chunk_size",)

    def __init__(self, shared_resolutions: Sequence[int] = (8, 16, 32, 64), shared_features: int = 2,
                 subject_resolution: int = 8, subject_features: int = 12, hidden: int = 64, depth: int = 2,
                 num_subjects: int = 1, output_activation: str = "none", chunk_size: int = 65536) -> None:
        super().__init__()
        sizes = [int(r) for r in shared_resolutions]
        if not sizes or min(sizes) < 2 or int(subject_resolution) < 2:
            raise MeduetConfigError(f"DisINR grid resolutions must be >= 2, got shared {list(shared_resolutions)} and "
                                    f"subject {subject_resolution}; fix shared_resolutions / subject_resolution")
        for name, v in (("shared_features", shared_features), ("subject_features", subject_features),
                        ("hidden", hidden), ("depth", depth), ("num_subjects", num_subjects),
                        ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MeduetConfigError(f"DisINR {name} must be a positive integer, got {v!r}; fix the config key")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise MeduetConfigError(f"DisINR output_activation {output_activation!r} is not one of "
                                    f"{OUTPUT_ACTIVATIONS}; fix the config key")
        self.arch: dict[str, Any] = {
            "shared_resolutions": sizes, "shared_features": int(shared_features),
            "subject_resolution": int(subject_resolution), "subject_features": int(subject_features),
            "hidden": int(hidden), "depth": int(depth), "num_subjects": int(num_subjects),
            "output_activation": output_activation, "chunk_size": int(chunk_size)}
        self.meta: dict[str, Any] = {}
        self.chunk_size = int(chunk_size)
        self.softplus = output_activation == "softplus"
        self.shared_encoder = FeatureGrids(sizes, shared_features)
        self.subject_encoder = SubjectGrids(num_subjects, subject_resolution, subject_features)
        width = [self.shared_encoder.out_features + int(subject_features)] + [int(hidden)] * int(depth)
        layers: list[nn.Module] = []
        for a, b in zip(width[:-1], width[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(width[-1], 1))
        self.decoder = nn.Sequential(*layers)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def _points(self, coords: torch.Tensor, subject: int) -> torch.Tensor:
        feats = torch.cat([self.shared_encoder(coords), self.subject_encoder(coords, subject)], dim=1)
        out = self.decoder(feats)
        return F.softplus(out) if self.softplus else out

    def forward(self, coords: torch.Tensor, subject: int = 0) -> torch.Tensor:
        if coords.ndim >= 3 and coords.shape[1] == 3:  # channel-first layout (B, 3, *spatial)
            b, spatial = coords.shape[0], coords.shape[2:]
            pts = coords.movedim(1, -1).reshape(-1, 3)
            return self.forward(pts, subject).view(b, *spatial, 1).movedim(-1, 1)
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise MeduetConfigError(f"DisINR takes points (N, 3) or a coordinate grid (B, 3, ...), got shape "
                                    f"{tuple(coords.shape)}; pass meduet.networks.inr.grid_coordinates(shape)")
        if not 0 <= int(subject) < self.arch["num_subjects"]:
            raise MeduetConfigError(f"subject {subject} is outside the {self.arch['num_subjects']} subject encoders "
                                    "of this network; pass an index below num_subjects")
        outs = []
        for chunk in coords.split(self.chunk_size):
            if torch.is_grad_enabled() and coords.shape[0] > self.chunk_size:
                outs.append(checkpoint(self._points, chunk, int(subject), use_reentrant=False))
            else:
                outs.append(self._points(chunk, int(subject)))
        return torch.cat(outs, dim=0)

    def render(self, shape: Sequence[int], subject: int = 0) -> torch.Tensor:
        """The volume on the voxel centres of ``shape (S1, S2, S3)``: ``(1, 1, S1, S2, S3)``, in chunks of
        ``chunk_size`` points (differentiable unless called under ``torch.no_grad``)."""
        p = next(self.parameters())
        coords = grid_coordinates(shape, device=p.device, dtype=p.dtype)
        return self.forward(coords, subject).view(1, 1, *[int(s) for s in shape])

    # -- the split ------------------------------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared encoder-decoder pair's parameters (frozen at test time)."""
        return [*self.shared_encoder.parameters(), *self.decoder.parameters()]

    def subject_parameters(self) -> list[nn.Parameter]:
        """The subject encoders' parameters (the only ones fitted for a new subject)."""
        return list(self.subject_encoder.parameters())

    def parameter_counts(self) -> dict[str, float]:
        """``shared_encoder``, ``decoder``, ``subject_encoder`` (one subject's grid), ``total`` (the three) and
        ``subject_fraction`` = subject_encoder / total."""
        shared = sum(p.numel() for p in self.shared_encoder.parameters())
        decoder = sum(p.numel() for p in self.decoder.parameters())
        subject = self.subject_encoder.codes[0].numel()
        total = shared + decoder + subject
        return {"shared_encoder": shared, "decoder": decoder, "subject_encoder": subject, "total": total,
                "subject_fraction": subject / total}

    def single_subject(self, init: str = "mean", subject: int | None = None) -> DisINR:
        """A copy with one subject encoder (what ``model.pt`` holds): the mean of this network's subject grids
        (``init="mean"``; or subject ``subject``'s grid), shared pair and record copied."""
        with torch.random.fork_rng(devices=[]):
            net = type(self)(**{**self.arch, "num_subjects": 1})
        own = self.state_dict()
        net.load_state_dict({k: v for k, v in own.items() if not k.startswith("subject_encoder.")
                             and k != "_extra_state"}, strict=False)
        with torch.no_grad():
            codes = self.subject_encoder.codes
            net.subject_encoder.codes.copy_(codes[int(subject): int(subject) + 1] if subject is not None
                                            else codes.mean(0, keepdim=True))
        net.meta = copy.deepcopy(dict(self.meta))
        return net.to(self.subject_encoder.codes.device)

    def reset_subject(self, init: str = "mean", seed: int = 0) -> DisINR:
        """Start a new subject's encoder: ``"mean"`` keeps the stored starting grid (the pretraining subjects' mean
        in a ``model.pt``), ``"random"`` draws it afresh (uniform, seeded, the global random state untouched)."""
        if init not in SUBJECT_INITS:
            raise MeduetConfigError(f"subject_init {init!r} is not one of {SUBJECT_INITS}; fix the config key")
        if init == "random":
            codes = self.subject_encoder.codes
            gen = torch.Generator().manual_seed(int(seed))
            fresh = torch.rand(codes.shape, generator=gen) * 2 - 1
            with torch.no_grad():
                codes.copy_((fresh * self.subject_encoder.init_scale).to(codes))
        return self
