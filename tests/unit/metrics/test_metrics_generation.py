"""Generation metrics (meduet.metrics.generation): FID, MMD, MS-SSIM diversity, the two feature extractors and the
report meduet_diffusion's evaluate workflow writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.metrics.features import EncoderFeatures, MedicalNetFeatures, build_feature_extractor
from meduet.metrics.generation import (foreground_mask, outline_agreement, fid, generation_report, mmd, ms_ssim_diversity,
                                      ms_ssim_settings)
from meduet import records
from meduet.latent import LatentSpace
from meduet.networks.mae import build_mae
from meduet.networks.meduet import build_meduet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _gauss(n: int, f: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed)) + shift


# ----------------------------------------------------------------------------------------------------------------- FID
def test_fid_zero_on_itself_symmetric_and_monotone_in_shift():
    real = _gauss(64, 16, 0)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-6)
    shifts = [0.0, 0.5, 1.0, 2.0]
    values = [fid(real, _gauss(64, 16, 1, s)) for s in shifts]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] > 10 * values[0]
    fake = _gauss(64, 16, 1, 1.0)
    assert fid(real, fake) == pytest.approx(fid(fake, real), rel=1e-6)


def test_fid_small_samples_stay_finite_and_real():
    # far fewer samples than features: singular covariances; the ridge keeps sqrtm real
    real, fake = _gauss(4, 64, 0), _gauss(5, 64, 1, 3.0)
    value = fid(real, fake)
    assert value == value and value > fid(real, real) >= 0.0
    with pytest.raises(MeduetInputError, match="at least 2"):
        fid(real[:1], fake)
    with pytest.raises(MeduetInputError, match="differ in size"):
        fid(real, fake[:, :10])


# ----------------------------------------------------------------------------------------------------------------- MMD
def test_mmd_near_zero_for_one_distribution_and_larger_for_another():
    real = _gauss(64, 16, 0)
    same = mmd(real, _gauss(64, 16, 1))
    shifted = mmd(real, _gauss(64, 16, 1, 1.0))
    wider = mmd(real, 3.0 * _gauss(64, 16, 1))
    assert abs(same) < 0.02
    assert shifted > 0.1 and shifted > 10 * abs(same)
    assert wider > 5 * abs(same)  # the Gaussian kernel also sees a change of spread, not only of the mean
    assert mmd(real, real) < 0.02
    # unequal counts: the larger set is cut; linear kernel = MONAI's plain form
    assert mmd(real, _gauss(40, 16, 2, 1.0)) > 0.1
    assert mmd(real, _gauss(64, 16, 1, 1.0), kernel="linear") > mmd(real, _gauss(64, 16, 1), kernel="linear")


def test_mmd_on_images():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 1, 8, 8, 8, generator=g), torch.rand(6, 1, 8, 8, 8, generator=g)
    assert mmd(a, b + 0.5, kernel="linear") > mmd(a, b, kernel="linear") + 0.5


# ------------------------------------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_diversity_identical_vs_independent_volumes():
    g = torch.Generator().manual_seed(0)
    one = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 36, 36, 36, generator=g), 5, 1)  # (1, 1, 32, 32, 32)
    identical = one.repeat(4, 1, 1, 1, 1)
    noise = torch.rand(4, 1, 32, 32, 32, generator=g)
    assert ms_ssim_diversity(identical) == pytest.approx(1.0, abs=1e-5)
    div = ms_ssim_diversity(noise, data_range=1.0)
    assert div < 0.2
    assert ms_ssim_diversity(torch.rand(3, 1, 48, 48, 48, generator=g), data_range=1.0) < 0.2
    assert ms_ssim_settings((32, 32, 32))["kernel_size"] == 7 and ms_ssim_settings((48,) * 3)["scales"] == 3
    small = ms_ssim_settings((8, 8, 8))  # raw latents: smaller window, fewer scales
    assert small["kernel_size"] <= 5 and sum(small["weights"]) == pytest.approx(1.0)
    with pytest.raises(MeduetInputError, match="at least 2"):
        ms_ssim_diversity(noise[:1])


# ---------------------------------------------------------------------------------------------- encoder features
@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = records.with_meta(build_meduet("tiny", num_domains=2, in_channels=4), {"latent_scale_factor": 0.5})
    path = tmp_path_factory.mktemp("pretrain") / "model.pt"
    torch.save(net.state_dict(), path)
    return path, net


def _latents(n: int, seed: int, shift: float = 0.0, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 4, size, size, size, generator=torch.Generator().manual_seed(seed)) + shift


def test_encoder_features_from_checkpoint(pretrain_ckpt):
    path, net = pretrain_ckpt
    ext = build_feature_extractor("encoder", pretrain_ckpt=path)
    assert isinstance(ext, EncoderFeatures) and ext.name == "meduet-encoder (proxy)" and ext.space == "latent"
    assert ext.latent_space.scale_factor == 0.5
    real = _latents(6, 0)
    feats = ext(real)
    assert feats.shape == (6, net.dim + net.style_vector_dim) == (6, ext.feature_dim)
    assert torch.equal(feats, ext(real))  # deterministic
    # same as the in-memory network's pooled factors on the scaled latent (one window = the whole 8^3 latent)
    enc = net.eval().encode(real * 0.5)
    assert torch.allclose(feats, torch.cat([enc["content"], enc["style"]], 1), atol=1e-5)
    # inputs="scaled" takes latents already multiplied by the scale factor
    scaled = EncoderFeatures(path, inputs="scaled")
    assert torch.allclose(scaled(real * 0.5), feats, atol=1e-6)
    # whole latents larger than the crop go through sliding windows; sizes may differ
    assert ext([_latents(1, 1, size=12)[0], _latents(1, 2, size=16)[0]]).shape == (2, ext.feature_dim)
    other = _latents(6, 1, shift=3.0) * 4.0
    assert fid(feats, ext(other)) > fid(feats, ext(_latents(6, 2))) > fid(feats, feats)


def test_encoder_features_mae_and_missing_scale(tmp_path):
    mae = build_mae("tiny", in_channels=4)
    ext = EncoderFeatures(mae, latent_space=LatentSpace(1.0))
    assert ext.name == "mae-encoder (proxy)" and ext(_latents(2, 0)).shape == (2, mae.dim)
    with pytest.raises(MeduetConfigError, match="latent_scale_factor"):
        EncoderFeatures(build_meduet("tiny", num_domains=2, in_channels=4))
    with pytest.raises(MeduetConfigError, match="does not exist"):
        build_feature_extractor("encoder", pretrain_ckpt=tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------- MedicalNet features
def _medicalnet_file(path, depth: int = 10, wrap: bool = True):
    """A locally made file in MedicalNet's format: {"state_dict": {"module.<key>": tensor}} of a random resnet."""
    from monai.networks import nets
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    torch.manual_seed(0)
    net = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                          shortcut_type=shortcut, bias_downsample=bias)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd} if wrap else sd, path)
    return net


def test_medicalnet_features_from_local_weights(tmp_path):
    path = tmp_path / "resnet_10_23dataset.pth"
    ref = _medicalnet_file(path).eval()
    ext = build_feature_extractor("auto", weights_path=path)  # auto -> MedicalNet when a path is given
    assert isinstance(ext, MedicalNetFeatures) and ext.name == "medicalnet-resnet10" and ext.space == "image"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 32, 32, 32, generator=g)
    feats = ext(images)
    assert feats.shape == (3, 512) == (3, ext.feature_dim)
    z = (images - images.mean((1, 2, 3, 4), keepdim=True)) / images.std((1, 2, 3, 4), keepdim=True)
    with torch.no_grad():
        assert torch.allclose(feats, ref(z), atol=1e-4)  # the file's weights, not a fresh initialisation
    assert torch.equal(feats, ext(list(images)))


def test_medicalnet_errors(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(MeduetConfigError) as err:
        MedicalNetFeatures(missing)
    msg = str(err.value)
    assert "\n" not in msg and "absent.pth" in msg and "download MedicalNet" in msg and "weights_path" in msg
    with pytest.raises(MeduetConfigError, match="need weights_path"):
        build_feature_extractor("medicalnet")
    # a resnet10 file loaded as resnet18 names the misfit in one line
    path = tmp_path / "r10.pth"
    _medicalnet_file(path, wrap=False)
    with pytest.raises(MeduetConfigError, match="do not fit resnet18") as err:
        MedicalNetFeatures(path, depth=18)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------- report
def test_generation_report_with_encoder_features(pretrain_ckpt):
    path, _ = pretrain_ckpt
    ext = EncoderFeatures(path)
    real, fake = _latents(6, 0), _latents(5, 1, shift=2.0)
    g = torch.Generator().manual_seed(0)
    real_img, fake_img = torch.rand(6, 1, 32, 32, 32, generator=g), torch.rand(5, 1, 32, 32, 32, generator=g)
    rep = generation_report(real, fake, ext, real_images=real_img, fake_images=fake_img)
    assert rep["fid_features"] == "meduet-encoder (proxy)" and rep["n_real"] == 6 and rep["n_fake"] == 5
    assert rep["fid"] > 0 and rep["mmd"] > 0 and rep["ms_ssim_space"] == "image"
    assert rep["ms_ssim_kernel_size"] == 7 and len(rep["ms_ssim_weights"]) == 3
    assert 0 <= rep["ms_ssim_diversity_fake"] < 0.3 and 0 <= rep["ms_ssim_diversity_real"] < 0.3
    json.dumps(rep)
    same = generation_report(real, real, ext)  # latents only: diversity on the latents
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["ms_ssim_space"] == "latent"
    assert same["ms_ssim_diversity_fake"] == pytest.approx(same["ms_ssim_diversity_real"])


def test_generation_report_image_extractor_needs_images(tmp_path):
    path = tmp_path / "r10.pth"
    _medicalnet_file(path)
    ext = MedicalNetFeatures(path)
    with pytest.raises(MeduetConfigError, match="real_images"):
        generation_report(_latents(3, 0), _latents(3, 1), ext)
    g = torch.Generator().manual_seed(0)
    real_img, fake_img = torch.rand(3, 1, 32, 32, 32, generator=g), torch.rand(3, 1, 32, 32, 32, generator=g)
    rep = generation_report(_latents(3, 0), _latents(3, 1), ext, real_images=real_img, fake_images=fake_img)
    assert rep["fid_features"] == "medicalnet-resnet10" and rep["feature_dim"] == 512 and rep["fid"] > 0


# ------------------------------------------------------------------------------------------------- outline agreement
def _phantoms(n_subjects: int = 3, size: int = 40):
    """The sample data's phantoms (labels: 1 body, 2-4 organs and lesion) rendered by every site, CT-windowed."""
    from meduet.data.phantoms import ANATOMY, bias_field, make_anatomy, make_site_styles, render

    sites = make_site_styles(0, 6)
    out = []
    for s in range(n_subjects):
        label = make_anatomy(np.random.default_rng([0, ANATOMY, s]), size)
        for site in sites:
            img = render(label, site, bias_field(0, site, size), np.random.default_rng([s, site.index]))
            out.append((s, label, np.clip((img + 175.0) / 425.0, 0.0, 1.0), site))
    return out


def _iou(a, b):
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def test_foreground_mask_is_the_body_where_it_stands_out_and_inside_it_everywhere():
    standing_out = 0
    for _, label, img, site in _phantoms(2):
        mask, body = foreground_mask(img), label >= 1
        assert (mask & ~body).sum() <= 0.03 * mask.sum()  # never the air
        level = [(hu + 175.0) / 425.0 for hu in site.hu]
        if level[1] > max(level[2:]) - level[1]:  # the body stands out from the air more than any organ from it
            standing_out += 1
            assert _iou(mask, body) > 0.97
        else:  # a body near the window's floor: the bright organs
            assert mask.sum() < 0.7 * body.sum()
    assert standing_out == 2 * 2  # sites 0 and 3 of the sample data's six, for both subjects
    assert not foreground_mask(np.full((8, 8, 8), 0.3)).any()  # a constant volume has no foreground
    with pytest.raises(MeduetInputError, match="NaN"):
        foreground_mask(np.full((8, 8, 8), np.nan))
    with pytest.raises(MeduetInputError, match="3D"):
        foreground_mask(np.zeros((8, 8)))


def test_outline_agreement_scores_bodies_above_blobs_and_excludes_the_same_subject():
    ph = _phantoms(3)
    real = torch.stack([torch.from_numpy(img[None]).float() for _, _, img, _ in ph])
    groups = [s for s, _, _, _ in ph]
    # generated = other renderings of real anatomy, shifted by one voxel: bodies
    bodies = torch.roll(real[::6], shifts=1, dims=2)
    # generated = smooth random blobs (what an untrained generator decodes to)
    g = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.avg_pool3d(torch.rand(3, 1, 40, 40, 40, generator=g), 9, 1, 4)
    rep_bodies, rep_blobs = outline_agreement(bodies, real, groups), outline_agreement(blobs, real, groups)
    assert rep_bodies["outline_iou_fake"] > 0.85
    assert rep_blobs["outline_iou_fake"] < rep_bodies["outline_iou_fake"] - 0.2
    # every real scan is matched to another subject's body, not to its own at another site (which would give ~1)
    assert 0.3 < rep_bodies["outline_iou_real"] < 0.95
    everything_one_subject = outline_agreement(bodies, real, [0] * len(real))
    assert everything_one_subject["outline_iou_real"] is None
    # default: every other volume, the same subject at other sites included: closer matches
    assert outline_agreement(bodies, real)["outline_iou_real"] > rep_bodies["outline_iou_real"] + 0.05
    with pytest.raises(MeduetInputError, match="one grid"):
        outline_agreement(bodies[:, :, :32], real, groups)
