"""meduet.networks.inr: DisINR's coordinates -> intensity network, its shared / subject split and its record."""

from __future__ import annotations

import pytest
import torch

from conftest import one_line_error
from meduet import records
from meduet.errors import MeduetConfigError
from meduet.networks.inr import DisINR, _sample, grid_coordinates

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(shared_resolutions=(4, 8), shared_features=2, subject_resolution=4, subject_features=2, hidden=16,
            depth=2)


def _perturbed(net: DisINR, seed: int = 0) -> DisINR:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net


def test_grid_coordinates_are_voxel_centres_in_row_major_order():
    c = grid_coordinates((3, 2, 1))
    assert c.shape == (6, 3)
    assert torch.equal(c[0], torch.tensor([-1.0, -1.0, 0.0])) and torch.equal(c[-1], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(c.view(3, 2, 1, 3)[1, 0, 0], torch.tensor([0.0, -1.0, 0.0]))


def test_grid_reads_hit_the_nodes_on_our_axis_order():
    """A (1, 1, R1, R2, R3) grid read at the voxel centres of (R1, R2, R3) gives the grid itself (no axis swap),
    and half-way between two nodes along S3 their mean (trilinear)."""
    grid = torch.arange(3 * 4 * 5, dtype=torch.float32).view(1, 1, 3, 4, 5)
    vals = _sample(grid, grid_coordinates((3, 4, 5)))
    assert torch.allclose(vals.view(3, 4, 5), grid[0, 0])
    mid = torch.tensor([[-1.0, -1.0, -0.75]])  # between S3 nodes 0 (-1) and 1 (-0.5)
    assert torch.allclose(_sample(grid, mid).flatten(), torch.tensor([0.5]))


def test_points_grid_layout_render_and_chunks_agree():
    net = _perturbed(DisINR(**TINY, num_subjects=3))
    shape = (5, 4, 3)
    coords = grid_coordinates(shape)
    pts = net(coords, subject=2)
    assert pts.shape == (60, 1)
    layout = net(coords.t().reshape(1, 3, *shape), subject=2)
    assert layout.shape == (1, 1, *shape) and torch.allclose(layout.flatten(), pts.flatten())
    assert torch.allclose(net.render(shape, subject=2).flatten(), pts.flatten())
    assert not torch.allclose(net(coords, subject=0), pts)  # subjects differ
    # chunked with checkpointing: same values and the same gradients
    small = _perturbed(DisINR(**TINY, num_subjects=3, chunk_size=7))
    small.load_state_dict(net.state_dict())
    grads = []
    for m in (net, small):
        m.zero_grad()
        (m.render(shape, subject=1) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(net.render(shape, 1), small.render(shape, 1), atol=1e-6)


def test_softplus_output_is_positive():
    net = _perturbed(DisINR(**TINY, output_activation="softplus"))
    assert bool((net.render((6, 6, 6)) > 0).all())


def test_split_counts_and_the_default_subject_fraction_is_about_one_percent():
    counts = DisINR().parameter_counts()
    assert counts["total"] == counts["shared_encoder"] + counts["decoder"] + counts["subject_encoder"]
    assert 0.009 < counts["subject_fraction"] < 0.011, counts
    net = DisINR(**TINY, num_subjects=4)
    ids = {id(p) for p in net.shared_parameters()} | {id(p) for p in net.subject_parameters()}
    assert ids == {id(p) for p in net.parameters()}
    assert not {id(p) for p in net.shared_parameters()} & {id(p) for p in net.subject_parameters()}
    # the subject encoder has no gradient path into the shared pair's parameters and the reverse
    net.requires_grad_(False)
    for p in net.subject_parameters():
        p.requires_grad_(True)
    net.render((4, 4, 4), 0).sum().backward()
    assert all(p.grad is None for p in net.shared_parameters())
    assert net.subject_encoder.codes.grad[1:].abs().sum() == 0 and net.subject_encoder.codes.grad[0].abs().sum() > 0


def test_single_subject_keeps_the_shared_pair_and_takes_the_mean_code(tmp_path):
    net = _perturbed(DisINR(**TINY, num_subjects=3))
    net.meta = {"modality": "ct"}
    one = net.single_subject()
    assert one.arch["num_subjects"] == 1 and one.meta == {"modality": "ct"}
    assert torch.allclose(one.subject_encoder.codes[0], net.subject_encoder.codes.mean(0))
    with torch.no_grad():
        net.subject_encoder.codes.copy_(net.subject_encoder.codes[:1].expand_as(net.subject_encoder.codes))
    assert torch.allclose(net.single_subject().render((4, 4, 4)), net.render((4, 4, 4), 2))
    # the record: records.load rebuilds it from the file alone, same values, kind "inr"
    torch.save(one.state_dict(), tmp_path / "model.pt")
    back = records.load(tmp_path / "model.pt", expect="inr")
    assert isinstance(back, DisINR) and back.meta == {"modality": "ct"}
    assert torch.allclose(back.render((5, 5, 5)), one.render((5, 5, 5)))
    assert records.KIND_BUNDLE["inr"] == "meduet_recon"


def test_reset_subject_random_is_seeded_and_leaves_the_global_random_state():
    net = DisINR(**TINY)
    state = torch.get_rng_state()
    a = net.reset_subject("random", seed=3).subject_encoder.codes.detach().clone()
    b = net.reset_subject("random", seed=3).subject_encoder.codes.detach().clone()
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, net.reset_subject("random", seed=4).subject_encoder.codes)
    kept = net.subject_encoder.codes.detach().clone()
    assert torch.equal(net.reset_subject("mean").subject_encoder.codes, kept)


def test_bad_arguments_are_one_line():
    net = DisINR(**TINY, num_subjects=2)
    one_line_error(lambda: net(torch.zeros(4, 2)), "(N, 3)", error=MeduetConfigError)
    one_line_error(lambda: net(torch.zeros(4, 3), subject=2), "num_subjects", error=MeduetConfigError)
    one_line_error(lambda: DisINR(shared_resolutions=(1, 4)), "resolutions", error=MeduetConfigError)
    one_line_error(lambda: DisINR(output_activation="relu"), "output_activation", error=MeduetConfigError)
    one_line_error(lambda: net.reset_subject("zeros"), "subject_init", error=MeduetConfigError)
