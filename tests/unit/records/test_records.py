"""meduet.records: the checkpoint record's format, checks, and rebuilding every kind of network from its file alone."""

from __future__ import annotations

import json

import pytest
import torch

from meduet import records
from meduet.errors import MeduetConfigError
from meduet.networks.dit import build_dit
from meduet.networks.encoder import PretrainedEncoder
from meduet.networks.factor_prior import FactorPrior
from meduet.networks.mae import build_mae
from meduet.networks.meduet import MEDUET_PRESETS, build_meduet
from meduet.networks.seg import MeduetSegNet, UNetSeg
from meduet.networks.vae import MAISI_CT_ARCHITECTURE, build_vae

TINY_VAE = dict(MAISI_CT_ARCHITECTURE, num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], norm_num_groups=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights (zero-initialised layers would hide a failed copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1))


def _networks():
    torch.manual_seed(0)
    vit = dict(MEDUET_PRESETS["tiny"])
    return {
        "vae": (build_vae(TINY_VAE), lambda n: n.decode(n.encode_mean(_x(1, 1, 16, 16, 16)))),
        "meduet": (build_meduet("tiny", num_domains=3), lambda n: n.encode(_x(1, 4, 8, 8, 8))["content"]),
        "mae": (build_mae("tiny"), lambda n: n.encode(_x(1, 4, 8, 8, 8))["content"]),
        "dit": (build_dit("tiny"), lambda n: n(_x(1, 4, 8, 8, 8), torch.tensor([3]))),
        "factor_prior": (FactorPrior(6, 2, num_domains=2, hidden=16, depth=1),
                         lambda n: n(_x(2, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))),
        "meduet_seg": (MeduetSegNet(TINY_VAE, vit, out_channels=3, feature_size=4),
                       lambda n: n(_x(1, 1, 16, 16, 16))),
        "unet": (UNetSeg(out_channels=3, feature_size=4), lambda n: n(_x(1, 1, 32, 32, 32))),
    }


@pytest.mark.parametrize("name", ["vae", "meduet", "mae", "dit", "factor_prior", "meduet_seg", "unet"])
def test_load_rebuilds_every_kind_from_its_file(name, tmp_path):
    net, run = _networks()[name]
    net = _perturbed(net)
    net.meta = {**net.meta, "domains": ["a", "b"], "note": name}
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    again = records.load(path)
    assert type(again) is type(net) and not again.training
    assert again.meta["note"] == name and again.meta["domains"] == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(run(again), run(net), rtol=0, atol=0)
    # the file's kind is what read() reports, and asking for another kind is one line naming both
    _, rec = records.read(path)
    other = "dit" if rec["kind"] != "dit" else "vae"
    with pytest.raises(MeduetConfigError, match=f"holds a '{rec['kind']}' network") as err:
        records.load(path, expect=other)
    assert "\n" not in str(err.value) and records.KIND_BUNDLE[other] in str(err.value)


def test_record_bytes_round_trip_and_limit():
    rec = {"kind": "dit", "architecture": {"dim": 32, "input_size": [8, 8, 8]}, "domains": ["s0"]}
    buf = records.encode(rec)
    assert buf.dtype == torch.uint8 and buf.numel() == records.RECORD_BYTES
    assert records.decode(buf) == rec and records.decode(None) == {} and records.decode(torch.zeros(4)) == {}
    with pytest.raises(ValueError, match="more than"):
        records.encode({"x": "y" * records.RECORD_BYTES})


def test_vae_record_without_kind_is_read_as_a_vae(tmp_path):
    """VAE files written before the record stored its kind (architecture + downsample_factor) still load."""
    vae = _perturbed(build_vae(TINY_VAE))
    state = vae.state_dict()
    old = records.decode(state["_extra_state"])
    old.pop("kind")
    state["_extra_state"] = records.encode(old)
    torch.save(state, tmp_path / "old.pt")
    again = records.load(tmp_path / "old.pt", expect="vae")
    assert records.kind_of(old) == "vae" and again.architecture == vae.architecture


def test_arch_check_ignores_only_non_weight_arguments():
    net = build_meduet("tiny", num_domains=3)
    state = net.state_dict()
    build_meduet("tiny", num_domains=3, input_size=16, dropout_rate=0.1).load_state_dict(state)  # same weights
    with pytest.raises(MeduetConfigError, match=r"another 'meduet' architecture \{'num_domains': \(3, 4\)\}"):
        build_meduet("tiny", num_domains=4).load_state_dict(state, strict=False)
    assert records.arch_diff({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5, "d": 4}}, ignore=("d",)) == {
        "b.c": (2, 5)}


def test_missing_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(MeduetConfigError) as err:
        records.load(tmp_path / "missing.pt", expect="dit")
    msg = str(err.value)
    assert "does not exist; train meduet_diffusion first" in msg and "\n" not in msg and "bundles/" not in msg
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(MeduetConfigError, match="has no checkpoint record"):
        records.load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MeduetConfigError, match="cannot be loaded safely .it is not a file written by torch.save"):
        records.read(tmp_path / "junk.pt", expect="vae")
    torch.save({"weight": torch.zeros(2), "step": torch.optim.SGD([torch.zeros(1)], lr=0.1)}, tmp_path / "obj.pt")
    with pytest.raises(MeduetConfigError, match="holds Python objects other than tensors"):
        records.read(tmp_path / "obj.pt", expect="vae")
    with pytest.raises(MeduetConfigError, match="does not exist; train meduet_vae first"):
        records.require(tmp_path / "missing.pt", "meduet_vae")
    # another bundle's model.pt given as this bundle's weights (--ckpt_path): named, before anything is built
    torch.save(build_vae(TINY_VAE).state_dict(), tmp_path / "vae.pt")
    assert records.require(tmp_path / "vae.pt", "meduet_vae") == str(tmp_path / "vae.pt")
    with pytest.raises(MeduetConfigError) as err:
        records.require(tmp_path / "vae.pt", "meduet_seg")
    msg = str(err.value)
    assert f"'{tmp_path / 'vae.pt'}' holds a 'vae' network (a meduet_vae checkpoint), not a meduet_seg one" in msg
    assert "\n" not in msg


def test_load_part_takes_the_encoder_of_a_pretraining_file(tmp_path):
    net = _perturbed(build_meduet("tiny", num_domains=3))
    net.meta = {"latent_scale_factor": 0.5}
    torch.save(net.state_dict(), tmp_path / "model.pt")
    enc = records.load_part(tmp_path / "model.pt", PretrainedEncoder)
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x)["content"], net.encode(x)["content"], rtol=0, atol=0)
    assert enc.kind == "meduet_encoder" and enc.objective == "meduet" and enc.meta["latent_scale_factor"] == 0.5
    # the encoder's own file (what meduet_pretrain's model.pt holds) loads strictly, by load and by load_part
    torch.save(records.part_of(net, PretrainedEncoder).state_dict(), tmp_path / "encoder.pt")
    for again in (records.load(tmp_path / "encoder.pt"), records.load_part(tmp_path / "encoder.pt", PretrainedEncoder)):
        assert type(again) is PretrainedEncoder and again.meta["latent_scale_factor"] == 0.5
        with torch.no_grad():
            torch.testing.assert_close(again.encode(x)["content"], net.encode(x)["content"], rtol=0, atol=0)
    # a file without the encoder's weights is refused (an absent site eraser is allowed: it loads as identity)
    state = {k: v for k, v in net.state_dict().items() if ".eraser." not in k}
    torch.save(state, tmp_path / "no_eraser.pt")
    records.load_part(tmp_path / "no_eraser.pt", PretrainedEncoder)
    torch.save({k: v for k, v in state.items() if "blocks.0" not in k}, tmp_path / "partial.pt")
    with pytest.raises(MeduetConfigError, match="lacks .* weights of PretrainedEncoder"):
        records.load_part(tmp_path / "partial.pt", PretrainedEncoder)
    with pytest.raises(MeduetConfigError, match="not 'meduet_encoder' or 'mae_encoder' or 'meduet' or 'mae'"):
        torch.save(build_dit("tiny").state_dict(), tmp_path / "dit.pt")
        records.load_part(tmp_path / "dit.pt", PretrainedEncoder)


def test_load_weights_keeps_the_networks_record_and_refuses_other_shapes(tmp_path):
    src = _perturbed(build_vae(TINY_VAE))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items() if k != "_extra_state"}},
               tmp_path / "plain.pt")
    dst = build_vae(TINY_VAE)
    dst.meta["note"] = "mine"
    records.load_weights(dst, tmp_path / "plain.pt")
    assert dst.meta["note"] == "mine"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items() if k != "_extra_state")
    assert records.load_weights(dst, None) is dst
    with pytest.raises(MeduetConfigError, match="do not fit the configured architecture"):
        records.load_weights(build_vae(dict(TINY_VAE, latent_channels=8)), tmp_path / "plain.pt")
    # another bundle's model.pt as these weights: named by what it holds, not by a list of keys
    torch.save(build_dit("tiny").state_dict(), tmp_path / "dit.pt")
    with pytest.raises(MeduetConfigError, match="holds a 'dit' network .a meduet_diffusion checkpoint., not 'vae'"):
        records.load_weights(build_vae(TINY_VAE), tmp_path / "dit.pt", "pretrained VAE weights")


def test_with_meta_stores_json(tmp_path):
    net = records.with_meta(build_dit("tiny"), {"crop_size": (8, 8, 8), "scale": 0.5})
    assert net.meta == {"crop_size": [8, 8, 8], "scale": 0.5}
    assert json.loads(json.dumps(records.decode(net.get_extra_state())))["crop_size"] == [8, 8, 8]


def test_rebuilding_a_stored_network_leaves_the_random_state_alone(tmp_path):
    """Loading (or cutting the encoder out of) a network must not shift the random numbers of what runs next: a
    downstream stage's initialisation then does not depend on how big the upstream network is."""
    net = build_meduet("tiny", num_domains=3)
    net.meta = {"latent_scale_factor": 0.5}
    torch.save(net.state_dict(), tmp_path / "model.pt")
    for step in (lambda: records.load(tmp_path / "model.pt"),
                 lambda: records.load_part(tmp_path / "model.pt", PretrainedEncoder),
                 lambda: records.part_of(net, PretrainedEncoder)):
        torch.manual_seed(7)
        step()
        after = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(after, torch.rand(3))


def test_a_killed_runs_model_pt_is_refused_until_the_run_finishes(tmp_path):
    """The training checkpointer writes model.pt every epoch; only the run's end marks it complete, and every
    loader refuses an incomplete one with one line (resume to finish, or --max_epochs <epoch> to keep it)."""
    from ignite.engine import Engine, Events

    from meduet.engines.checkpoint import TrainingCheckpointer

    net = build_dit("tiny")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        net(_x(1, 4, 8, 8, 8), torch.tensor([3])).square().mean().backward()
        opt.step()

    def engine_with_checkpointer():
        engine = Engine(step)
        TrainingCheckpointer(tmp_path, {"model": net, "optimizer": opt}).attach(engine)
        return engine

    class Killed(RuntimeError):
        pass

    killed = engine_with_checkpointer()

    @killed.on(Events.EPOCH_COMPLETED(once=2))
    def _kill(engine):  # after the checkpointer's save of epoch 2 (attached first)
        raise Killed

    with pytest.raises(Killed):
        killed.run([0, 1], max_epochs=3)
    model = tmp_path / "model.pt"
    assert records.read_state_dict(model, "model", "")  # the file is whole (atomic write) ...
    with pytest.raises(MeduetConfigError, match=r"did not finish \(saved after epoch 2 of 3\).*--max_epochs 2") as err:
        records.load(model)  # ... but it is not a trained model
    assert "\n" not in str(err.value)
    with pytest.raises(MeduetConfigError, match="did not finish"):
        records.require(model, "meduet_diffusion")
    # keep it as it is: resume with max_epochs = the epoch reached; the run completes at once and says so
    engine_with_checkpointer().run([0, 1], max_epochs=2)
    assert records.load(model).meta["training"] == {"epoch": 2, "max_epochs": 2, "complete": True}
    # or finish it: resume to the configured end
    engine_with_checkpointer().run([0, 1], max_epochs=3)
    assert records.read(model)[1]["training"] == {"epoch": 3, "max_epochs": 3, "complete": True}
    assert records.require(model, "meduet_diffusion") == str(model)
