"""meduet.io: atomic writes, and a failed run's outputs removed (a bad second item leaves nothing behind)."""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Engine

from meduet.engines.handlers import OneLineErrors
from meduet.errors import MeduetInputError
from meduet.io import atomic_path, folder_state, outputs_removed_on_error, removes_partial_outputs, write_json


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and os.listdir(tmp_path) == ["a.json"]


def test_a_failed_block_removes_what_it_wrote_and_keeps_what_was_there(tmp_path):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "old.txt").write_text("from an earlier run")
    (out / "overwritten.txt").write_text("old")
    before = folder_state(out)
    with pytest.raises(MeduetInputError), outputs_removed_on_error(out):
        (out / "cases").mkdir()
        (out / "cases" / "case0.nii.gz").write_bytes(b"first item's output")
        os.utime(out / "overwritten.txt", ns=(1, 1))  # rewritten by this run
        raise MeduetInputError("item 2: bad")
    assert sorted(folder_state(out)) == [".", "keep", "keep/old.txt"]
    assert folder_state(out)["keep/old.txt"] == before["keep/old.txt"]
    # a folder the run created is removed with its files; a successful block keeps everything
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyError), outputs_removed_on_error(fresh):
        (fresh / "x").mkdir(parents=True)
        (fresh / "x" / "y.txt").write_text("y")
        raise KeyError("z")
    assert not fresh.exists()
    with outputs_removed_on_error(fresh):
        (fresh / "ok.txt").parent.mkdir()
        (fresh / "ok.txt").write_text("ok")
    assert (fresh / "ok.txt").read_text() == "ok"


def test_a_workflow_run_decorated_removes_its_partial_outputs(tmp_path):
    class Cfg:
        output_dir = str(tmp_path / "eval")

    @removes_partial_outputs
    def run(cfg, fail_at):
        for i in range(3):
            if i == fail_at:
                raise MeduetInputError(f"case{i}.nii.gz: image is constant")
            write_json(os.path.join(cfg.output_dir, f"case{i}.json"), {"i": i})
        write_json(os.path.join(cfg.output_dir, "metrics.json"), {"n": 3})
        return 3

    with pytest.raises(MeduetInputError):
        run(Cfg(), 1)
    assert not (tmp_path / "eval").exists()
    assert run(Cfg(), -1) == 3 and len(os.listdir(tmp_path / "eval")) == 4


def test_one_line_errors_handler_removes_an_evaluators_partial_outputs(tmp_path):
    out = tmp_path / "inference"

    def step(engine, batch):
        if batch == 1:
            raise MeduetInputError("second.nii.gz: image contains 1 NaN")
        torch.save({"pred": torch.zeros(2)}, out / f"case{batch}.pt")

    out.mkdir()
    (out / "earlier.pt").write_bytes(b"kept")
    engine = Engine(step)
    OneLineErrors(output_dir=str(out)).attach(engine)
    with pytest.raises(MeduetInputError):
        engine.run([0, 1, 2])
    assert os.listdir(out) == ["earlier.pt"]
    engine = Engine(step)
    OneLineErrors(output_dir=str(out)).attach(engine)
    engine.run([0, 2])
    assert sorted(os.listdir(out)) == ["case0.pt", "case2.pt", "earlier.pt"]
