"""meduet.networks.controlnet: the ControlNet on a frozen latent DiT (exactly the base at init, only the control
branch trains, the control is used, checkpoint round trip through meduet.records, the samplers of
meduet.engines.sampling with cond["control"], one-line errors). Tiny networks, real computations, one thread."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from meduet import records
from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.controlnet import LatentControlNet
from meduet.networks.dit import LatentDiT, build_dit

pytestmark = pytest.mark.usefixtures("one_thread")

B, C, S, CC = 2, 4, 8, 2
DC, DS = 32, 8
FACTORS = dict(condition="factors", content_dim=DC, style_dim=DS, content_map=True)
T_STEPS = torch.tensor([0, 999])


def _perturb(params, std: float = 0.1, seed: int = 123) -> None:
    """Move parameters (also the zero-initialised ones) off their initial values, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _base(**kw) -> LatentDiT:
    torch.manual_seed(0)
    m = build_dit("tiny", **kw)
    _perturb(m.parameters())  # a "trained" generator: its output is not zero
    return m.eval()


def _rand(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cond(kw: dict, b: int = B, seed: int = 1) -> dict[str, torch.Tensor]:
    if not kw:
        return {}
    return {"content": _rand(b, DC, seed=seed), "style": _rand(b, DS, seed=seed + 1),
            "content_map": _rand(b, DC, 4, 4, 4, seed=seed + 2)}


def _control(b: int = B, seed: int = 5, scale: float = 1.0) -> torch.Tensor:
    return _rand(b, CC, S, S, S, seed=seed, scale=scale)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("kw", [{}, FACTORS])
def test_equals_base_at_init(kw):
    base = _base(**kw)
    net = LatentControlNet.from_base(base, CC, control_input="zero-filled MRI reconstruction").eval()
    assert net.arch["control_blocks"] == 1 and net.meta["control"] == {
        "channels": CC, "blocks": 1, "input": "zero-filled MRI reconstruction"}
    assert torch.equal(net.copy_blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    assert torch.equal(net.copy_patch_embed.weight, base.patch_embed.weight)
    x, cond = _rand(B, C, S, S, S), _cond(kw)
    for t in (T_STEPS, torch.tensor([250.5, 500.0]), 10):
        ref = base(x, t, cond or None)
        ref_cfg = base.forward_with_cfg(x, t, cond or None, 3.0)
        assert ref.abs().mean() > 1e-3
        for control in (_control(seed=5), _control(seed=6, scale=1e3), torch.zeros(B, CC, S, S, S)):
            full = {**cond, "control": control}
            assert torch.equal(net(x, t, full), ref)  # bit-identical: the zero linears add exact zeros
            assert torch.equal(net.forward_with_cfg(x, t, full, 3.0), ref_cfg)
    # a base with 3 blocks: ceil(3 / 2) = 2 copied by default
    assert LatentControlNet(build_dit("tiny", depth=3).arch, 1).num_control_blocks == 2


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kw", [{}, FACTORS])
def test_only_control_branch_trains(kw):
    base = _base(**kw)
    net = LatentControlNet.from_base(base, CC).train()
    assert net.training and not net.base.training and not any(m.training for m in net.base.modules())
    assert all(not p.requires_grad for p in net.base.parameters())
    trainable = net.control_parameters()
    assert {id(p) for p in trainable} == {id(p) for n, p in net.named_parameters() if not n.startswith("base.")}
    assert all(p.requires_grad for p in trainable)
    before = _state(net.base)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, t, cond = _rand(B, C, S, S, S), T_STEPS, _cond(kw)
    target = _rand(B, C, S, S, S, seed=9)
    c1, c2 = _control(seed=5), _control(seed=6)
    ref = base(x, t, cond or None)

    def step(control: torch.Tensor) -> None:
        opt.zero_grad()
        loss = (net(x, t, {**cond, "control": control}) - target).square().mean()
        loss.backward()
        assert all(p.grad is None for p in net.base.parameters())  # no gradient reaches the base
        opt.step()

    step(c1)
    net.eval()
    out1 = net(x, t, {**cond, "control": c1})
    assert not torch.allclose(out1, ref)  # the output moved off the base's
    # zero-init dynamics: step 1 only opens control_out (its input gradient was zero), so the control is not yet
    # seen; from step 2 on it is
    assert torch.equal(net.control_in.weight, torch.zeros_like(net.control_in.weight))
    assert torch.equal(out1, net(x, t, {**cond, "control": c2}))
    net.train()
    step(c1)
    net.eval()
    out1, out2 = net(x, t, {**cond, "control": c1}), net(x, t, {**cond, "control": c2})
    assert (out1 - out2).abs().max() > 1e-5
    after = _state(net.base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not net.base.training


def test_control_is_used_on_a_toy_task():
    # predict the control's mean (per sample, everywhere): a base cannot, the control branch learns it
    base = _base()
    net = LatentControlNet.from_base(base, CC, control_blocks=2).train()
    opt = torch.optim.Adam(net.control_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x, t = _rand(4, C, S, S, S), torch.tensor([100, 300, 600, 900])

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        level = torch.randn(4, generator=g)
        control = level[:, None, None, None, None] + 0.3 * torch.randn(4, CC, S, S, S, generator=g)
        return control, control.mean(dim=(1, 2, 3, 4))[:, None, None, None, None].expand(4, C, S, S, S)

    losses = []
    for _ in range(60):
        control, target = batch()
        loss = (net(x, t, {"control": control}) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    net.eval()
    low, high = -torch.ones(4, CC, S, S, S), torch.ones(4, CC, S, S, S)
    with torch.no_grad():
        diff = net(x, t, {"control": high}).mean() - net(x, t, {"control": low}).mean()
    assert diff > 0.5  # the ideal is 2


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_and_load(tmp_path):
    base = _base(**FACTORS)
    base.meta = {"objective": DiffusionObjective("rflow").config(), "latent_scale_factor": 0.7}
    net = LatentControlNet.from_base(base, CC)
    _perturb(net.control_parameters(), std=0.05)
    assert net.meta["latent_scale_factor"] == 0.7 and net.base.meta == base.meta
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert any(k.startswith("base.blocks.") for k in state) and any(k.startswith("control_out.") for k in state)
    loaded = records.load(path, expect="controlnet")
    assert isinstance(loaded, LatentControlNet) and not loaded.training and not loaded.base.training
    assert loaded.arch == net.arch and loaded.meta == net.meta and loaded.base.meta == base.meta
    assert all(not p.requires_grad for p in loaded.base.parameters())
    x, t, cond = _rand(B, C, S, S, S), T_STEPS, {**_cond(FACTORS), "control": _control()}
    torch.testing.assert_close(loaded(x, t, cond), net(x, t, cond), rtol=0, atol=0)
    torch.testing.assert_close(loaded.forward_with_cfg(x, t, cond, 2.0), net.forward_with_cfg(x, t, cond, 2.0),
                               rtol=0, atol=0)
    assert records.require(path, "meduet_diffusion") == str(path)
    # the constructor from the record's architecture takes the file strictly (as a bundle's network_def does)
    LatentControlNet(**net.arch).load_state_dict(state, strict=True)
    with pytest.raises(MeduetConfigError, match="another 'controlnet' architecture") as err:
        LatentControlNet(net.arch["base"], CC, control_blocks=2).load_state_dict(state, strict=False)
    assert "\n" not in str(err.value)
    torch.save(base.state_dict(), tmp_path / "dit.pt")
    with pytest.raises(MeduetConfigError, match="holds a 'dit' network"):
        records.load(tmp_path / "dit.pt", expect="controlnet")


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddpm", 100), ("ddpm", "ddim", 8),
                                                     ("rflow", "rflow", 6)])
def test_sample_latents(objective, sampler, steps):
    obj = DiffusionObjective(objective, num_train_timesteps=100)
    base = _base(**FACTORS, num_train_timesteps=100)
    net = LatentControlNet.from_base(base, CC).train()
    _perturb(net.control_parameters(), std=0.05)
    batches: list[int] = []
    net.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    cond = {**_cond(FACTORS), "control": _control()}

    def run(c: dict, scale: float) -> torch.Tensor:
        return sample_latents(net, (B, C, S, S, S), c, obj, sampler, steps, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(0))

    a = run(cond, 1.0)
    assert a.shape == (B, C, S, S, S) and torch.isfinite(a).all() and len(batches) == steps
    assert not torch.allclose(run({**cond, "control": _control(seed=7)}, 1.0), a)  # the control is used
    batches.clear()
    guided = run(cond, 3.0)
    assert set(batches) == {2 * B} and torch.isfinite(guided).all() and not torch.allclose(guided, a)
    assert net.training and not net.base.training  # modes restored
    assert run({"control": cond["control"]}, 3.0).shape == a.shape  # only the control: the base's null condition
    if objective == "rflow":
        z = invert_latents(net, a, cond, obj, num_steps=steps)
        assert z.shape == a.shape and torch.isfinite(z).all()


def test_unconditional_base_and_errors():
    base = _base()
    net = LatentControlNet.from_base(base, CC)
    x = _rand(B, C, S, S, S)
    out = sample_latents(net, (B, C, S, S, S), {"control": _control()}, "rflow", "rflow", 3)
    assert out.shape == (B, C, S, S, S)
    for cond in (None, {}, {"content": torch.zeros(B, DC)}):
        with pytest.raises(MeduetConfigError, match=r"needs cond\['control'\]") as err:
            net(x, 10, cond)
        assert "\n" not in str(err.value)
    with pytest.raises(MeduetConfigError, match=r"needs cond\['control'\]"):
        sample_latents(net, (B, C, S, S, S), None, "rflow", "rflow", 2)
    bad_controls = (torch.zeros(B, CC + 1, S, S, S), torch.zeros(B, CC, 4, 4, 4), torch.zeros(B + 1, CC, S, S, S))
    for control in bad_controls:
        with pytest.raises(MeduetConfigError, match=r"cond\['control'\] must have shape \(2, 2, 8, 8, 8\)") as err:
            net.forward_with_cfg(x, 10, {"control": control}, 2.0)
        assert "\n" not in str(err.value)
    for blocks in (0, 3, 1.5, True):
        with pytest.raises(MeduetConfigError, match=r"control_blocks must be an integer in \[1, 2\]") as err:
            LatentControlNet.from_base(base, CC, control_blocks=blocks)
        assert "\n" not in str(err.value)
    for channels in (0, -1, 2.0):
        with pytest.raises(MeduetConfigError, match="control_channels must be an integer >= 1") as err:
            LatentControlNet(base.arch, channels)
        assert "\n" not in str(err.value)
    with pytest.raises(MeduetConfigError, match="needs a LatentDiT"):
        LatentControlNet.from_base(net, CC)  # type: ignore[arg-type]
