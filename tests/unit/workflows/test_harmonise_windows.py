"""The served harmonisation's pieces that need no trained chain: the generator by sliding windows of its training crop
(meduet.workflows.diffusion.harmonise.WindowedGenerator), the inferer's checks and the output's name."""

from __future__ import annotations

import pytest
import torch

from meduet.errors import MeduetConfigError
from meduet.networks.dit import build_dit
from meduet.workflows.diffusion.harmonise import WindowedGenerator
from meduet.workflows.diffusion.harmonise_serve import HarmoniseInferer, target_name


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    dit = build_dit("tiny", input_size=[8, 8, 8], condition="factors", content_dim=6, style_dim=4).eval()
    for p in dit.parameters():  # adaLN-zero starts at zero output: give it some so the check means something
        p.data.add_(0.05 * torch.randn_like(p))
    return dit


def _cond(n: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"content": torch.randn(n, 6, generator=g), "style": torch.randn(n, 4, generator=g)}


def test_one_window_is_the_network(net):
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([400])
    with torch.no_grad():
        whole = net.forward_with_cfg(x, t, _cond(), 1.5)
        windowed = WindowedGenerator(net, [8, 8, 8]).forward_with_cfg(x, t, _cond(), 1.5)
    torch.testing.assert_close(windowed, whole)


def test_windows_cover_a_latent_larger_than_the_crop(net):
    x, t = torch.randn(1, 4, 12, 8, 16), torch.tensor([400])
    wrapped = WindowedGenerator(net, [8, 8, 8], overlap=0.5)
    with torch.no_grad():
        out = wrapped.forward_with_cfg(x, t, _cond(), 1.5)
        uncond = wrapped.forward_with_cfg(x, t, None, 1.0)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, uncond)
    assert wrapped.arch is net.arch and next(wrapped.parameters()) is next(net.parameters())
    with pytest.raises(MeduetConfigError, match="one latent at a time"):
        wrapped.forward_with_cfg(torch.randn(2, 4, 12, 8, 16), torch.tensor([1, 1]), _cond(2), 1.0)


def test_inferer_settings_are_checked_and_outputs_named():
    with pytest.raises(MeduetConfigError, match="generate must be one of"):
        HarmoniseInferer(target_site="site1", generate="tiles")
    with pytest.raises(MeduetConfigError, match="num_steps"):
        HarmoniseInferer(target_site="site1", num_steps=0)
    inf = HarmoniseInferer(target_site="", reference="/data/ref_scan.nii.gz")
    assert inf.target_site is None and inf.with_target("site2").target_site == "site2"
    assert target_name("site3") == "to_site3" and target_name(None, "/data/ref_scan.nii.gz") == "to_ref_scan"
