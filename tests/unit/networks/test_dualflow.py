"""meduet.networks.dualflow: 3D MedDiffusion's dual-flow denoiser (MONAI U-Net + sub-volume transformer) as a
meduet_diffusion backbone: shapes (training crops and odd whole-latent sizes), the U-Net alone at init, the local
flow's gradients after training steps, guidance semantics shared with the DiT, sampling, the record round trip and
one-line errors. Tiny networks, real computations, one thread."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import one_line_error
from meduet import records
from meduet.engines.diffusion import Conditioner, build_diffusion_network
from meduet.engines.sampling import sample_latents
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dit import build_dit
from meduet.networks.dualflow import DUALFLOW_PRESETS, LatentDualFlow, build_backbone, build_dualflow

pytestmark = pytest.mark.usefixtures("one_thread")

B, C, S = 4, 4, 8
DC, DS = 12, 6
FACTORS = dict(condition="factors", content_dim=DC, style_dim=DS)
METADATA = dict(condition="metadata", num_domains=3, num_metadata_scalars=2)


def _net(**kw) -> LatentDualFlow:
    torch.manual_seed(0)
    return build_dualflow("tiny", **kw)


def _perturb(model: nn.Module, std: float = 0.1, skip: str | None = None) -> nn.Module:
    """Move every parameter off its initial value (as training does), except those whose name holds ``skip``."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip is None or skip not in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _x(b: int = B, size=(S, S, S), seed: int = 0) -> torch.Tensor:
    return torch.randn(b, C, *size, generator=torch.Generator().manual_seed(seed))


def _factors(b: int = B, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"content": torch.randn(b, DC, generator=g), "style": torch.randn(b, DS, generator=g)}


def _meta(b: int = B) -> dict[str, torch.Tensor]:
    return {"domain": torch.arange(b) % 3, "metadata": torch.linspace(0.5, 2.0, b * 2).reshape(b, 2)}


@pytest.mark.parametrize("kw,cond", [({}, None), (METADATA, _meta()), (FACTORS, _factors())])
def test_shapes_at_the_crop_and_odd_sizes(kw, cond):
    m = _perturb(_net(**kw)).eval()
    t = torch.tensor([0, 10, 500, 999])
    out = m(_x(), t, cond)
    assert out.shape == (B, C, S, S, S) and torch.isfinite(out).all()
    # a whole phantom latent (14 x 10 x 15): padded by edge replication to multiples of 4, the output cropped back
    two = None if cond is None else {k: v[:2] for k, v in cond.items()}
    odd = m(_x(2, (14, 10, 15)), 250.5, two)
    assert odd.shape == (2, C, 14, 10, 15) and torch.isfinite(odd).all()
    assert m.multiple == 4 and m(_x(1, (5, 3, 9)), 7, None if cond is None else {k: v[:1] for k, v in cond.items()}
                                 ).shape == (1, C, 5, 3, 9)
    # the demo preset on its 16^3 crop (sub-volumes of 8^3, three U-Net levels) and a 12^3 latent (padded to 16)
    demo = build_dualflow("demo", **kw).eval()
    assert demo.multiple == 8 and demo(_x(1, (16, 16, 16)), 3, None if cond is None else
                                        {k: v[:1] for k, v in cond.items()}).shape == (1, C, 16, 16, 16)
    assert set(DUALFLOW_PRESETS) == {"tiny", "demo", "paper"}


def test_the_unet_alone_at_init():
    # zero-initialised injections: the network computes its U-Net branch, however far the U-Net, the local flow
    # and the condition path have moved (the injections excepted)
    m = _perturb(_net(**FACTORS), skip="inject_").eval()
    x, t, cond = _x(), torch.tensor([3, 300, 600, 900]), _factors()
    full, alone = m(x, t, cond), m.global_flow(x, t, cond)
    assert alone.abs().max() > 1e-2  # the U-Net's output conv moved too, so this is not zero == zero
    torch.testing.assert_close(full, alone, rtol=0, atol=0)
    # the local features are not zero: once an injection moves, the output does
    with torch.no_grad():
        m.inject_up[0].linear.weight.normal_(std=0.1)
    assert (m(x, t, cond) - alone).abs().max() > 1e-3
    # a fresh network outputs zeros, as the DiT does (MONAI zero-initialises the U-Net's last convolution)
    assert torch.count_nonzero(_net(**FACTORS)(x, t, cond)) == 0


def test_gradients_reach_the_local_flow_after_training_steps():
    # zero output conv -> zero injections -> adaLN-Zero blocks: each link opens after one optimiser step
    m = _net(**FACTORS).train()
    obj = DiffusionObjective("rflow")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x0, cond = _x(seed=3), _factors()
    local = [n for n, _ in m.named_parameters() if n.startswith("local_flow.")]

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        obj.loss(m, x0, cond).loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        opt.step()
        return grads

    def live(grads, names):
        return [n for n in names if grads[n] is not None and torch.count_nonzero(grads[n]) > 0]

    first = step()  # only the U-Net's zero output conv gets gradient at init
    assert live(first, local) == [] and live(first, ["unet.out.2.conv.weight"])
    second = step()  # the injections now see a gradient (the local features are not zero)
    assert live(second, ["inject_down.0.linear.weight", "inject_up.1.linear.weight"]) and live(second, local) == []
    third = step()  # the local flow's patch embedding and its blocks' adaLN-Zero modulations once they moved
    gates = [n for n in local if "adaLN_modulation" in n]
    assert set(live(third, local)) == {"local_flow.patch_embed.weight", "local_flow.patch_embed.bias", *gates}
    fourth = step()  # then every parameter of the local flow (attention, MLP, its condition projection)
    assert set(live(fourth, local)) == set(local), sorted(set(local) - set(live(fourth, local)))
    dead = [n for n, p in m.named_parameters() if fourth[n] is None or torch.count_nonzero(fourth[n]) == 0]
    assert dead in ([], ["y_embedder.null_embedding"])  # the null vector learns only from dropped rows


def test_guidance_semantics_as_the_dit():
    for kw, cond, other in [(FACTORS, _factors(), _factors(seed=9)),
                            (METADATA, _meta(), {"domain": torch.tensor([2, 2, 0, 1]), "metadata": torch.randn(B, 2)})]:
        m = _perturb(_net(**kw, cond_dropout=0.2)).train()  # train mode: forward_with_cfg must not drop randomly
        x, t = _x(), torch.tensor([1, 200, 400, 800])
        null = m(x, t, None)
        torch.testing.assert_close(m(x, t, cond, force_drop=True), null)
        torch.testing.assert_close(m(x, t, other, force_drop=torch.ones(B, dtype=torch.bool)), null)
        cond_out = m(x, t, cond, force_drop=False)
        assert not torch.allclose(cond_out, null)
        mixed = m(x, t, cond, force_drop=torch.tensor([True, False, True, False]))
        torch.testing.assert_close(mixed[0::2], null[0::2])
        torch.testing.assert_close(mixed[1::2], cond_out[1::2])
        torch.testing.assert_close(m.forward_with_cfg(x, t, cond, 1.0), cond_out)
        torch.testing.assert_close(m.forward_with_cfg(x, t, cond, 3.0), null + 3.0 * (cond_out - null),
                                   rtol=1e-4, atol=1e-5)
        assert m.cond_keys == (("content", "style") if kw is FACTORS else ("domain", "metadata"))
    m = _perturb(_net(**FACTORS, cond_dropout=0.3)).train()
    torch.manual_seed(0)
    assert abs(m.drop_mask(20000, {"content": None}, None, torch.device("cpu")).float().mean().item() - 0.3) < 0.02
    assert not m.eval().drop_mask(100, {"content": None}, None, torch.device("cpu")).any()
    plain = _perturb(_net()).eval()  # condition none: one plain pass whatever the scale, cond ignored
    x, t = _x(), torch.tensor([5, 250, 500, 750])
    torch.testing.assert_close(plain.forward_with_cfg(x, t, None, 4.0), plain(x, t))
    torch.testing.assert_close(plain(x, t, _factors(), force_drop=False), plain(x, t))


def test_sampling_runs_unchanged():
    obj = DiffusionObjective("rflow", num_train_timesteps=100)
    m = _perturb(_net(**METADATA, num_train_timesteps=100), std=0.05)
    batches: list[int] = []
    m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    cond = {"domain": torch.tensor([0, 2]), "metadata": torch.ones(2, 2)}
    out = sample_latents(m, (2, C, 6, 8, 10), cond, obj, "rflow", 4, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, C, 6, 8, 10) and torch.isfinite(out).all() and set(batches) == {4}


def test_record_round_trip(tmp_path):
    m = _perturb(_net(**FACTORS)).eval()
    m.meta = {"objective": DiffusionObjective("rflow").config(), "latent_scale_factor": 0.7, "crop_size": [8, 8, 8]}
    path = tmp_path / "model.pt"
    torch.save(m.state_dict(), path)
    loaded = records.load(path, expect=("dit", "dualflow"))
    assert isinstance(loaded, LatentDualFlow) and not loaded.training and records.KIND_BUNDLE["dualflow"] == (
        "meduet_diffusion")
    assert loaded.meta == m.meta and loaded.arch == m.arch and loaded.kind == "dualflow"
    x, t, cond = _x(), torch.tensor([1, 2, 3, 4]), _factors()
    torch.testing.assert_close(loaded(x, t, cond), m(x, t, cond))
    # what inference.json's network_def builds (backbone, preset, sizes) takes the file strictly
    net = build_backbone("dualflow", "tiny", in_channels=C, input_size=[8, 8, 8], condition="factors",
                         content_dim=DC, style_dim=DS, content_map=False, num_domains=0)
    records.load_into(net, path)
    torch.testing.assert_close(net(x, t, cond), m(x, t, cond))
    build_dualflow("tiny", **FACTORS, cond_dropout=0.3).load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(MeduetConfigError, match="another 'dualflow' architecture"):
        build_dualflow("tiny", **dict(FACTORS, local_depth=2)).load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(MeduetConfigError, match="holds a 'dualflow' network"):
        build_dit("tiny", **FACTORS).load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(MeduetConfigError, match="holds a 'dualflow' network"):
        records.load(path, expect="dit")  # the DiT-only loaders (ControlNet base, LDAE) say what the file holds


def test_one_line_errors():
    m = _net(**METADATA)
    x, t = _x(), torch.tensor([1, 2, 3, 4])
    one_line_error(lambda: m(torch.zeros(2, 3, 8, 8, 8), 1), r"(B, 4, S1, S2, S3)", "latent channels",
                   error=MeduetConfigError)
    one_line_error(lambda: m(torch.zeros(4, 8, 8, 8), 1), "dualflow input", error=MeduetConfigError)
    one_line_error(lambda: m(x, t, {"domain": torch.tensor([0, 1, 5, 2]), "metadata": torch.zeros(B, 2)}),
                   "site index 5", error=MeduetConfigError)
    with pytest.raises(MeduetConfigError, match=r"cond\['style'\] must have shape \(4, 6\)"):  # the DiT's check
        _net(**FACTORS)(x, t, dict(_factors(), style=torch.zeros(B, 7)))
    one_line_error(lambda: build_dualflow("tiny", channels=(8, 10)), "norm_num_groups", error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", num_head_channels=5), "dualflow U-Net", "preset",
                   error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", sub_volume=5), "sub_volume 5", error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", patch_size=3, sub_volume=6), "power of two",
                   error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", local_dim=25), "divisible by num_heads 2", error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", condition="semantic"), "backbone dit", error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("tiny", **FACTORS, content_map=True), "content_map",
                   error=MeduetConfigError)
    one_line_error(lambda: build_dualflow("huge"), "unknown dualflow preset", error=MeduetConfigError)
    one_line_error(lambda: build_backbone("unet", "tiny"), "backbone must be one of", error=MeduetConfigError)


def test_selected_by_the_training_builder():
    latents = {"latent_channels": C, "domains": ["a", "b", "c"], "latent_scale_factor": 0.5}
    obj = DiffusionObjective("rflow")
    net = build_diffusion_network("tiny", latents, Conditioner("metadata"), obj, [8, 8, 8], backbone="dualflow")
    assert isinstance(net, LatentDualFlow) and net.arch["num_domains"] == 3 and net.arch["input_size"] == [8, 8, 8]
    assert net.meta["crop_size"] == [8, 8, 8] and net.meta["condition"] == "metadata"
    assert type(build_diffusion_network("tiny", latents, Conditioner("none"), obj, [8, 8, 8])).__name__ == "LatentDiT"
    one_line_error(lambda: build_diffusion_network("tiny", latents, Conditioner("none"), obj, [8, 8, 8],
                                                   backbone="unet"), "backbone must be one of", error=MeduetConfigError)
    one_line_error(lambda: build_diffusion_network("tiny", latents, Conditioner("none"), obj, [8, 8, 8],
                                                   init_from_pretrained=True, backbone="dualflow"),
                   "init_from_pretrained", error=MeduetConfigError)
