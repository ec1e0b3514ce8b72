"""meduet.engines.recon / recon_fit and meduet.losses.recon: DisINR pretraining on measurements only, test-time
fitting of a new subject encoder and the baselines, on small tensors (8^3-12^3 volumes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import one_line_error
from meduet.data import get_split
from meduet.data.measurements import simulate
from meduet.engines.recon import (MeasurementSet, ReconTrainer, build_inr, load_volume, select_subjects,
                                  simulate_training_set, training_acquisition)
from meduet.engines.recon_fit import METHODS, classical_reconstruction, fit, image_metrics
from meduet.errors import MeduetConfigError
from meduet.losses.recon import measurement_loss
from meduet.networks.inr import DisINR

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(shared_resolutions=[4, 8], shared_features=2, subject_resolution=3, subject_features=2, hidden=16,
            depth=2)
SIZE = 10


def _blob(seed: int, size: int = SIZE) -> torch.Tensor:
    """A smooth non-negative volume (S, S, S) in [0, 1]: a few Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    zz = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)
    out = torch.zeros(size, size, size)
    for _ in range(3):
        c = torch.rand(3, generator=g) * 1.2 - 0.6
        out += torch.exp(-((zz - c) ** 2).sum(-1) / 0.15)
    return (out / out.max()).clamp(0, 1)


@pytest.mark.parametrize("modality", ["mri", "ct", "pet"])
def test_measurement_loss_is_zero_at_the_data_and_grows_away_from_it(modality):
    acq = training_acquisition(modality, SIZE, acceleration=2, num_angles=8, total_counts=1e5)
    op, x = acq.operator(), _blob(0)[None, None]
    y = op(x) if modality != "pet" else op(x) * 50.0  # PET: noise-free expected counts at some count level
    assert float(measurement_loss(op(x), y, modality)) < 1e-6
    assert float(measurement_loss(op(0.5 * x + 0.2), y, modality)) > 1e-3
    if modality == "pet":  # the count scale is profiled out: any multiple of the image fits as well
        assert float(measurement_loss(op(3.0 * x), y, modality)) < 1e-6


def test_training_items_hold_measurements_only_and_the_loss_ignores_a_clean_image(tiny_data):
    # the tiny sample data made by the session fixture (a fresh clone has no data/sample/)
    items = get_split(str(tiny_data / "phantoms/datalist.json"), "training")[:3]
    acq = training_acquisition("ct", 12, num_angles=10)
    data = simulate_training_set(items, acq)
    assert all(set(data[i]) == {"subject", "measurement"} for i in range(len(data)))
    clean = load_volume(items[1]["image"], acq.image_shape)
    assert torch.equal(data[1]["measurement"], simulate(clean, acq)[0])
    net = build_inr(ARCH, len(data), "ct")
    trainer = ReconTrainer("cpu", 1, DataLoader(data, batch_size=2), net, torch.optim.Adam(net.parameters()),
                           acq.operator(), "ct", acq.image_shape)
    batch = next(iter(DataLoader(data, batch_size=2)))
    base = trainer.batch_loss(batch)
    for image in (torch.zeros(2, 1, 12, 12, 12), clean.expand(2, 1, 12, 12, 12), torch.rand(2, 1, 12, 12, 12)):
        assert torch.equal(trainer.batch_loss({**batch, "image": image}), base)
    # what it does depend on: the measurement
    assert not torch.equal(trainer.batch_loss({**batch, "measurement": batch["measurement"] * 1.1}), base)


@pytest.mark.parametrize("modality", ["mri", "pet"])
def test_pretraining_lowers_the_measurement_loss_and_fits_every_subject_encoder(modality):
    torch.manual_seed(0)
    acq = training_acquisition(modality, SIZE, acceleration=2, num_angles=8, total_counts=1e5)
    data = MeasurementSet([simulate(_blob(i), acq, seed=i)[0] for i in range(4)])
    net = build_inr(ARCH, 4, modality)
    assert net.arch["output_activation"] == ("softplus" if modality == "pet" else "none")
    start_codes = net.subject_encoder.codes.detach().clone()
    loader = DataLoader(data, batch_size=2, shuffle=True)
    trainer = ReconTrainer("cpu", 15, loader, net, torch.optim.Adam(net.parameters(), lr=1e-2), acq.operator(),
                           modality, acq.image_shape)
    first = float(trainer.batch_loss(next(iter(DataLoader(data, batch_size=4)))))
    trainer.run()
    last = float(trainer.batch_loss(next(iter(DataLoader(data, batch_size=4)))))
    assert last < 0.5 * first, (first, last)
    moved = (net.subject_encoder.codes.detach() - start_codes).flatten(1).abs().sum(1)
    assert bool((moved > 0).all())


def _pretrained(modality: str) -> tuple[DisINR, object]:
    torch.manual_seed(1)
    acq = training_acquisition(modality, SIZE, acceleration=2, num_angles=8, total_counts=1e5)
    data = MeasurementSet([simulate(_blob(i), acq, seed=i)[0] for i in range(3)])
    net = build_inr(ARCH, 3, modality)
    ReconTrainer("cpu", 5, DataLoader(data, batch_size=1), net, torch.optim.Adam(net.parameters(), lr=1e-2),
                 acq.operator(), modality, acq.image_shape).run()
    return net.single_subject(), acq


def test_disinr_fits_only_a_new_subject_encoder_and_leaves_the_pretrained_network_unchanged():
    net, acq = _pretrained("mri")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    truth = _blob(7)[None, None]
    y = simulate(truth, acq)
    res = fit(net, y, acq.operator(), "mri", "disinr", acq.image_shape, iterations=30, learning_rate=5e-2,
              truth=truth, metric_interval=10)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the given network is untouched
    assert res.trained_parameters == net.parameter_counts()["subject_encoder"] == 2 * 27
    assert res.losses[-1] < res.losses[0] and len(res.losses) == 30
    assert [m["iteration"] for m in res.metrics] == [10, 20, 30]
    assert res.image.shape == (1, 1, SIZE, SIZE, SIZE)
    # the same fit by hand: the shared pair stays as it was, only the subject grid moves
    from meduet.engines.recon_fit import trainable_parameters

    copy_net, params = trainable_parameters(net, "disinr")
    assert [id(p) for p in params] == [id(copy_net.subject_encoder.codes)]
    assert all(not p.requires_grad for p in copy_net.shared_parameters())


@pytest.mark.parametrize("modality", ["mri", "ct", "pet"])
def test_every_method_reconstructs_and_the_inr_methods_lower_their_loss(modality):
    net, acq = _pretrained(modality)
    truth = _blob(5)[None, None]
    y = simulate(truth, acq, seed=3)
    results = {m: fit(net, y, acq.operator(), modality, m, acq.image_shape, iterations=25, learning_rate=2e-2,
                      truth=truth, metric_interval=5) for m in METHODS}
    counts = net.parameter_counts()
    assert results["disinr"].trained_parameters == counts["subject_encoder"]
    assert results["finetune"].trained_parameters == results["scratch"].trained_parameters == counts["total"]
    for m in ("disinr", "finetune", "scratch"):
        assert results[m].losses[-1] < results[m].losses[0], (m, results[m].losses[:3], results[m].losses[-3:])
        assert math.isfinite(results[m].metrics[-1]["psnr"])
    assert results["classical"].losses == [] and len(results["classical"].metrics) == 1
    assert torch.allclose(results["classical"].image, classical_reconstruction(y, acq.operator(), modality))
    # scratch starts from a fresh seeded initialisation, not from the pretrained weights
    again = fit(net, y, acq.operator(), modality, "scratch", acq.image_shape, iterations=3, learning_rate=2e-2)
    assert again.losses == fit(net, y, acq.operator(), modality, "scratch", acq.image_shape, iterations=3,
                               learning_rate=2e-2).losses
    assert again.losses[0] != fit(net, y, acq.operator(), modality, "finetune", acq.image_shape,
                                  iterations=3, learning_rate=2e-2).losses[0]


def test_image_metrics_pet_is_scale_free_and_psnr_drops_with_noise():
    truth = _blob(2)[None, None]
    noisy = truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    assert image_metrics(noisy, truth, "ct")["psnr"] > image_metrics(truth * 0.5, truth, "ct")["psnr"] - 100
    assert abs(image_metrics(3 * noisy, truth, "pet")["psnr"] - image_metrics(noisy, truth, "pet")["psnr"]) < 1e-3
    assert image_metrics(noisy, truth, "mri")["psnr"] > image_metrics(noisy * 1.5, truth, "mri")["psnr"]
    assert 0 < image_metrics(noisy, truth, "mri")["ssim"] < 1


def test_subject_selection_and_bad_settings_are_one_line():
    items = [{"image": f"{i}.nii"} for i in range(10)]
    three = select_subjects(items, 0.3, seed=1)
    assert len(three) == 3 and three == select_subjects(items, 0.3, seed=1) and three != select_subjects(items, 0.3, 2)
    one_line_error(lambda: select_subjects(items, 0.0), "train_fraction", error=MeduetConfigError)
    one_line_error(lambda: training_acquisition("xray", 8), "modality", error=MeduetConfigError)
    one_line_error(lambda: training_acquisition("mri", 8, acceleration=0.5), "acceleration", error=MeduetConfigError)
    net, acq = _pretrained("ct")
    y = simulate(_blob(1), acq)
    one_line_error(lambda: fit(net, y, acq.operator(), "ct", "ddpm", acq.image_shape), "method",
                   error=MeduetConfigError)
    one_line_error(lambda: fit(None, y, acq.operator(), "ct", "disinr", acq.image_shape), "ckpt_path",
                   error=MeduetConfigError)


def test_disinr_fits_its_subject_grid_at_the_subject_learning_rate_and_the_other_methods_ignore_it():
    net, acq = _pretrained("mri")
    truth = _blob(4)[None, None]
    y = simulate(truth, acq)

    def run(method, lr, subject_lr):
        return fit(net, y, acq.operator(), "mri", method, acq.image_shape, iterations=6, learning_rate=lr,
                   subject_learning_rate=subject_lr).image

    # disinr at (0.01, subject 0.1) is disinr at 0.1; None falls back to learning_rate
    assert torch.equal(run("disinr", 1e-2, 1e-1), run("disinr", 1e-1, None))
    assert not torch.equal(run("disinr", 1e-2, 1e-1), run("disinr", 1e-2, None))
    for method in ("scratch", "finetune"):  # whole INRs keep learning_rate
        assert torch.equal(run(method, 1e-2, 1e-1), run(method, 1e-2, None))
