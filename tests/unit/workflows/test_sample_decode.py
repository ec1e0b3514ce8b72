"""meduet_diffusion's decoding of sampled latents (``workflows.diffusion.common.decode``) through meduet_vae's
bounded-memory path: ``decode_window`` splits the latent into windows decoded one at a time; a window covering the
whole latent is the single decoder call."""

from __future__ import annotations

import pytest
import torch

from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.networks.vae import build_vae
from meduet.workflows.diffusion.common import decode, latent_shape

ARCH = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[8, 8, 8],
            num_res_blocks=[1, 1, 1], norm_num_groups=4, attention_levels=[False, False, False],
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_convtranspose=False)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(ARCH).eval()


def _calls(vae):
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape[2:])))
    return calls, handle


def test_decode_window_decodes_window_by_window(vae):
    space = LatentSpace(1.0)
    z = torch.randn(1, 4, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    calls, handle = _calls(vae)
    try:
        whole = decode(vae, z, space)
        n_whole = len(calls)
        tiled = decode(vae, z, space, decode_window=8)
        big = decode(vae, z, space, decode_window=16)
    finally:
        handle.remove()
    assert whole.shape == tiled.shape == (1, 48, 48, 48)
    assert n_whole == 1 and calls[0] == (12, 12, 12)
    windows = calls[1:-1]
    assert len(windows) == 8 and all(max(w) <= 8 for w in windows)  # 2 x 2 x 2 windows no larger than 8
    assert calls[-1] == (12, 12, 12)  # a window larger than the latent: one call on the whole latent
    torch.testing.assert_close(torch.from_numpy(big), torch.from_numpy(whole), atol=1e-5, rtol=1e-5)
    assert (torch.from_numpy(tiled) - torch.from_numpy(whole)).abs().max() > 1e-3  # blended windows, not one call


def test_latent_shape_takes_a_paper_sized_grid():
    rec = {"latent_channels": 4, "crop_size": [16, 16, 16]}
    assert latent_shape(rec, 2) == [2, 4, 16, 16, 16]
    assert latent_shape(rec, 1, 64) == [1, 4, 64, 64, 64]
    assert latent_shape(rec, 1, [8, 16, 24]) == [1, 4, 8, 16, 24]
    for bad in (0, [8, 8]):
        with pytest.raises(MeduetConfigError, match="latent_size"):
            latent_shape(rec, 1, bad)
