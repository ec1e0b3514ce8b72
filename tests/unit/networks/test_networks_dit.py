"""meduet.networks.dit / factor_prior, meduet.losses.diffusion, meduet.engines.sampling: the latent DiT (shapes,
adaLN-Zero, condition dropout and guidance, content map, errors), both objectives against MONAI's schedulers
(conventions, overfitting, sampling, inversion), initialisation from the pretrained ViT, checkpoint round trips and
the factor prior. Tiny networks, real computations, one thread."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from meduet.engines.sampling import invert_latents, sample_latents
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective
from meduet import records
from meduet.engines.factor_prior import sample_factors, train_factor_prior
from meduet.networks.dit import DIT_PRESETS, LatentDiT, build_dit
from meduet.networks.dit_blocks import modulate
from meduet.networks.encoder import build_encoder
from meduet.networks.factor_prior import FactorPrior
from meduet.networks.meduet import build_meduet

pytestmark = pytest.mark.usefixtures("one_thread")

B, C, S = 4, 4, 8
DC, DS = 32, 8


def _dit(**kw) -> LatentDiT:
    torch.manual_seed(0)
    return build_dit("tiny", **kw)


def _perturb(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Move every parameter (also the zero-initialised ones) off its initial value, as training does."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _x(b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, C, S, S, S, generator=torch.Generator().manual_seed(seed))


def _factor_cond(b: int = B, seed: int = 1, grid: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"content": torch.randn(b, DC, generator=g), "style": torch.randn(b, DS, generator=g),
            "content_map": torch.randn(b, DC, grid, grid, grid, generator=g)}


def _meta_cond(b: int = B) -> dict[str, torch.Tensor]:
    return {"domain": torch.arange(b) % 3, "metadata": torch.linspace(0.5, 2.0, b * 2).reshape(b, 2)}


FACTORS = dict(condition="factors", content_dim=DC, style_dim=DS, content_map=True)
METADATA = dict(condition="metadata", num_domains=3, num_metadata_scalars=2)


# ------------------------------------------------------------------------------------------------ network basics
@pytest.mark.parametrize("kw,cond", [({}, None), (METADATA, _meta_cond()), (FACTORS, _factor_cond())])
def test_shape_and_zero_output_at_init(kw, cond):
    m = _dit(**kw)
    t = torch.tensor([0, 10, 500, 999])
    out = m(_x(), t, cond)
    assert out.shape == (B, C, S, S, S)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer zero-initialised
    # other grids work (positions computed on the fly), t as float (RFlow) and as one number
    assert m(torch.randn(2, C, 8, 12, 16), 250.5, None if cond is None else {k: v[:2] for k, v in cond.items()}
             ).shape == (2, C, 8, 12, 16)
    assert set(DIT_PRESETS) == {"tiny", "demo", "paper"}


@pytest.mark.parametrize("kw,cond", [(METADATA, _meta_cond()), (FACTORS, _factor_cond())])
def test_gradients_reach_every_parameter(kw, cond):
    # Documented exceptions avoided by the batch: the null condition (table row / null vector) only gets gradient
    # from dropped samples, and a site row only from samples of that site -> drop half, use every site.
    m = _perturb(_dit(**kw)).train()
    drop = torch.tensor([True, False, False, True])
    out = m(_x(), torch.tensor([3, 300, 600, 900]), cond, force_drop=drop)
    (out - _x(seed=5)).square().mean().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []


def test_force_drop_is_the_null_condition():
    for kw, cond, other in [(FACTORS, _factor_cond(), _factor_cond(seed=9)),
                            (METADATA, _meta_cond(), {"domain": torch.tensor([2, 2, 0, 1]),
                                                      "metadata": torch.randn(B, 2)})]:
        m = _perturb(_dit(**kw)).eval()
        x, t = _x(), torch.tensor([1, 200, 400, 800])
        null = m(x, t, None)
        torch.testing.assert_close(m(x, t, cond, force_drop=True), null)
        torch.testing.assert_close(m(x, t, other, force_drop=torch.ones(B, dtype=torch.bool)), null)
        cond_out = m(x, t, cond)
        assert not torch.allclose(cond_out, null)
        mixed = m(x, t, cond, force_drop=torch.tensor([True, False, True, False]))
        torch.testing.assert_close(mixed[0::2], null[0::2])
        torch.testing.assert_close(mixed[1::2], cond_out[1::2])
        with pytest.raises(MeduetConfigError, match="cond=None means unconditional"):
            m(x, t, None, force_drop=False)


def test_dropout_rate_in_training_only():
    m = _dit(**FACTORS, cond_dropout=0.3).train()
    torch.manual_seed(0)
    drop = m.drop_mask(20000, {"content": None}, None, torch.device("cpu"))
    assert abs(drop.float().mean().item() - 0.3) < 0.02
    assert not m.eval().drop_mask(100, {"content": None}, None, torch.device("cpu")).any()
    # in training, a forward with random dropping differs from the forced conditional pass for some samples
    m = _perturb(_dit(**FACTORS, cond_dropout=0.5)).train()
    torch.manual_seed(1)
    x, t, cond = _x(16), torch.full((16,), 300), _factor_cond(16)
    rand_out, kept = m(x, t, cond), m(x, t, cond, force_drop=False)
    same = torch.isclose(rand_out, kept).flatten(1).all(1)
    assert 0 < int(same.sum()) < 16


def test_classifier_free_guidance():
    m = _perturb(_dit(**FACTORS, cond_dropout=0.2)).train()  # train mode: forward_with_cfg must not drop randomly
    x, t, cond = _x(), torch.tensor([5, 250, 500, 750]), _factor_cond()
    cond_out = m(x, t, cond, force_drop=False)
    torch.testing.assert_close(m.forward_with_cfg(x, t, cond, 1.0), cond_out)
    uncond = m(x, t, None)
    torch.testing.assert_close(m.forward_with_cfg(x, t, cond, 3.0), uncond + 3.0 * (cond_out - uncond),
                               rtol=1e-4, atol=1e-5)
    plain = _perturb(_dit()).eval()  # condition "none": a single plain pass whatever the scale
    torch.testing.assert_close(plain.forward_with_cfg(x, t, None, 4.0), plain(x, t))
    torch.testing.assert_close(plain(x, t, cond, force_drop=False), plain(x, t))  # cond ignored


def test_content_map_path():
    m = _perturb(_dit(**FACTORS)).eval()
    x, t, cond = _x(), torch.tensor([100, 200, 300, 400]), _factor_cond()
    base = m(x, t, cond)
    zero_map = dict(cond, content_map=torch.zeros_like(cond["content_map"]))
    assert (m(x, t, zero_map) - base).abs().max() > 1e-3
    # the map is resampled (trilinear) when the encoder's grid differs from the DiT's (pretrain patch 4 -> 2^3)
    coarse = dict(cond, content_map=torch.randn(B, DC, 2, 2, 2))
    assert m(x, t, coarse).shape == base.shape
    with pytest.raises(MeduetConfigError, match="content_map"):
        m(x, t, dict(cond, content_map=torch.randn(B, DC + 1, 4, 4, 4)))


def test_clear_errors():
    m = _dit(**METADATA)
    x, t = _x(), torch.tensor([1, 2, 3, 4])
    with pytest.raises(MeduetConfigError, match=r"site index 5 .*num_domains=3"):
        m(x, t, {"domain": torch.tensor([0, 1, 5, 2]), "metadata": torch.zeros(B, 2)})
    with pytest.raises(MeduetConfigError, match="'metadata' is missing"):
        m(x, t, {"domain": torch.tensor([0, 1, 2, 2])})
    with pytest.raises(MeduetConfigError, match="integer site indices"):
        m(x, t, {"domain": torch.zeros(B), "metadata": torch.zeros(B, 2)})
    with pytest.raises(MeduetConfigError, match=r"cond\['style'\] must have shape \(4, 8\)"):
        _dit(**FACTORS)(x, t, dict(_factor_cond(), style=torch.zeros(B, 7)))
    with pytest.raises(MeduetConfigError, match="condition must be one of"):
        build_dit("tiny", condition="site")
    with pytest.raises(MeduetConfigError, match="num_domains >= 1"):
        build_dit("tiny", condition="metadata")
    with pytest.raises(MeduetConfigError, match=r"latents \(B, 4"):
        m(torch.zeros(2, 3, 8, 8, 8), 1)
    with pytest.raises(MeduetConfigError, match="divisible"):
        m(torch.zeros(2, 4, 8, 8, 7), 1)


# ------------------------------------------------------------------------------------------------ objectives
class _Oracle(nn.Module):
    """The exact minimiser of each objective for a one-point data set ``x0``: recovers the noise from ``x_t`` and
    returns ``objective.target(x0, noise)``. Sampling with it must land on ``x0`` if the objective's target and the
    MONAI sampler agree on the convention."""

    def __init__(self, x0: torch.Tensor, objective: DiffusionObjective) -> None:
        super().__init__()
        self.x0, self.obj = x0, objective
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        T = self.obj.num_train_timesteps
        if self.obj.objective == "ddpm":
            a = self.obj.scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1, 1)
            noise = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        else:
            s = (t.float() / T).reshape(-1, 1, 1, 1, 1).clamp_min(1e-6)
            noise = (x - (1 - s) * self.x0) / s
        return self.obj.target(self.x0, noise)


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddim", 20), ("rflow", "rflow", 5)])
def test_objective_convention_matches_monai_sampler(objective, sampler, steps):
    obj = DiffusionObjective(objective)
    x0 = _x(2) * 0.5
    oracle = _Oracle(x0, obj)
    out = obj.loss(oracle, x0)  # the oracle is the minimiser: zero training loss
    assert out.loss < 1e-6 and out.noisy.shape == x0.shape and out.timesteps.shape == (2,)
    if objective == "rflow":  # v = x0 - noise, t = 0 clean, t = T noise
        noise = torch.randn_like(x0)
        torch.testing.assert_close(obj.add_noise(x0, noise, torch.tensor([0, 0])), x0)
        torch.testing.assert_close(obj.target(x0, noise), x0 - noise)
    sample = sample_latents(oracle, x0.shape, None, obj, sampler, steps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, x0, atol=2e-3, rtol=1e-3)


def test_validation_loss_is_deterministic_and_config_round_trips():
    m = _perturb(_dit(**FACTORS))
    x0, cond = _x(2), _factor_cond(2)
    for name in ("ddpm", "rflow"):
        obj = DiffusionObjective(name, num_val_timesteps=4)
        assert obj.validation_timesteps().tolist() == [125, 375, 625, 875]
        a = obj.validation_loss(m.train(), x0, cond)
        b = obj.validation_loss(m.eval(), x0, cond, generator=torch.Generator().manual_seed(0))
        assert a.item() == b.item() and a.item() > 0
        assert DiffusionObjective.from_config(obj.config()).config() == obj.config()
    with pytest.raises(MeduetConfigError, match="objective must be one of"):
        DiffusionObjective("edm")


def _train_latents() -> torch.Tensor:
    x = F.interpolate(torch.randn(2, C, 3, 3, 3, generator=torch.Generator().manual_seed(1)), size=(S, S, S),
                      mode="trilinear", align_corners=False)
    return (x - x.mean()) / x.std()


def _overfit(objective: str, steps: int = 300) -> tuple[LatentDiT, DiffusionObjective, float, float]:
    torch.manual_seed(0)
    m = build_dit("tiny")
    obj = DiffusionObjective(objective)
    x0 = _train_latents()
    before = obj.validation_loss(m, x0).item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = obj.loss(m.train(), x0.repeat(4, 1, 1, 1, 1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), obj, before, obj.validation_loss(m, x0).item()


@pytest.fixture(scope="module")
def rflow_model():
    return _overfit("rflow")


def test_overfit_ddpm():
    _, _, before, after = _overfit("ddpm")
    assert after < before / 4, (before, after)


def test_overfit_rflow_and_few_step_samples(rflow_model):
    m, obj, before, after = rflow_model
    assert after < before / 2, (before, after)
    x0 = _train_latents()

    def nn_mse(v: torch.Tensor) -> float:
        d = torch.stack([(v - x0[j]).square().flatten(1).mean(1) for j in range(2)], 1)
        return d.min(1).values.mean().item()

    samples = sample_latents(m, (8, C, S, S, S), None, obj, "rflow", 10, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(8, C, S, S, S, generator=torch.Generator().manual_seed(0))
    assert nn_mse(samples) < 0.6 * nn_mse(noise), (nn_mse(samples), nn_mse(noise))
    # deterministic inversion: x0 -> noise -> x0
    z = invert_latents(m, x0, None, obj, num_steps=20)
    back = sample_latents(m, x0.shape, None, obj, "rflow", 20, noise=z)
    assert (back - x0).square().mean() < 0.1 * (z - x0).square().mean()


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddpm", 100), ("ddpm", "ddim", 8),
                                                     ("rflow", "rflow", 6)])
def test_sample_latents(objective, sampler, steps):
    obj = DiffusionObjective(objective, num_train_timesteps=100)
    m = _perturb(_dit(**METADATA, num_train_timesteps=100), std=0.05)
    cond = {"domain": torch.tensor([0, 2]), "metadata": torch.ones(2, 2)}
    batches: list[int] = []
    m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))

    def run(seed: int, scale: float) -> torch.Tensor:
        return sample_latents(m, (2, C, S, S, S), cond, obj, sampler, steps, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(seed))

    a = run(0, 1.0)
    assert a.shape == (2, C, S, S, S) and torch.isfinite(a).all()
    assert set(batches) == {2} and len(batches) == steps
    torch.testing.assert_close(run(0, 1.0), a)  # seeded -> deterministic
    assert not torch.allclose(run(1, 1.0), a)
    batches.clear()
    guided = run(0, 3.0)
    assert set(batches) == {4}  # conditional and unconditional rows in one batch
    assert not torch.allclose(guided, a)
    assert m.training  # mode restored


def test_sampler_errors():
    m = _dit()
    with pytest.raises(MeduetConfigError, match="does not fit"):
        sample_latents(m, (1, C, S, S, S), None, "rflow", "ddim", 5)
    with pytest.raises(MeduetConfigError, match="use sampler 'ddim'"):
        sample_latents(m, (1, C, S, S, S), None, "ddpm", "ddpm", 50)
    with pytest.raises(MeduetConfigError, match="num_train_timesteps=100"):
        sample_latents(m, (1, C, S, S, S), None, DiffusionObjective("rflow", num_train_timesteps=100), "rflow", 5)
    with pytest.raises(MeduetConfigError, match="set both to the same value"):
        DiffusionObjective("ddpm", num_train_timesteps=500).loss(m, _x(1))


# ------------------------------------------------------------------------------------------------ pretrained init
def test_init_from_pretrained(tmp_path):
    torch.manual_seed(0)
    src = _perturb(build_meduet("tiny", num_domains=2))  # perturb so the norms are not identity
    vit = src.encoder
    dit = _dit()
    report = dit.init_from_pretrained(src)
    assert report["blocks"] == 2 and report["patch_embed"] == "copied" and not report["skipped"]
    assert "blocks.1.attn.qkv.weight" in report["copied"] and "sin-cos" in report["positions"]
    # with open gates the DiT trunk computes exactly the pretrained ViT's blocks (adaLN bias = LayerNorm affine)
    x, t = _x(2), torch.tensor([10, 900])
    tok, _ = dit.embed(x)
    c, _ = dit.embed_condition(t, None, torch.ones(2, dtype=torch.bool))
    ref, _ = vit.embed(x)
    for blk_d, blk_v in zip(dit.blocks, vit.blocks):
        tok, ref = blk_d(tok, c), blk_v(ref)
    torch.testing.assert_close(tok, ref, rtol=1e-4, atol=1e-5)
    shift, scale = dit.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    torch.testing.assert_close(modulate(dit.final_layer.norm_final(tok), shift, scale), vit.norm(ref),
                               rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(dit(x, t)) == 0  # still zero output
    # from a state dict (backbone.encoder.* keys), from a file read with meduet.records, from the deployable encoder
    path = tmp_path / "pretrain.pt"
    torch.save(src.state_dict(), path)
    for source in (src.state_dict(), records.read_state_dict(path, "pretraining checkpoint", "")):
        other = _dit()
        other.init_from_pretrained(source, gates="zero")
        torch.testing.assert_close(other.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
        assert torch.count_nonzero(other.blocks[0].adaLN_modulation[-1].bias[2 * 32:3 * 32]) == 0  # gate closed
    enc = build_encoder("tiny")
    assert _dit().init_from_pretrained(enc)["blocks"] == 2
    # another patch size: the patch embedding is resampled and keeps its response to a constant input
    coarse = _dit(patch_size=4)
    rep = coarse.init_from_pretrained(src)
    assert rep["patch_embed"] == "resampled 2^3 -> 4^3"
    ones = torch.ones(1, C, 8, 8, 8)
    torch.testing.assert_close(coarse.patch_embed(ones).mean(), vit.patch_embed(ones).mean(), rtol=1e-3, atol=1e-4)
    deeper = _dit(depth=3).init_from_pretrained(src)
    assert deeper["blocks"] == 2 and deeper["depth"] == 3
    with pytest.raises(MeduetConfigError, match="width 32 but this DiT has dim 48"):
        _dit(dim=48, num_heads=2).init_from_pretrained(src)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_and_load_dit(tmp_path):
    m = _perturb(_dit(**FACTORS)).eval()
    m.meta = {"objective": DiffusionObjective("rflow").config(), "latent_scale_factor": 0.7}
    path = tmp_path / "model.pt"
    torch.save(m.state_dict(), path)
    loaded = records.load(path, expect="dit")
    assert isinstance(loaded, LatentDiT) and not loaded.training
    assert loaded.meta == m.meta and loaded.arch == m.arch
    x, t, cond = _x(), torch.tensor([1, 2, 3, 4]), _factor_cond()
    torch.testing.assert_close(loaded(x, t, cond), m(x, t, cond))
    # cond_dropout does not change the weights: loads into a network with another value
    build_dit("tiny", **dict(FACTORS, cond_dropout=0.3)).load_state_dict(torch.load(path, weights_only=True))
    for other in (dict(FACTORS, depth=3), dict(FACTORS, content_map=False), {}):
        with pytest.raises(MeduetConfigError, match="another 'dit' architecture"):
            build_dit("tiny", **other).load_state_dict(torch.load(path, weights_only=True))
    torch.save(build_meduet("tiny").state_dict(), tmp_path / "pretrain.pt")
    with pytest.raises(MeduetConfigError, match="holds a 'meduet' network"):
        records.load(tmp_path / "pretrain.pt", expect="dit")
    with pytest.raises(MeduetConfigError, match="does not exist; train meduet_diffusion first"):
        records.load(tmp_path / "missing.pt", expect="dit")


# ------------------------------------------------------------------------------------------------ factor prior
def test_factor_prior_per_site(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, dc, ds = 256, 6, 3
    site = torch.arange(n) % 2
    centre = torch.stack([torch.full((dc + ds,), 1.5), torch.full((dc + ds,), -1.5)])
    centre[1, dc:] = 2.5  # the sites also differ in style
    z = centre[site] + 0.3 * torch.randn(n, dc + ds, generator=g)
    prior = train_factor_prior((z[:, :dc], z[:, dc:]), site, steps=400, lr=3e-3, hidden=64, depth=2,
                               batch_size=128)
    assert isinstance(prior, FactorPrior) and not prior.training
    torch.testing.assert_close(prior.mean, z.mean(0))
    for s in (0, 1):
        content, style = sample_factors(prior, 64, domain=s, generator=torch.Generator().manual_seed(s), steps=20)
        assert content.shape == (64, dc) and style.shape == (64, ds)
        v = torch.cat([content, style], 1)
        own, other = (v - centre[s]).norm(dim=1), (v - centre[1 - s]).norm(dim=1)
        assert (own < other).float().mean() > 0.9
        assert (own.mean() < 0.5 * other.mean())
    # unconditional samples come from both sites
    c, st = sample_factors(prior, 64, generator=torch.Generator().manual_seed(5), steps=20)
    near0 = ((torch.cat([c, st], 1) - centre[0]).norm(dim=1) < (torch.cat([c, st], 1) - centre[1]).norm(dim=1))
    assert 0.1 < near0.float().mean() < 0.9
    # the prior is a plain state dict with its record: rebuilt from the file alone
    path = tmp_path / "factor_prior.pt"
    torch.save(prior.state_dict(), path)
    again = records.load(path, expect="factor_prior")
    a = sample_factors(again, 4, domain=1, generator=torch.Generator().manual_seed(0), steps=5)
    b = sample_factors(prior, 4, domain=1, generator=torch.Generator().manual_seed(0), steps=5)
    torch.testing.assert_close(a, b)
    with pytest.raises(MeduetConfigError, match="site index out of range"):
        sample_factors(prior, 2, domain=2)
