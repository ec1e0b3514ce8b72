"""meduet.deploy.export: TorchScript / ONNX exports of the deterministic wrappers match PyTorch on the trained tiny
bundles, carry their metadata, and fail with one line when the checkpoint is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meduet.deploy.export import export, main, max_abs_diff, run_onnx
from meduet.deploy.wrappers import WHATS, build_wrapper
from meduet.errors import MeduetConfigError, find_meduet_error

REPO = Path(__file__).resolve().parents[3]

# (export shape, a test input of another batch size; for the VAE also another spatial size)
SHAPES = {
    "vae_encode": ((1, 1, 16, 16, 16), (2, 1, 24, 24, 24)),
    "vae_decode": ((1, 4, 4, 4, 4), (2, 4, 6, 6, 6)),
    "seg": (None, None),      # the record's roi_size (32^3), batch 2
    "encoder": (None, None),  # the pretraining crop (4 x 8^3), batch 2
}
FIXTURE = {"vae_encode": "tiny_vae", "vae_decode": "tiny_vae", "seg": "seg_trained", "encoder": "tiny_pretrain"}
TOL = {"torchscript": 1e-5, "onnx": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _test_input(what: str, built) -> torch.Tensor:
    shape = SHAPES[what][1] or (2, *built.shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("what", WHATS)
def test_parity(what, fmt, request, tmp_path):
    bundle = request.getfixturevalue(FIXTURE[what])
    out = tmp_path / f"{what}.{fmt}"
    res = export(bundle, what, fmt, out=out, shape=SHAPES[what][0], verify=False)
    assert res.path == out and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p != out], "temporary files left behind"
    # reference: the wrapper rebuilt independently from the same checkpoint
    ref_net = build_wrapper(what, bundle / "models/model.pt").module
    x = _test_input(what, build_wrapper(what, bundle / "models/model.pt", SHAPES[what][0]))
    with torch.no_grad():
        ref = _outputs(ref_net(x))
        if fmt == "torchscript":
            got = _outputs(torch.jit.load(str(out), map_location="cpu")(x))
        else:
            got = run_onnx(out, x)
    assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
    diff = max_abs_diff(ref, got)
    assert diff <= TOL[fmt], f"{what} {fmt}: max abs diff {diff:.3g} > {TOL[fmt]:g} on input {list(x.shape)}"
    assert all(r.abs().max() > 0 for r in ref)  # not a degenerate all-zero output
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(out), load_external_data=False)
        assert model.opset_import[0].version >= 17
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["meduet_export"])["what"] == what


def test_encoder_wrapper_matches_encode_latents(tiny_pretrain):
    """The pooled factors of the ``encoder`` wrapper are those ``encode_latents`` (extract.yaml) computes for a
    latent of one pretraining crop."""
    from meduet import records
    from meduet.latent import LatentSpace
    from meduet.networks.encoder import PretrainedEncoder
    from meduet.networks.windows import encode_latents

    ckpt = tiny_pretrain / "models/model.pt"
    built = build_wrapper("encoder", ckpt)
    z = torch.randn(built.shape[1:], generator=torch.Generator().manual_seed(2))
    enc = records.load_part(ckpt, PretrainedEncoder)
    (row,) = encode_latents(enc, [z], LatentSpace.from_record(built.record))
    with torch.no_grad():
        content, style = built.module(z[None])
    assert torch.allclose(content[0], row["content"], atol=1e-5)
    assert torch.allclose(style[0], row["style"], atol=1e-5)


@pytest.mark.parametrize("what", ["encoder", "vae_decode"])
def test_onnx_dynamo_exporter(what, request, tmp_path):
    """The torch.export-based ONNX exporter also works (the legacy one is the default): on the encoder (SDPA
    attention, grouped conv3d) and the VAE decoder (GroupNorm, conv3d, trilinear upsampling, dynamic spatial axes),
    the two smallest wrappers that cover those operators."""
    bundle = request.getfixturevalue(FIXTURE[what])
    out = tmp_path / f"{what}.onnx"
    res = export(bundle, what, "onnx", out=out, shape=SHAPES[what][0], exporter="dynamo")
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4, f"max abs diff {res.max_abs_diff:.3g}"
    built = build_wrapper(what, bundle / "models/model.pt", SHAPES[what][0])
    x = torch.randn(SHAPES[what][1] or (3, *built.shape[1:]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = max_abs_diff(_outputs(built.module(x)), run_onnx(out, x))
    assert diff <= 1e-4, f"dynamo ONNX {what}, input {list(x.shape)}: max abs diff {diff:.3g}"


def test_roi_option_and_bad_sizes(tiny_pretrain, tmp_path, capsys):
    """``--roi`` sets the export's spatial size (batch 1, the checkpoint's channels); a size the wrapper cannot
    take is one line, exit code 2, and no file."""
    import onnx

    out = tmp_path / "encoder.onnx"
    assert main(["--bundle", str(tiny_pretrain), "--what", "encoder", "--format", "onnx", "--roi", "8", "8", "12",
                 "--out", str(out)]) == 0
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, 8, 8, 12]
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    assert main(["--bundle", str(tiny_pretrain), "--what", "encoder", "--format", "onnx", "--roi", "7",
                 "--out", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    patch = build_wrapper("encoder", tiny_pretrain / "models/model.pt").module.encoder.patch_size
    assert len(lines) == 1 and f"multiples of {patch}" in lines[0] and "[7, 7, 7]" in lines[0], lines
    with pytest.raises(MeduetConfigError, match="input channels"):
        build_wrapper("encoder", tiny_pretrain / "models/model.pt", shape=(1, 3, 8, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]


def test_torchscript_metadata_and_bundle_load(tiny_vae, tmp_path):
    """Default output path inside a bundle; the file loads with MONAI's load_net_with_metadata and
    monai.bundle.load(load_ts_module=True) and carries the bundle's metadata.json and the export record."""
    from monai.bundle import load
    from monai.data import load_net_with_metadata

    bundle = tmp_path / "meduet_vae"
    (bundle / "models").mkdir(parents=True)
    shutil.copytree(REPO / "bundles/meduet_vae/configs", bundle / "configs")
    shutil.copy(tiny_vae / "models/model.pt", bundle / "models/model.pt")
    assert main(["--bundle", str(bundle), "--what", "vae_encode", "--shape", "1", "1", "16", "16", "16"]) == 0
    path = bundle / "models/vae_encode.ts"
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt", "vae_encode.ts"]

    net, meta, _ = load_net_with_metadata(str(path))
    bundle_meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    assert meta["network_data_format"] == bundle_meta["network_data_format"]
    rec = meta["meduet_export"]
    assert rec["what"] == "vae_encode" and rec["format"] == "torchscript"
    assert rec["inputs"]["image"]["shape"] == [1, 1, 16, 16, 16]
    assert rec["outputs"]["latent"]["shape"] == [1, 4, 4, 4, 4]
    assert rec["checkpoint_record"]["latent_scale_factor"] > 0
    assert rec["checkpoint_record"]["architecture"]["latent_channels"] == 4
    from meduet.deploy.integrity import sha256_file

    assert rec["source_sha256"] == sha256_file(bundle / "models/model.pt")

    net2, meta2, _ = load("meduet_vae", bundle_dir=str(tmp_path), model_file="models/vae_encode.ts",
                          load_ts_module=True, device="cpu")
    assert meta2["meduet_export"]["source_sha256"] == rec["source_sha256"]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))


@pytest.mark.parametrize("what", WHATS)
def test_missing_checkpoint_is_one_line(what, tmp_path, capsys):
    with pytest.raises(MeduetConfigError) as err:
        export(tmp_path, what, "onnx")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "models/model.pt") in msg and "first" in msg
    assert not list(tmp_path.rglob("*.onnx"))
    # the CLI prints just that line and exits 2
    assert main(["--bundle", str(tmp_path), "--what", what, "--format", "torchscript"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("MeduetConfigError: ")


def test_monai_ckpt_export_does_not_fit(tiny_vae, tmp_path):
    """Why export.py does not call MONAI's ckpt_export: with the bundle's config the network is built from the
    config, not from the checkpoint's record, and the tiny checkpoint is refused (see the module docstring)."""
    from monai.bundle import ckpt_export

    cfg = REPO / "bundles/meduet_vae/configs"
    out = tmp_path / "model.ts"
    with pytest.raises(Exception) as err:
        ckpt_export(net_id="network_def", filepath=str(out), ckpt_file=str(tiny_vae / "models/model.pt"),
                    config_file=str(cfg / "inference.json"), meta_file=str(cfg / "metadata.json"),
                    bundle_root=str(tmp_path), use_trace=True, input_shape=[1, 1, 16, 16, 16])
    found = find_meduet_error(err.value)
    assert found is not None and "another 'vae' architecture" in str(found)
    assert not out.exists()


def test_mae_baseline_encoder_exports_content_only(tiny_pretrain, tmp_path):
    ckpt = tiny_pretrain / "models/baseline_mae/model.pt"
    out = tmp_path / "mae_encoder.onnx"
    res = export(tiny_pretrain, "encoder", "onnx", out=out, ckpt=ckpt)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4, f"max abs diff {res.max_abs_diff:.3g}"
    import onnx

    assert [o.name for o in onnx.load(str(out)).graph.output] == ["content"]
