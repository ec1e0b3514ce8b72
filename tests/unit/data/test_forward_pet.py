"""Tests for meduet.data.forward.pet: Poisson counts, the exact adjoint of the PET model and MLEM."""

from __future__ import annotations

import torch

from meduet.data.forward import ParallelBeamCT, PETForward, mlem, poisson_log_likelihood, simulate_counts
from conftest import one_line_error
from meduet.errors import MeduetInputError

N = 32


def _activity(dtype=torch.float64) -> torch.Tensor:
    """(1, 1, N, N, 2): a warm ellipse with a hot disk; the second slice is the first one scaled by 0.5."""
    c = torch.arange(N, dtype=dtype) - (N - 1) / 2
    x, y = torch.meshgrid(c, c, indexing="ij")
    img = ((x / 12) ** 2 + (y / 9) ** 2 <= 1).to(dtype) + 2 * ((x - 3) ** 2 + (y + 2) ** 2 <= 9).to(dtype)
    return torch.stack([img, 0.5 * img], dim=-1)[None, None]


def _one_line_error(fn, *words: str) -> str:
    return one_line_error(fn, *words, error=MeduetInputError)


def test_pet_model_is_the_parallel_beam_projector_with_exact_adjoint():
    pet = PETForward((24, 20), 9)
    assert isinstance(pet, ParallelBeamCT)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 24, 20, 6, generator=gen)
    y = torch.rand(2, 1, 9, pet.num_detectors, 6, generator=gen)
    lhs, rhs = (pet(x) * y).sum(), (x * pet.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    sens = pet.sensitivity()
    assert sens.shape == (1, 1, 24, 20, 1) and (sens > 0).all()


def test_simulate_counts_poisson_integers_at_the_count_level():
    pet = PETForward(N, 60)
    img = _activity()
    counts = simulate_counts(img, pet, 1e5, seed=3)
    assert counts.shape == (1, 1, 60, pet.num_detectors, 2) and counts.dtype == img.dtype
    assert (counts >= 0).all() and torch.equal(counts, counts.round())
    assert abs(counts.sum().item() - 1e5) < 5 * 1e5 ** 0.5  # Poisson spread ~316
    assert torch.equal(counts, simulate_counts(img, pet, 1e5, seed=3))
    assert not torch.equal(counts, simulate_counts(img, pet, 1e5, seed=4))
    # counts sit where the activity projects: none on lines that miss it
    assert (counts[pet(img) == 0] == 0).all()
    # per batch item: each item gets the count level
    two = simulate_counts(torch.cat([img, 3 * img]), pet, 2e4, seed=0)
    assert all(abs(s - 2e4) < 5 * 2e4 ** 0.5 for s in two.flatten(1).sum(1).tolist())


def test_mlem_monotone_likelihood_non_negative_and_better_than_back_projection():
    pet = PETForward(N, 60)
    img = _activity()
    counts = simulate_counts(img, pet, 1e5, seed=3)
    scale = (1e5 / pet(img).flatten(1).sum(1)).item()  # MLEM estimates scale * img
    likelihoods, errors = [], []
    for it in (0, 1, 2, 5, 10):
        rec = mlem(counts, pet, it)
        assert rec.shape == img.shape and (rec >= 0).all()
        likelihoods.append(poisson_log_likelihood(counts, pet, rec).item())
        errors.append(((rec / scale - img).norm() / img.norm()).item())
    # measured: log-likelihood 231391 -> 249223 -> 261122 -> 272657 -> 274983; error 0.86 -> 0.21 at 10 iterations
    assert all(b > a for a, b in zip(likelihoods, likelihoods[1:])), likelihoods
    bp = pet.adjoint(counts)
    best_bp = (bp * (bp * img).sum() / (bp * bp).sum() - img).norm() / img.norm()  # its best scaling: 0.62
    assert errors[-1] < 0.3 < best_bp.item()
    # a given start image is used
    start = torch.full_like(img, 0.1)
    assert torch.equal(mlem(counts, pet, 0, init=start), start)
    # float32 counts work too
    assert mlem(counts.float(), pet, 3).dtype == torch.float32


def test_errors_one_line():
    pet = PETForward(N, 12)
    img = _activity()
    counts = simulate_counts(img, pet, 1e4)
    negative = counts.clone()
    negative[0, 0, 3, 10, 0] = -1
    _one_line_error(lambda: mlem(negative, pet, 5), "counts", "negative")
    nan = counts.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    _one_line_error(lambda: mlem(nan, pet, 5), "NaN/Inf")
    _one_line_error(lambda: mlem(counts[:, :, :6], pet, 5), "counts", "num_angles=12")
    _one_line_error(lambda: mlem(counts, pet, -1), "iterations")
    _one_line_error(lambda: mlem(counts, pet, 2, init=-img), "MLEM init", "negative")
    _one_line_error(lambda: simulate_counts(-img, pet, 1e4), "negative")
    _one_line_error(lambda: simulate_counts(img.to(torch.complex128), pet, 1e4), "complex")
    _one_line_error(lambda: simulate_counts(img, pet, 0), "total_counts")
    _one_line_error(lambda: simulate_counts(torch.zeros_like(img), pet, 1e4), "all zero")
    _one_line_error(lambda: pet(img[..., 0]), "shape")
