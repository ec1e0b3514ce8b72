"""meduet.networks.vae and the reconstruction metrics: real computations on small networks."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.networks.utils import copy_model_state

from meduet import records
from meduet.errors import MeduetConfigError
from meduet.latent import LatentSpace
from meduet.metrics.reconstruction import patch_border_mask, reconstruction_metrics, seam_error
from meduet.networks.vae import (
    MAISI_CT_ARCHITECTURE,
    build_vae,
    decode_patchwise,
    encode_patchwise,
)


def load_vae(path):
    return records.load(path, expect="vae")


def load_pretrained_weights(vae, path):
    return records.load_weights(vae, path, "pretrained VAE weights")

TINY = dict(MAISI_CT_ARCHITECTURE, num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(TINY).eval()


def test_shapes_and_downsampling(vae):
    x = torch.rand(2, 1, 32, 24, 16)
    recon, mu, sigma = vae(x)
    assert recon.shape == x.shape
    assert mu.shape == sigma.shape == (2, 4, 8, 6, 4)
    assert vae.downsample_factor == 4


def test_record_travels_with_state_dict(vae, tmp_path):
    vae.meta.update({"latent_scale_factor": 1.75, "preprocessing": {"modality": "CT"}, "domains": ["a", "b"]})
    path = tmp_path / "model.pt"
    torch.save(vae.state_dict(), path)
    rebuilt = load_vae(path)
    assert rebuilt.architecture == vae.architecture
    assert LatentSpace.from_vae(rebuilt).scale_factor == 1.75 and rebuilt.meta["domains"] == ["a", "b"]
    for (k, a), b in zip(vae.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    # the way monai.bundle.load copies weights (matching names and shapes) carries the record too
    fresh = build_vae(TINY)
    copy_model_state(fresh, torch.load(path, weights_only=True))
    assert LatentSpace.from_vae(fresh).scale_factor == 1.75


def test_architecture_mismatch_is_an_error(vae, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(vae.state_dict(), path)
    other = build_vae(dict(TINY, latent_channels=8))
    with pytest.raises(MeduetConfigError, match="another 'vae' architecture"):
        copy_model_state(other, torch.load(path, weights_only=True))


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(MeduetConfigError) as e:
        load_vae(tmp_path / "nope.pt")
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_maisi_format_weights_load(tmp_path):
    """A plain AutoencoderKlMaisi state dict of the paper architecture (MAISI's published format) loads exactly."""
    torch.manual_seed(1)
    arch = {k: v for k, v in MAISI_CT_ARCHITECTURE.items()}
    maisi = AutoencoderKlMaisi(**arch, num_splits=1, dim_split=1, norm_float16=False)
    path = tmp_path / "autoencoder_maisi.pt"
    torch.save({"module." + k: v for k, v in maisi.state_dict().items()}, path)  # DDP-saved keys are accepted
    ours = load_pretrained_weights(build_vae(), path)
    theirs = maisi.state_dict()
    for k, v in ours.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, theirs[k]), k
    # a file for another architecture is refused instead of silently leaving random weights
    with pytest.raises(MeduetConfigError, match="do not fit"):
        load_pretrained_weights(build_vae(TINY), path)


def test_patchwise_encoding_is_per_patch(vae):
    """With no overlap, patch-wise encoding equals encoding each patch alone (3D MedDiffusion's patch encoding)."""
    torch.manual_seed(2)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        z = encode_patchwise(vae, x, patch_size=16, overlap=0.0)
        assert z.shape == (1, 4, 8, 8, 4)
        corner = vae.encode_mean(x[..., 16:32, 0:16, 0:16])
        assert torch.allclose(z[..., 4:8, 0:4, 0:4], corner, atol=1e-5)
        whole = vae.encode_mean(x)
    # and it differs from whole-volume encoding near the patch borders (receptive field is cut)
    assert not torch.allclose(z, whole, atol=1e-4)


def test_patchwise_window_batching_gives_the_same_volume(vae):
    """Several windows per network call (the default, much faster on CPU) stitch the same latent and image as one
    window per call; 4 windows of 16^3 in two calls of 3 and 1 also cover a partial last batch."""
    torch.manual_seed(3)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        one = encode_patchwise(vae, x, patch_size=16, overlap=0.0, sw_batch_size=1)
        for b in (3, 4):
            assert torch.allclose(encode_patchwise(vae, x, patch_size=16, overlap=0.0, sw_batch_size=b), one, atol=1e-5)
        dec_one = decode_patchwise(vae, one, latent_patch_size=4, overlap=0.25, sw_batch_size=1)
        dec_many = decode_patchwise(vae, one, latent_patch_size=4, overlap=0.25)
    assert torch.allclose(dec_many, dec_one, atol=1e-5)


def test_patchwise_decoding_matches_shape(vae):
    z = torch.randn(1, 4, 12, 8, 8)
    with torch.no_grad():
        y = decode_patchwise(vae, z, latent_patch_size=8, overlap=0.25)
        full = vae.decode(z)
    assert y.shape == full.shape == (1, 1, 48, 32, 32)
    assert torch.isfinite(y).all()


def test_patch_divisibility_error(vae):
    with pytest.raises(ValueError, match="divisible by 4"):
        encode_patchwise(vae, torch.rand(1, 1, 30, 32, 32), patch_size=16)


def test_seam_error_detects_borders():
    target = torch.zeros(1, 1, 32, 32, 32)
    mask = patch_border_mask((32, 32, 32), 16, width=1)
    assert mask[15].all() and mask[16].all() and not mask[8, 8, 8] and not mask[0, 8, 8]
    seamy = target.clone()
    seamy[0, 0][mask] = 0.5
    seamy += 0.05
    s = seam_error(seamy, target, 16)
    assert s["seam_ratio"] > 5
    flat = target + 0.05
    assert seam_error(flat, target, 16)["seam_ratio"] == pytest.approx(1.0)


def test_reconstruction_metrics_order():
    torch.manual_seed(3)
    x = torch.rand(1, 1, 32, 32, 32)
    good = reconstruction_metrics((x + 0.01 * torch.randn_like(x)).clamp(0, 1), x)
    bad = reconstruction_metrics((x + 0.2 * torch.randn_like(x)).clamp(0, 1), x)
    assert good["psnr"] > bad["psnr"] + 10
    assert good["ssim"] > bad["ssim"] and good["ms_ssim"] > bad["ms_ssim"]
    assert reconstruction_metrics(x, x)["ssim"] == pytest.approx(1.0, abs=1e-4)


def test_fast_norm_computes_maisis_function():
    """torch GroupNorm in place of MAISI's per-group loop: same state-dict keys, same outputs."""
    torch.manual_seed(4)
    maisi = build_vae(TINY, fast_norm=False).eval()
    fast = build_vae(TINY, fast_norm=True).eval()
    assert list(maisi.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(maisi.state_dict())
    with torch.no_grad():
        for p in maisi.parameters():  # non-trivial norm affine parameters
            p.add_(0.01 * torch.randn_like(p))
        fast.load_state_dict(maisi.state_dict())
        x = torch.rand(1, 1, 16, 16, 16)
        assert torch.allclose(maisi.reconstruct(x), fast.reconstruct(x), atol=1e-4)


@pytest.mark.parametrize("side", [40, 88, 100])
def test_ms_ssim_scales_fit_monai_size_check(side):
    """Volumes whose side passes the halving rule but not MONAI's own check (side // (L-1)^2 > k-1) used to fail."""
    x = torch.rand(1, 1, side, side, side)
    m = reconstruction_metrics((x * 0.9 + 0.05), x)
    assert 1 <= m["ms_ssim_scales"] <= 5 and 0 < m["ms_ssim"] <= 1


@pytest.mark.parametrize("size,window,overlap", [(40, 16, 0.0), (56, 32, 0.0), (32, 16, 0.0), (44, 16, 0.25),
                                                 (20, 32, 0.0)])
def test_window_borders_are_where_monais_sliding_windows_meet(size, window, overlap):
    """Each window writes its own random constant; MONAI averages where windows overlap, so the output changes value
    exactly where a window begins or ends: those positions must be ``window_borders``."""
    from monai.inferers import sliding_window_inference

    from meduet.metrics.reconstruction import window_borders

    g = torch.Generator().manual_seed(0)
    out = sliding_window_inference(torch.zeros(1, 1, size, 8, 8), roi_size=(window, 8, 8), sw_batch_size=1,
                                   predictor=lambda t: torch.full_like(t, float(torch.rand(1, generator=g))),
                                   overlap=overlap, mode="constant")
    line = out[0, 0, :, 0, 0]
    changes = [i for i in range(1, size) if not torch.isclose(line[i], line[i - 1])]
    assert changes == window_borders(size, window, overlap)
    if size % window and size > window:  # the last window is shifted back: a border that is no multiple
        assert any(b % window for b in changes)


def test_patch_encoding_is_one_setting_read_from_the_record(vae):
    from meduet.networks.vae import PatchEncoding

    vae.meta["patch_encoding"] = PatchEncoding([16, 16, 16], 0.0, "constant").record()
    assert PatchEncoding.of(vae) == PatchEncoding((16, 16, 16), 0.0, "constant")
    assert PatchEncoding.of(vae, overlap=0.5).overlap == 0.5  # an explicit value replaces the stored one
    vae.meta.pop("patch_encoding")
    assert PatchEncoding.of(vae, default=PatchEncoding(64, 0.25, "gaussian")).mode == "gaussian"
    with pytest.raises(MeduetConfigError, match="overlap"):
        PatchEncoding(16, 1.0)


@pytest.mark.parametrize("size,most,over,multiple", [(64, 40, 2, 1), (256, 128, 8, 4), (100, 40, 4, 4), (48, 40, 2, 1),
                                                     (37, 10, 3, 1), (30, 40, 2, 1), (200, 64, 0, 4)])
def test_fit_windows_cover_the_axis_with_the_fewest_windows_and_the_minimum_overlap(size, most, over, multiple):
    from monai.data.utils import dense_patch_slices

    from meduet.networks.vae import fit_overlap, fit_windows

    window, count = fit_windows(size, most, over, multiple)
    assert window <= most and window % multiple == 0
    interval = window if window == size else int(window * (1 - fit_overlap(window, size, over)))
    starts = [int(sl[0].start) for sl in dense_patch_slices((size,), (window,), (interval,))]
    assert len(starts) == count  # MONAI places exactly the windows counted
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        assert s % multiple == 0  # aligned with the latent grid
        covered[s : s + window] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + window == size
    for a, b in zip(starts, starts[1:]):
        assert a + window - b >= over  # neighbours overlap by at least the minimum
    # fewest: one window less cannot cover the axis with that overlap
    fewer = count - 1
    assert fewer == 0 or fewer * most - (fewer - 1) * over < size


def test_fit_windows_errors():
    from meduet.networks.vae import fit_windows

    with pytest.raises(MeduetConfigError, match="multiples of 4"):
        fit_windows(100, 40, 2, 4)
    with pytest.raises(MeduetConfigError, match="minimum overlap"):
        fit_windows(100, 8, 8)
    with pytest.raises(MeduetConfigError, match="tiling"):
        from meduet.networks.vae import PatchEncoding

        PatchEncoding(tiling="any")


def test_fit_tiling_equals_monai_sliding_windows_and_placement(vae):
    """PatchEncoding with tiling='fit' / decode_window is MONAI's sliding_window_inference with the fitted roi and
    overlap; every window is no larger than the maximum and the stitched volume is the whole one where windows do
    not interact (a per-voxel predictor)."""
    from monai.inferers import sliding_window_inference

    from meduet.networks.vae import PatchEncoding

    torch.manual_seed(1)
    scheme = PatchEncoding(patch_size=16, tiling="fit", min_overlap=4, decode_window=5, decode_overlap=1,
                           sw_batch_size=2, decode_batch_size=2)
    x = torch.rand(1, 1, 36, 28, 16)
    with torch.no_grad():
        z = scheme.encode(vae, x)
        roi, ov = scheme.encode_tiling(x.shape[2:], 4)
        assert roi == [16, 16, 16]  # 36 -> 3 windows of 16 at 0, 12, 20 (overlaps 4 and 8); 28 -> 2 of 16; 16 -> 1
        ref = sliding_window_inference(x, roi, 2, vae.encode_mean, overlap=ov, mode="constant")
        assert torch.equal(z, ref)
        y = scheme.decode(vae, z)
        droi, dov = scheme.decode_tiling(z.shape[2:])
        assert droi == [5, 4, 4]  # latent 9 -> 2 windows of 5 (overlap 1); 7 -> 2 of 4; 4 -> 1
        assert torch.equal(y, sliding_window_inference(z, droi, 2, vae.decode, overlap=dov, mode="gaussian"))
        assert y.shape == x.shape
        # windows that do not interact: a per-voxel predictor is reproduced exactly by the fitted tiling
        per_voxel = lambda t: 2 * t + 1  # noqa: E731
        assert torch.allclose(sliding_window_inference(x, roi, 2, per_voxel, overlap=ov, mode="constant"),
                              per_voxel(x), atol=1e-6)
    # seam borders: the encode windows' starts/ends and the decode windows' (x f) ones
    b = scheme.borders(x.shape[2:], 4)
    assert b[0] == [12, 16, 20, 28]  # encode windows [0, 16), [12, 28), [20, 36); decode [0, 5), [4, 9) x 4
    assert b[1] == [12, 16]  # encode [0, 16), [12, 28); decode latent [0, 4), [3, 7) x 4
    assert b[2] == []  # one window along the last axis (16 voxels / latent 4)
    # the paper's default stays: fixed windows, volume-wise decoding
    paper = PatchEncoding(64)
    assert paper.decode_window is None and paper.tiling == "fixed"
    with torch.no_grad():
        assert torch.equal(paper.decode(vae, z), vae.decode(z))


def test_fit_decode_bounds_the_window_and_counts(vae):
    """The issue's example: a 64^3 latent (256^3 image) with decode_window 40 and overlap 2 -> 2 windows per axis
    of 33^3, 8 in all (MONAI's placement counted), against 27 of 16^3 at 0.25 overlap for a 128^3 image."""
    from monai.data.utils import dense_patch_slices

    from meduet.networks.vae import PatchEncoding

    scheme = PatchEncoding(decode_window=40, decode_overlap=2)
    roi, ov = scheme.decode_tiling((64, 64, 64))
    assert roi == [33, 33, 33]
    interval = [int(r * (1 - o)) for r, o in zip(roi, ov)]
    assert len(dense_patch_slices((64, 64, 64), roi, interval)) == 8
    assert scheme.decode_tiling((32, 32, 32))[0] == [32, 32, 32]  # fits: one window, the whole latent


def test_windowed_decoding_passes_gradients_to_the_decoder(vae):
    """Decoder fine-tuning with decode_window decodes through the windows: the loss reaches every decoder weight that
    the whole decode reaches."""
    from meduet.networks.vae import PatchEncoding

    torch.manual_seed(2)
    z = torch.randn(1, 4, 7, 5, 4)
    scheme = PatchEncoding(decode_window=4, decode_overlap=1)
    assert scheme.decode_tiling(z.shape[2:])[0] == [4, 3, 4]
    vae.zero_grad(set_to_none=True)
    y = scheme.decode(vae, z)
    assert y.shape == (1, 1, 28, 20, 16) and y.requires_grad
    y.abs().mean().backward()
    grads = [p.grad for p in vae.decoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    vae.zero_grad(set_to_none=True)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``fn(*args)`` runs."""
    seen: set = set()

    def pack(t):
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(n for _, n in seen)


def test_checkpoint_blocks_gives_the_same_decoder_values_and_gradients_and_keeps_less():
    torch.manual_seed(0)
    plain = build_vae(TINY).eval()
    ckpt = build_vae(TINY, checkpoint_blocks=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    z = torch.randn(1, 4, 8, 8, 8)
    grads = []
    for net in (plain, ckpt):
        net.zero_grad()
        out = net.decode(z)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in net.decoder.parameters()])
        with torch.no_grad():
            assert torch.allclose(net.decode(z), out.detach(), atol=1e-6)  # no_grad: the plain path
    assert torch.allclose(plain.decode(z), ckpt.decode(z), atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads, strict=True))
    # what the backward keeps: only each block's input, several times less than every activation
    assert _saved_bytes(ckpt.decode, z) * 3 < _saved_bytes(plain.decode, z)
    with pytest.raises(MeduetConfigError, match="checkpoint_blocks must be True or False"):
        build_vae(TINY, checkpoint_blocks="false")
