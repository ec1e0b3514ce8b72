"""meduet.networks.semantic and the DiT's ``semantic`` condition (LDAE: a semantic encoder trained with the denoiser),
and DDIM inversion (meduet.engines.sampling.ddim_invert): shapes, the code path, gradients into the encoder, guidance,
checkpoint round trip, errors, and inversion against an independent computation. Tiny networks, one thread."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from meduet import records
from meduet.engines.diffusion import Conditioner
from meduet.engines.sampling import ddim_invert, invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dit import LatentDiT, build_dit
from meduet.networks.semantic import SEMANTIC_PRESETS, SemanticEncoder, semantic_encoder_args

pytestmark = pytest.mark.usefixtures("one_thread")

B, C, S = 4, 4, 8


def _x(b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, C, S, S, S, generator=torch.Generator().manual_seed(seed))


def _semantic(**kw) -> LatentDiT:
    torch.manual_seed(0)
    m = build_dit("tiny", condition="semantic", **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move the zero-initialised layers off zero, as training does
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_encoder_sizes_and_shapes():
    enc = SemanticEncoder(C, S, **SEMANTIC_PRESETS["tiny"])
    assert enc(_x()).shape == (B, SEMANTIC_PRESETS["tiny"]["code_dim"])
    assert enc(torch.randn(2, C, 8, 12, 16)).shape == (2, SEMANTIC_PRESETS["tiny"]["code_dim"])  # any grid
    assert semantic_encoder_args("tiny", {"code_dim": 7})["code_dim"] == 7
    assert semantic_encoder_args("unknown-preset") == SEMANTIC_PRESETS["demo"]
    with pytest.raises(MeduetConfigError, match="unknown keys"):
        semantic_encoder_args("tiny", {"width": 3})
    m = build_dit("tiny", condition="semantic", semantic_encoder={"code_dim": 5})
    assert m.code_dim == 5 and m.arch["semantic_encoder"]["code_dim"] == 5 and m.cond_keys == ("semantic",)


def test_code_path_equals_latent_path_and_conditions_the_output():
    m = _semantic().eval()
    x, t, x0 = _x(), torch.tensor([1, 200, 500, 900]), _x(seed=3)
    code = m.encode_semantic(x0)
    from_x0 = m(x, t, {"x0": x0})
    torch.testing.assert_close(m(x, t, {"semantic": code}), from_x0)
    assert not torch.allclose(m(x, t, {"x0": _x(seed=4)}), from_x0)  # another scan, another prediction
    torch.testing.assert_close(m(x, t, {"x0": x0}, force_drop=True), m(x, t, None))  # dropped = null code
    uncond = m(x, t, None)
    torch.testing.assert_close(m.forward_with_cfg(x, t, {"x0": x0}, 2.0), uncond + 2.0 * (from_x0 - uncond),
                               rtol=1e-4, atol=1e-5)


def test_diffusion_loss_trains_the_encoder():
    m = _semantic().train()
    obj = DiffusionObjective("rflow")
    x0 = _x()
    cond = Conditioner("semantic")(x0)  # the conditioner hands the clean latent to the network
    assert set(cond) == {"x0"}
    obj.loss(m, x0, cond).loss.backward()
    enc = {n: p for n, p in m.named_parameters() if n.startswith("semantic_encoder.")}
    assert enc and all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.values())
    # and one optimiser step on the diffusion loss changes the code of a fixed scan
    before = m.encode_semantic(x0).detach().clone()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert not torch.allclose(m.encode_semantic(x0), before)


def test_checkpoint_round_trip_and_errors(tmp_path):
    m = _semantic().eval()
    m.meta = {"objective": DiffusionObjective("ddpm").config()}
    torch.save(m.state_dict(), tmp_path / "model.pt")
    loaded = records.load(tmp_path / "model.pt", expect="dit")
    x0 = _x(2)
    torch.testing.assert_close(loaded.encode_semantic(x0), m.encode_semantic(x0))
    with pytest.raises(MeduetConfigError, match="another 'dit' architecture"):
        build_dit("tiny", condition="semantic", semantic_encoder={"code_dim": 4}).load_state_dict(
            torch.load(tmp_path / "model.pt", weights_only=True))
    with pytest.raises(MeduetConfigError, match="cond\\['semantic'\\]"):
        m(_x(2), 5, {"content": x0})
    with pytest.raises(MeduetConfigError, match="not 'semantic'"):
        build_dit("tiny").encode_semantic(x0)
    with pytest.raises(MeduetConfigError, match="only with it"):
        LatentDiT(condition="none", semantic_encoder={"code_dim": 3}, dim=32, num_heads=2, depth=1)


class _ConstantNoise(nn.Module):
    """Predicts the same noise field whatever the input: DDIM's deterministic path is then
    ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` at every step, and its inversion is exact."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = nn.Parameter(eps, requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps.expand_as(x)


def test_ddim_inversion_is_the_reverse_of_ddim_sampling():
    obj = DiffusionObjective("ddpm")
    x0, eps = _x(2) * 0.5, _x(1, seed=9)
    model = _ConstantNoise(eps)
    z = invert_latents(model, x0, None, obj, num_steps=25)
    # the last step lands on t = 999; MONAI's grid moves each step to t - T//n, not to the next visited t (957 ->
    # 917, then read at 916), so the path is the closed form up to that small mismatch only
    a_last = obj.make_scheduler("ddim").alphas_cumprod[999]
    torch.testing.assert_close(z, a_last.sqrt() * x0 + (1 - a_last).sqrt() * eps.expand_as(x0), atol=2e-2,
                               rtol=0)
    assert (z - x0).abs().mean() > 0.5  # far from where it started: it is noise
    back = sample_latents(model, x0.shape, None, obj, "ddim", 25, noise=z)
    torch.testing.assert_close(back, x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(MeduetConfigError, match="num_steps"):
        ddim_invert(model, x0, None, obj, num_steps=0)


def test_ddim_inversion_round_trip_of_a_semantic_network():
    m = _semantic().eval()
    obj = DiffusionObjective("ddpm")
    x0 = _x(2) * 0.5
    cond = {"semantic": m.encode_semantic(x0)}
    errors = []
    for n in (10, 50, 200):  # the noise is predicted from the less noisy x: the error shrinks with the step size
        z = invert_latents(m, x0, cond, obj, num_steps=n)
        back = sample_latents(m, x0.shape, cond, obj, "ddim", n, noise=z, guidance_scale=1.0)
        errors.append(float((back - x0).square().mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02 * float(x0.square().mean()), errors
