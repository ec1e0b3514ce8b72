"""meduet.engines.pretrain: the pretraining loop on real (tiny) models and random latents."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from meduet.engines.checkpoint import TrainingCheckpointer, load_checkpoint
from meduet.engines.ema import EMATeacher
from meduet.engines.pretrain import PretrainTrainer
from meduet.latent import LatentSpace
from meduet.engines.schedules import warmup_cosine_schedule
from meduet.networks.mae import build_mae
from meduet.networks.meduet import build_meduet

pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(n: int = 8, domains: int = 3, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = [{"latent": torch.randn(4, 8, 8, 8, generator=g) + (i % domains), "domain_index": i % domains}
             for i in range(n)]
    return DataLoader(items, batch_size=batch, shuffle=False)


def _meduet_trainer(max_epochs: int, handlers=()):
    torch.manual_seed(0)
    net = build_meduet("tiny", num_domains=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    loader = _loader()
    sched = warmup_cosine_schedule(opt, warmup_steps=2, total_steps=max_epochs * len(loader))
    teacher = EMATeacher(net)
    trainer = PretrainTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=opt,
        objective="meduet", loss_config={"mftd_start_step": 2}, teacher=teacher, latent_space=LatentSpace(0.5),
        lr_scheduler=sched, train_handlers=list(handlers))
    return trainer, net, teacher, opt, sched


def test_meduet_loop_runs_all_terms_and_moves_the_teacher():
    trainer, net, teacher, _, _ = _meduet_trainer(max_epochs=2)
    before = [p.detach().clone() for p in teacher.parameters()]
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(dict(e.state.output["losses"])))
    trainer.run()
    assert len(seen) == 4
    assert seen[0].get("mftd", 0.0) == 0.0 and seen[-1]["mftd"] > 0  # switched on at step 2
    assert all(k in seen[-1] for k in ("rec", "domain_content", "domain_style", "siqc"))
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in seen)
    assert seen[0]["lr"] < seen[1]["lr"]  # warm-up
    assert 0.997 <= seen[-1]["teacher_momentum"] <= 0.9997
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_checkpoint_resume_restores_teacher_and_step(tmp_path):
    trainer, net, teacher, opt, sched = _meduet_trainer(max_epochs=1)
    saver = TrainingCheckpointer(tmp_path, {"model": net, "teacher": teacher, "optimizer": opt, "lr_scheduler": sched})
    saver.attach(trainer)
    trainer.run()
    trained = {k: v.detach().clone() for k, v in teacher.state_dict()["module"].items()}
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["engine"] == {"epoch": 1, "iteration": 2}
    saved = ckpt["teacher"]["module"]
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in trained)
    trainer2, net2, teacher2, opt2, sched2 = _meduet_trainer(max_epochs=2)
    # the fresh run's teacher is the untrained student's copy: unrestored, it would differ from the saved one
    assert any(not torch.equal(v, trained[k]) for k, v in teacher2.state_dict()["module"].items())
    TrainingCheckpointer(tmp_path, {"model": net2, "teacher": teacher2, "optimizer": opt2,
                                    "lr_scheduler": sched2}).attach(trainer2)
    resumed = {}

    def _teacher_at_resume(engine):  # STARTED, after the checkpointer's resume handler (attached first)
        resumed.update(teacher2.state_dict())
        resumed["module"] = {k: v.detach().clone() for k, v in resumed["module"].items()}

    trainer2.add_event_handler(Events.STARTED, _teacher_at_resume)
    steps = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.iteration))
    trainer2.run()
    assert steps == [3, 4]  # continued, not restarted
    # the EMA teacher resumed bit-identical to the one saved at the end of epoch 1, with its momentum
    assert set(resumed["module"]) == set(trained)
    assert all(torch.equal(resumed["module"][k], trained[k]) for k in trained)
    assert resumed["momentum"] == teacher.momentum == ckpt["teacher"]["momentum"]


def test_mae_objective_and_bad_batches():
    torch.manual_seed(0)
    net = build_mae("tiny")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = PretrainTrainer(device="cpu", max_epochs=1, train_data_loader=_loader(), network=net,
                              optimizer=opt, objective="mae")
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])
    with pytest.raises(ValueError, match="EMA teacher"):
        PretrainTrainer(device="cpu", max_epochs=1, train_data_loader=_loader(), network=build_meduet("tiny"),
                        optimizer=opt, objective="meduet")
    odd, net3, *_ = _meduet_trainer(max_epochs=1)
    odd.data_loader = _loader(n=3, batch=3)
    with pytest.raises(Exception, match="even"):
        odd.run()


def test_content_eraser_is_an_option_off_unless_enabled_with_a_bool():
    from meduet.engines.pretrain import content_eraser_fit
    from meduet.errors import MeduetConfigError
    from meduet.networks.meduet import build_meduet

    net = build_meduet("tiny", num_domains=2)
    assert content_eraser_fit(net, "dl.json", {"splits": ["training"]}) is None  # off by default (not in the paper)
    assert content_eraser_fit(net, "dl.json", {"enabled": False, "splits": ["training"]}) is None
    assert content_eraser_fit(net, "dl.json", {"enabled": True, "splits": []}) is None
    assert content_eraser_fit(net, "dl.json", {"enabled": True, "splits": ["training"]}) is not None
    with pytest.raises(MeduetConfigError, match="content_eraser#enabled must be True or False"):
        content_eraser_fit(net, "dl.json", {"enabled": "false", "splits": ["training"]})


@pytest.mark.parametrize("preset", [None, "tiny", "demo", "paper"])
def test_no_preset_switches_the_eraser_on(preset):
    from pathlib import Path

    from monai.bundle import ConfigParser

    cfg = Path(__file__).resolve().parents[3] / "bundles/meduet_pretrain/configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / "train.yaml")] + ([str(cfg / "presets" / f"{preset}.yaml")] if preset else []))
    assert parser["content_eraser"]["enabled"] is False
