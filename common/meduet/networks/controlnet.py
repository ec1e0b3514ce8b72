"""ControlNet for the latent DiT (3D MedDiffusion's conditional tasks): a frozen ``LatentDiT`` generator steered by
a task input at latent resolution (the zero-filled reconstruction of undersampled MRI, the FBP of sparse-view CT or
a label map, encoded or resampled to the latent grid by the workflow).

Layout (ControlNet-Transformer style; ``p`` patch size, ``g`` token grid, ``N`` tokens, ``D`` width, ``K`` =
``control_blocks``):

* ``base``: the generator, frozen (``requires_grad_(False)``) and always in eval mode (``train()`` keeps it there);
  its patch embedding, condition handling, blocks and final layer run as in ``LatentDiT.forward``.
* a trainable copy of the base's patch embedding and of its first ``K`` blocks, initialised from the base's weights;
* ``control_embed``: ``Conv3d(control_channels, D)`` with kernel = stride = ``p`` turns the control ``(B, Cc, S1,
  S2, S3)`` into tokens ``(B, N, D)``; ``control_in`` (zero-initialised ``Linear(D, D)``) adds them to the copy's
  input tokens (copied patch embedding of ``x`` + positions + the base's content-map addition, if any);
* ``control_out[i]`` (zero-initialised ``Linear(D, D)``) adds copied block ``i``'s output to the base's hidden
  tokens after base block ``i``; the copied blocks use the base's conditioning vector ``c (B, D)``.

At initialisation every zero linear outputs exactly zero, so the wrapper's output is the base's output for any
control. The control travels inside ``cond`` as ``cond["control"]``, so ``meduet.engines.sampling``'s
``sample_latents`` / ``invert_latents`` / ``predict`` work unchanged; the other keys of ``cond`` go to the base
(``LatentDiT.cond_keys``); a ``cond`` with no key but ``"control"`` means the base's null condition (as
``cond=None`` does for a ``LatentDiT``).

Classifier-free guidance drops the base's condition only: the control stays in both the conditional and the
unconditional rows (the task input is a hard constraint, not something to extrapolate away from). In training mode
the base's condition is dropped with the base's ``cond_dropout`` (drawn here, since the base stays in eval mode),
so the control branch also learns the unconditional rows that guidance uses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from meduet.errors import MeduetConfigError
from meduet.networks.dit import LatentDiT
from meduet.networks.latent_vit import unpatchify
from meduet.records import RecordMixin, register

__all__ = ["LatentControlNet"]


@register
class LatentControlNet(RecordMixin, nn.Module):
    """A frozen ``LatentDiT`` plus a trainable control branch, see the module docstring.

    Args:
        base: the base generator's architecture (``LatentDiT.arch``: its constructor arguments).
        control_channels: channels ``Cc`` of the control ``cond["control"] (B, Cc, S1, S2, S3)`` (at the latents'
            spatial size).
        control_blocks: number ``K`` of the base's blocks copied into the control branch, in ``[1, depth]``;
            None: ``ceil(depth / 2)``.

    ``arch`` holds these arguments (``control_blocks`` resolved) and ``meta`` the base's facts plus ``control``
    (``from_base``); the state dict holds the base's and the control branch's weights, so
    ``meduet.records.load(path)`` rebuilds the whole network from one ``model.pt``. Train only
    ``control_parameters()``.
    """

    kind = "controlnet"
    non_weight_args = LatentDiT.non_weight_args  # compared inside ``base`` too (records.arch_diff recurses)

    def __init__(self, base: Mapping[str, Any], control_channels: int = 1, control_blocks: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, Mapping):
            raise MeduetConfigError(f"LatentControlNet: base must be the base DiT's architecture (a dict), got "
                                    f"{type(base).__name__}; use LatentControlNet.from_base(dit) for a network")
        net = LatentDiT(**dict(base))
        depth, dim = net.depth, net.dim
        if control_blocks is None:
            control_blocks = math.ceil(depth / 2)
        if isinstance(control_blocks, bool) or not isinstance(control_blocks, int) or not 1 <= control_blocks <= depth:
            raise MeduetConfigError(f"control_blocks must be an integer in [1, {depth}] (the base DiT's depth), got "
                                    f"{control_blocks!r}")
        if isinstance(control_channels, bool) or not isinstance(control_channels, int) or control_channels < 1:
            raise MeduetConfigError(f"control_channels must be an integer >= 1 (channels of cond['control']), got "
                                    f"{control_channels!r}")
        self.arch = dict(base=dict(net.arch), control_channels=control_channels, control_blocks=control_blocks)
        self.meta: dict[str, Any] = {}
        self.control_channels, self.num_control_blocks = control_channels, control_blocks
        self.base = net.requires_grad_(False).eval()
        self.copy_patch_embed = copy.deepcopy(net.patch_embed).requires_grad_(True)
        self.copy_blocks = nn.ModuleList(copy.deepcopy(net.blocks[i]) for i in range(control_blocks))
        self.copy_blocks.requires_grad_(True)
        self.control_embed = nn.Conv3d(control_channels, dim, kernel_size=net.patch_size, stride=net.patch_size)
        self.control_in = nn.Linear(dim, dim)
        self.control_out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(control_blocks))
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Copies from the base (patch embedding, first ``K`` blocks), the control patch embedding as a
        xavier-uniform linear (zero bias, as the base's), and zeros for ``control_in`` and every ``control_out``."""
        self.copy_patch_embed.load_state_dict(self.base.patch_embed.state_dict())
        for i, block in enumerate(self.copy_blocks):
            block.load_state_dict(self.base.blocks[i].state_dict())
        nn.init.xavier_uniform_(self.control_embed.weight.view(self.control_embed.out_channels, -1))
        nn.init.zeros_(self.control_embed.bias)
        for layer in (self.control_in, *self.control_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_base(cls, base_net: LatentDiT, control_channels: int = 1, control_blocks: int | None = None,
                  control_input: str | None = None) -> LatentControlNet:
        """A ControlNet on a trained ``LatentDiT`` (its weights and meta copied; the control branch initialised
        from them), on the base's device and dtype. ``control_input``: what the control is (e.g.
        ``"zero-filled MRI reconstruction"``), kept in ``meta["control"]`` beside the channels and blocks."""
        if not isinstance(base_net, LatentDiT):
            raise MeduetConfigError(f"LatentControlNet.from_base needs a LatentDiT, got {type(base_net).__name__}")
        param = next(base_net.parameters())
        net = cls(dict(base_net.arch), control_channels, control_blocks)
        net.base.load_state_dict(base_net.state_dict(), strict=True)
        net.initialize_weights()
        net.meta = {**copy.deepcopy(dict(base_net.meta)),
                    "control": {"channels": net.control_channels, "blocks": net.num_control_blocks,
                                "input": control_input}}
        return net.to(device=param.device, dtype=param.dtype)

    # ------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> LatentControlNet:
        """Set the control branch's mode; the base stays in eval mode."""
        super().train(mode)
        self.base.eval()
        return self

    def control_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (everything but ``base``): what an optimiser should get."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    @property
    def condition(self) -> str:
        """The base's condition (``"none"``, ``"metadata"``, ``"factors"`` or ``"semantic"``)."""
        return self.base.condition

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """Keys ``forward`` reads from ``cond``: the base's and ``"control"``."""
        return (*self.base.cond_keys, "control")

    def split_cond(self, x: torch.Tensor, cond: Mapping[str, Any] | None
                   ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """``(control (B, Cc, S1, S2, S3), base condition or None)`` from ``cond``, checked against ``x``."""
        if cond is None or cond.get("control") is None:
            raise MeduetConfigError(f"LatentControlNet needs cond['control'] ({x.shape[0]}, {self.control_channels}, "
                                    f"{', '.join(str(s) for s in x.shape[2:])}), the task input at latent size; got "
                                    f"{'cond=None' if cond is None else f'keys {sorted(cond)}'}")
        control = torch.as_tensor(cond["control"])
        want = (x.shape[0], self.control_channels, *x.shape[2:])
        if tuple(control.shape) != want:
            raise MeduetConfigError(f"cond['control'] must have shape {want} (batch, control_channels, the latents' "
                                    f"size), got {tuple(control.shape)}")
        rest = {k: v for k, v in cond.items() if k != "control"}
        return control.to(device=x.device, dtype=self.control_embed.weight.dtype), (rest or None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Mapping[str, Any] | None = None,
                force_drop: torch.Tensor | bool | None = None) -> torch.Tensor:
        """Prediction ``(B, C, S1, S2, S3)`` of the base's kind (noise / velocity) for noisy latents ``x``.

        Args:
            x: ``(B, C, S1, S2, S3)`` scaled noisy latents, every ``S`` divisible by the patch size.
            t: ``(B,)`` timesteps in ``[0, num_train_timesteps]`` (or one number for all).
            cond: ``{"control": (B, Cc, S1, S2, S3), **the base's condition keys}`` (required).
            force_drop: ``(B,)`` bool or one bool: True = the base's null condition for that sample (the control
                is always used); None = drop with the base's ``cond_dropout`` in training mode, none in eval mode.
        """
        base, b = self.base, x.shape[0]
        control, base_cond = self.split_cond(x, cond)
        tokens, grid = base.embed(x)
        t = base._timesteps(t, b, x.device)
        if base.condition == "none":
            c, cmap, drop = base.t_embedder(t), None, None
        else:
            if force_drop is None and self.training and base_cond is not None and base.cond_dropout > 0:
                force_drop = torch.rand(b, device=x.device) < base.cond_dropout
            drop = base.drop_mask(b, base_cond, force_drop, x.device)
            c, cmap = base.embed_condition(t, base_cond, drop)
        h = self.copy_patch_embed(x).flatten(2).transpose(1, 2)
        h = h + base.positions(grid).to(h.dtype)
        if cmap is not None:
            added = base.content_map_embedder(cmap, grid, drop).to(tokens.dtype)  # type: ignore[misc]
            tokens, h = tokens + added, h + added
        h = h + self.control_in(self.control_embed(control).flatten(2).transpose(1, 2)).to(h.dtype)
        for i, block in enumerate(base.blocks):
            tokens = block(tokens, c)
            if i < self.num_control_blocks:
                h = self.copy_blocks[i](h, c)
                tokens = tokens + self.control_out[i](h)
        return unpatchify(base.final_layer(tokens, c), base.patch_size, grid, base.in_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Mapping[str, Any] | None,
                         guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided prediction ``uncond + s * (cond - uncond)``, ``(B, C, S1, S2, S3)``; both rows (one batch of
        ``2B``) see the control, only the base's condition is dropped in the unconditional row. A plain pass for
        ``guidance_scale == 1``, an unconditional base or a ``cond`` holding only the control."""
        b = x.shape[0]
        control, base_cond = self.split_cond(x, cond)
        if self.base.condition == "none" or base_cond is None:
            return self(x, t, cond)
        if float(guidance_scale) == 1.0:
            return self(x, t, cond, force_drop=False)
        t = self.base._timesteps(t, b, x.device)
        if self.base.condition == "semantic":
            base_cond = self.base.semantic_cond(base_cond)
        cond2 = {k: _twice(v) for k, v in base_cond.items() if k in self.base.cond_keys}
        cond2["control"] = _twice(control)
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        out = self(torch.cat([x, x]), torch.cat([t, t]), cond2, force_drop=drop)
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + guidance_scale * (cond_out - uncond_out)


def _twice(v: Any) -> torch.Tensor:
    """``v`` stacked on itself along the batch (the conditional and unconditional rows)."""
    v = torch.as_tensor(v)
    return torch.cat([v, v])
