"""Learning-rate schedules chosen by name in the bundle configs."""

from __future__ import annotations

import pytest
import torch

from meduet.engines.schedules import build_lr_schedule, warmup_cosine_schedule
from meduet.errors import MeduetConfigError


def _opt() -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_constant_is_no_scheduler_and_warmup_cosine_rises_then_falls_to_zero():
    assert build_lr_schedule(_opt(), "constant", 5, 100) is None
    opt = _opt()
    sched = build_lr_schedule(opt, "warmup_cosine", 4, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically after the warm-up
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 at the last iteration
    assert lrs[12] == pytest.approx(5e-4)  # half-way through the cosine: half the rate


def test_an_unknown_schedule_is_a_one_line_config_error():
    with pytest.raises(MeduetConfigError, match="lr_schedule 'linear' is not one of constant, warmup_cosine"):
        build_lr_schedule(_opt(), "linear", 0, 10)


def test_a_string_epoch_count_is_one_line_at_the_schedule():
    """``--max_epochs abc`` reaches the schedule first (as 'abc' * iterations per epoch): one line naming the keys."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    for build in (lambda t: build_lr_schedule(opt, "warmup_cosine", 2, t), lambda t: warmup_cosine_schedule(opt, 2, t)):
        with pytest.raises(MeduetConfigError, match="total iterations must be a non-negative integer, got 'abcabc"):
            build("abc" * 7)
    with pytest.raises(MeduetConfigError, match="warm-up must be a non-negative integer"):
        warmup_cosine_schedule(opt, 1.5, 10)
