"""meduet.losses.diffusion's options not in the DiT paper (v-prediction, zero terminal SNR) and the DDPM/DDIM
samplers against hand computations: the v target and the x0 MONAI's steps recover from it, the rescaled betas, and
sampling with the exact predictor of Gaussian data (whose sample spread is known in closed form), which also shows
why noise prediction is fragile at high noise while v-prediction is not. No networks: analytic predictors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from meduet.engines.sampling import sample_latents
from meduet.errors import MeduetConfigError
from meduet.errors import require_bool
from meduet.losses.diffusion import DiffusionObjective, rescale_zero_terminal_snr

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


def _alpha_bar_by_hand(beta_start: float = 0.0015, beta_end: float = 0.0195) -> torch.Tensor:
    """The scaled-linear schedule written out: betas = linspace(sqrt(b0), sqrt(b1), T)^2, alpha_bar = prod(1 - beta)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    out, acc = [], 1.0
    for b in betas.tolist():
        acc *= 1.0 - b
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


def test_v_target_is_the_velocity_and_every_step_recovers_x0():
    ab = _alpha_bar_by_hand()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    for zsnr in (False, True):
        obj = DiffusionObjective("ddpm", prediction_type="v_prediction", zero_terminal_snr=zsnr)
        a = obj.scheduler.alphas_cumprod.double()
        if not zsnr:
            torch.testing.assert_close(a, ab, rtol=1e-5, atol=1e-7)
        s, r = a[t].sqrt().view(-1, 1, 1, 1, 1).float(), (1 - a[t]).sqrt().view(-1, 1, 1, 1, 1).float()
        v = obj.target(x0, noise, t)
        torch.testing.assert_close(v, s * noise - r * x0)  # v = sqrt(a) eps - sqrt(1 - a) x0
        xt = obj.add_noise(x0, noise, t)
        torch.testing.assert_close(xt, s * x0 + r * noise)
        # the exact v gives back x0 (and eps) through MONAI's DDIM and DDPM steps: x0 = sqrt(a) x_t - sqrt(1 - a) v
        for sampler in ("ddim", "ddpm"):
            sched = obj.make_scheduler(sampler)
            sched.set_timesteps(T)
            for i, ti in enumerate(t.tolist()):
                _, x0_hat = sched.step(v[i:i + 1], ti, xt[i:i + 1])
                torch.testing.assert_close(x0_hat, x0[i:i + 1], atol=1e-5, rtol=1e-5)
    # noise prediction is unchanged: the target is the noise
    eps_obj = DiffusionObjective("ddpm")
    torch.testing.assert_close(eps_obj.target(x0, noise, t), noise)
    assert eps_obj.config()["prediction_type"] == "epsilon" and not eps_obj.config()["zero_terminal_snr"]
    with pytest.raises(MeduetConfigError, match="needs the timesteps"):
        DiffusionObjective("ddpm", prediction_type="v_prediction").target(x0, noise)


def test_zero_terminal_snr_betas_by_hand():
    ab = _alpha_bar_by_hand()
    s = ab.sqrt()
    want = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2  # Lin et al.: sqrt(alpha_bar) shifted to 0, first value kept
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, T, dtype=torch.float64) ** 2
    got = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert got[-1] == 0 and got[0] == pytest.approx(ab[0]) and bool((got[1:] < got[:-1]).all())
    obj = DiffusionObjective("ddpm", prediction_type="v_prediction", zero_terminal_snr=True)
    torch.testing.assert_close(obj.make_scheduler("ddim").alphas_cumprod.double(), want, rtol=1e-5, atol=1e-6)
    # at the last timestep the noised latent is pure noise, as sampling starts from
    x0, noise = torch.randn(2, 1, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    torch.testing.assert_close(obj.add_noise(x0, noise, torch.tensor([T - 1, T - 1])), noise)
    with pytest.raises(MeduetConfigError, match="needs prediction_type v_prediction"):
        DiffusionObjective("ddpm", zero_terminal_snr=True)
    with pytest.raises(MeduetConfigError, match="prediction_type must be one of"):
        DiffusionObjective("ddpm", prediction_type="sample")
    cfg = obj.config()
    assert DiffusionObjective.from_config(cfg).config() == cfg  # recorded in model.pt, rebuilt by sampling


class GaussianOracle(nn.Module):
    """The exact prediction for data x0 ~ N(0, sigma^2 I): E[x0 | x_t] = sqrt(a) sigma^2 x_t / (a sigma^2 + 1 - a),
    E[eps | x_t] = sqrt(1 - a) x_t / (a sigma^2 + 1 - a), v from both; ``gain`` scales the output (a predictor
    that is off by a fixed fraction at ``t >= t_err``)."""

    def __init__(self, obj: DiffusionObjective, sigma: float, gain: float = 1.0, t_err: int = 0) -> None:
        super().__init__()
        self.obj, self.sigma, self.gain, self.t_err = obj, sigma, gain, t_err
        self.a = obj.make_scheduler("ddpm").alphas_cumprod.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.a[t.long()].view(-1, 1, 1, 1, 1)
        var = a * self.sigma**2 + 1 - a
        x0 = a.sqrt() * self.sigma**2 * x.double() / var
        eps = (1 - a).sqrt() * x.double() / var
        out = eps if self.obj.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        gain = torch.where(t.view(-1, 1, 1, 1, 1) >= self.t_err, self.gain, 1.0)
        return (out * gain).float()


def _std(obj: DiffusionObjective, sampler: str, steps: int, sigma: float, **kw) -> float:
    x = sample_latents(GaussianOracle(obj, sigma, **kw), (32, 1, 4, 4, 4), None, obj, sampler=sampler,
                       num_steps=steps, generator=torch.Generator().manual_seed(0))
    return float(x.std())


@pytest.mark.parametrize("prediction_type,zsnr", [("epsilon", False), ("v_prediction", False),
                                                  ("v_prediction", True)])
def test_ddpm_sampler_variance_gives_the_data_spread(prediction_type, zsnr):
    """Ancestral DDPM through all T steps with the exact predictor of N(0, sigma^2) data ends at spread sigma: the
    posterior variance (1 - a_{t-1}) / (1 - a_t) beta_t of every step is right (a wrong one, e.g. beta_t, would
    leave extra noise). 2048 values per run: the standard error of the std is ~1.6%."""
    obj = DiffusionObjective("ddpm", prediction_type=prediction_type, zero_terminal_snr=zsnr)
    sched = obj.make_scheduler("ddpm")
    for t in (1, 500, 999):  # MONAI's fixed_small variance, by hand
        a, a_prev, beta = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1], sched.betas[t]
        assert float(sched._get_variance(t)) == pytest.approx(float((1 - a_prev) / (1 - a) * beta), rel=1e-6)
    for sigma in (0.5, 2.0):
        assert _std(obj, "ddpm", T, sigma) == pytest.approx(sigma, rel=0.05)


def test_deterministic_ddim_amplifies_a_noise_prediction_error_and_not_a_v_prediction_error():
    """A predictor that is 10% low at every timestep (as a network trained from a zero output for a short while can
    be). From noise prediction, DDIM's x0 estimate is (x_t - sqrt(1 - a) eps) / sqrt(a): the noise left in it is
    multiplied by 1 / sqrt(a) (84 at t = 999) and the deterministic DDIM chain carries it to the end, so the samples
    come out much wider than the data; the same 10% error in v (x0 = sqrt(a) x_t - sqrt(1 - a) v) or ancestral
    DDPM (which re-draws the noise every step) moves the spread by less than 10%. Data N(0, 0.5^2): for unit data
    the exact v is 0 and a gain would not show."""
    sigma = 0.5
    eps = DiffusionObjective("ddpm")
    v = DiffusionObjective("ddpm", prediction_type="v_prediction")
    exact = _std(eps, "ddim", 50, sigma)
    assert exact == pytest.approx(sigma, rel=0.06)  # DDIM-50's own discretisation: a few percent low
    assert _std(v, "ddim", 50, sigma) == pytest.approx(exact, rel=1e-4)  # the same chain from an exact v
    assert _std(eps, "ddim", 50, sigma, gain=0.9) > 1.5 * exact
    assert _std(v, "ddim", 50, sigma, gain=0.9) == pytest.approx(exact, rel=0.1)
    assert _std(eps, "ddpm", T, sigma, gain=0.9) == pytest.approx(sigma, rel=0.15)


def test_bool_keys_fail_on_strings():
    with pytest.raises(MeduetConfigError, match=r"zero_terminal_snr must be True or False, got 'false'"):
        DiffusionObjective("ddpm", prediction_type="v_prediction", zero_terminal_snr="false")
    with pytest.raises(MeduetConfigError, match="--prior#enabled False"):
        require_bool("false", "prior#enabled")
    assert require_bool(False, "x") is False


def test_sampling_builds_no_autograd_graph():
    """sample_latents runs under no_grad (a sampling chain that kept every step's graph held ~0.5 GB per step of a
    batch of 24 demo latents: 50 DDIM steps ran out of memory)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.5))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * self.w

    x = sample_latents(Scaled(), (2, 1, 2, 2, 2), None, DiffusionObjective("ddpm"), sampler="ddim", num_steps=3,
                       generator=torch.Generator().manual_seed(0))
    assert not x.requires_grad and x.grad_fn is None


def test_clip_sample_value_bounds_the_x0_estimate():
    obj = DiffusionObjective("ddpm", clip_sample=True, clip_sample_value=2.5)
    for sampler in ("ddim", "ddpm"):
        sched = obj.make_scheduler(sampler)
        sched.set_timesteps(T)
        x = torch.full((1, 1, 2, 2, 2), 3.0)
        _, x0 = sched.step(torch.full_like(x, -1.0), 999, x)  # unclipped: (3 + sqrt(1 - a)) / sqrt(a) ~ 336
        assert float(x0.max()) == 2.5 and float(x0.min()) == 2.5
    assert DiffusionObjective.from_config(obj.config()).config()["clip_sample_value"] == 2.5
