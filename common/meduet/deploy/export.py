"""Export the deterministic parts of the bundles to TorchScript and ONNX.

``python -m meduet.deploy.export --bundle <bundle_root> --what {vae_encode,vae_decode,seg,encoder}
--format {torchscript,onnx} [--out FILE] [--roi X Y Z | --shape B C X Y Z] [--ckpt FILE]`` writes
``<bundle>/models/<what>.ts`` (or ``.onnx``) atomically (temporary file in the same folder, then ``os.replace``) and
prints the largest absolute difference between the exported model and PyTorch on a random input of the export shape.

What is exported (single tensor in, tensors out, no sampling, eval mode):

* ``vae_encode`` (meduet_vae, ``meduet.records.load``): ``image (B, C_in, X, Y, Z)``, sides divisible by the VAE's
  downsampling ``f`` -> ``latent (B, c, X/f, Y/f, Z/f)``, the posterior mean ``z_mu`` (``encode_mean``), unscaled;
* ``vae_decode`` (meduet_vae, ``meduet.records.load``): ``latent (B, c, x, y, z)`` (unscaled ``z_mu``) ->
  ``image (B, C_out, f x, f y, f z)``;
* ``seg`` (meduet_seg, ``meduet.records.load``): ``image (B, 1, X, Y, Z)``, sides divisible by ``f p`` ->
  ``pred (B, classes, X, Y, Z)`` logits (frozen VAE encoder included);
* ``encoder`` (meduet_pretrain, ``meduet.records.load_part``): ``latent (B, c, x, y, z)`` (unscaled ``z_mu``, sides divisible by
  the latent patch ``p``) -> ``content (B, D)`` and ``style (B, Ds or 2 Ds)``; the masked-autoencoder baseline
  (``--ckpt models/baseline_mae/model.pt``) has ``content`` only.

The ``encoder`` wrapper mirrors ``meduet.networks.windows.encode_latents`` for one window: the latent is
scaled by the checkpoint record's latent space, encoded unmixed, and the content / smoothed style tokens
are averaged over all tokens. ``encode_latents`` additionally pads whole latents and slides windows of the
pretraining crop size over them; on a latent of exactly one crop both give the same vectors. Its default export
shape is that crop.

Shapes: the batch axis is dynamic in both formats. Spatial sizes are fixed to the export shape for ``seg`` and
``encoder`` (the ViT's sin-cos positions and token reshapes are recorded for one token grid); the VAE wrappers are
fully convolutional, their ONNX files also have dynamic spatial axes, and their TorchScript traces run at other
sizes too (tested). Pick ``--roi`` (spatial size; batch 1 and the checkpoint's channels) or ``--shape`` to match what
you will run; sizes that are not multiples of the wrapper's step (VAE downsampling for ``vae_encode``, VAE
downsampling x latent patch for ``seg``, latent patch for ``encoder``) are a one-line error.

Metadata: the TorchScript file is written with ``monai.data.save_net_with_metadata`` (read it back with
``monai.data.load_net_with_metadata`` or ``monai.bundle.load(..., load_ts_module=True, model_file=...)``); its
``metadata.json`` holds the bundle's ``configs/metadata.json`` (when the bundle root has one) plus ``meduet_export``:
the wrapper, input/output names and shapes, the source checkpoint's sha256 and its ``_extra_state`` record (latent
scale factor, preprocessing, labels, domains, ...). ONNX files carry the same JSON in ``metadata_props``
(key ``meduet_export``).

Why not ``python -m monai.bundle ckpt_export`` / ``onnx_export``: both build ``network_def`` from the bundle's
config, load ``model.pt`` into it with a strict state-dict load (ignite's ``Checkpoint.load_objects``), and export
that network's ``forward``. With our checkpoints this does not give the deterministic wrappers:

* the networks are rebuilt from the ``_extra_state`` record inside ``model.pt`` (``meduet.records.load``/
  ``load_part``), while ``network_def`` is built from the config: with the base config (paper sizes) and a
  checkpoint trained with another preset the load fails (``MeduetConfigError: checkpoint was trained with a
  different VAE architecture {...}`` from ``set_extra_state``), so the user must merge exactly the preset the
  checkpoint was trained with;
* with that preset merged, meduet_vae's ``network_def`` is ``MeduetVAE``, whose ``forward`` (MAISI's) samples
  ``z = mu + sigma * eps`` and returns ``(reconstruction, z_mu, z_sigma)``: ``ckpt_export --use_trace True`` then
  reports "Output nr 1. of the traced function does not match" (the sample differs between runs) and writes the
  sampling autoencoder, which is neither ``vae_encode`` nor ``vae_decode``;
* meduet_pretrain's ``model.pt`` is exactly its ``network_def`` (``PretrainedEncoder``), but ``torch.jit.script``
  cannot compile the latent ViT (its token grid and positions follow the input shape), and its ``forward``
  returns the factor map, not pooled factors;
* meduet_seg is the one stage where it works: ``python -m monai.bundle ckpt_export network_def --use_trace True
  --config_file "['.../inference.json','.../presets/<the training preset>.yaml']" ...`` gives the same logits as
  ``--what seg`` (checked on the tiny preset); ``--what seg`` needs no preset because it reads the record;
* MONAI writes the output file in place (a killed export leaves a truncated ``.ts``), and ``onnx_export``'s
  ``convert_to_onnx`` exports without ``dynamic_axes`` unless passed through ``converter_kwargs``.

So this module builds the wrappers from the checkpoint alone and calls ``torch.jit.trace`` and
``torch.onnx.export`` itself (the same calls MONAI's ``convert_to_torchscript(use_trace=True)`` and
``convert_to_onnx`` make), then saves with MONAI's ``save_net_with_metadata``. ``tests/test_export.py`` checks the
first failure on a trained tiny VAE.

ONNX: the legacy TorchScript-based exporter (``dynamo=False``), opset 18, dynamic batch (and spatial axes for the
VAE). With ``exporter="dynamo"`` the ``torch.export``-based exporter is used instead (``dynamic_shapes`` for the
batch, its own opset >= 18 translation); both give the same numbers here (tests). No operator of these networks
needed a workaround with either exporter (torch 2.13, opset 18, onnxruntime CPU; all four wrappers checked with both):
``Conv3d`` -> ``Conv``; ``torch.nn.GroupNorm`` (the VAE's ``fast_norm``) -> ``Reshape`` + ``InstanceNormalization`` +
``Reshape`` + ``Mul``/``Add`` (not opset 18's ``GroupNormalization``, whose scale is per group until opset 21);
MONAI's ``TransformerBlock`` attention through ``F.scaled_dot_product_attention`` -> ``MatMul`` + ``Softmax`` +
``MatMul``; the VAE decoder's trilinear upsampling -> ``Resize`` (linear, half_pixel); MAISI's asymmetric downsampling
pad -> ``Pad`` (legacy) or the ``Conv``'s ``pads`` (dynamo); ``LayerNorm`` -> ``LayerNormalization``; the style
smoothing's grouped conv3d -> ``Conv``. Largest |ONNX - PyTorch| seen on the tiny bundles: 3e-6 (on outputs of
magnitude ~3). The dynamo exporter's optimiser may log "Evaluation failed: operands could not be broadcast" while
constant-folding the style smoothing's normalising convolution: it then keeps the op unfolded and the result is
unaffected (parity tested). The dynamo exporter takes several seconds per wrapper (the legacy one well under one on
the tiny sizes), hence the default.

TorchScript itself is deprecated in torch 2.13 (``torch.jit.trace``/``save``/``load`` emit deprecation warnings); it is
still what MONAI bundles ship as ``models/*.ts`` and what ``load_net_with_metadata`` reads, so it is offered next to
ONNX, the format to prefer for new deployments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from meduet import integrity
from meduet.deploy.wrappers import WHATS, Built, build_wrapper
from meduet.errors import MeduetConfigError
from meduet.io import atomic_path

__all__ = ["FORMATS", "export", "ExportResult", "main"]
FORMATS = ("torchscript", "onnx")
EXTENSIONS = {"torchscript": ".ts", "onnx": ".onnx"}
OPSET = 18
META_KEY = "meduet_export"


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    what: str
    format: str
    shape: tuple[int, ...]
    max_abs_diff: float | None = None
    exporter: str = ""
    notes: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _outputs(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.output_names)


def _default_ckpt(bundle: str | Path) -> Path:
    return Path(bundle) / "models" / "model.pt"


def _export_record(what: str, built: Built, fmt: str, exporter: str) -> dict[str, Any]:
    module = built.module
    with torch.no_grad():
        out = module(torch.zeros(built.shape))
    outs = out if isinstance(out, tuple) else (out,)
    return {
        "what": what,
        "format": fmt,
        "exporter": exporter,
        "wrapper": type(module).__name__,
        "inputs": {module.input_names[0]: {"shape": list(built.shape), "dtype": "float32",
                                           "dynamic_axes": [0, 2, 3, 4] if built.spatial_dynamic else [0]}},
        "outputs": {n: {"shape": list(o.shape), "dtype": str(o.dtype).replace("torch.", "")}
                    for n, o in zip(_outputs(module), outs)},
        "source_checkpoint": built.ckpt.name,
        "source_sha256": _sha256(built.ckpt),
        "checkpoint_record": built.record,
        "torch": torch.__version__,
    }


def _bundle_meta(bundle: Path) -> dict[str, Any]:
    meta_file = bundle / "configs" / "metadata.json"
    if meta_file.is_file():
        try:
            return json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise MeduetConfigError(f"'{meta_file}' is not valid JSON ({e})") from None
    return {}


def _trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace=False: the wrapper is re-run and compared by `export(verify=True)` and by the tests
        return torch.jit.trace(module, example, check_trace=False)


def _save_torchscript(module: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> None:
    from monai.data import save_net_with_metadata

    ts = _trace(module, example)
    with integrity.writing(out), atomic_path(out, suffix=".ts") as tmp:  # inside a packaged bundle: the user's own
        # a name with extension: save_net_with_metadata appends ".ts" only to names without one
        save_net_with_metadata(ts, str(tmp), include_config_vals=False, append_timestamp=False, meta_values=meta)


def _save_onnx(module: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any], spatial_dynamic: bool,
               exporter: str, opset: int) -> None:
    import onnx

    in_name, out_names = module.input_names[0], list(_outputs(module))
    with integrity.writing(out), atomic_path(out, suffix=".onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            # batch always dynamic; the VAE wrappers (5D in and out, fully convolutional) also spatially
            spatial = {2: "x", 3: "y", 4: "z"} if spatial_dynamic else {}
            dynamic_axes = {in_name: {0: "batch", **spatial}}
            dynamic_axes.update({n: {0: "batch", **{k: f"out_{v}" for k, v in spatial.items()}} for n in out_names})
            torch.onnx.export(module, (example,), str(tmp), input_names=[in_name], output_names=out_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            dims: dict[int, Any] = {0: batch}
            if spatial_dynamic:
                dims.update({i: torch.export.Dim.AUTO for i in (2, 3, 4)})
            program = torch.onnx.export(module, (example,), input_names=[in_name], output_names=out_names,
                                        dynamic_shapes={in_name: dims}, opset_version=opset, dynamo=True,
                                        verbose=False)
            program.save(str(tmp))
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
        onnx.save(model, str(tmp))


def run_onnx(path: str | Path, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of an exported ONNX file on ``x`` with onnxruntime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} outputs vs {len(b)}")
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def export(bundle: str | Path, what: str, fmt: str = "torchscript", out: str | Path | None = None,
           shape: Sequence[int] | None = None, ckpt: str | Path | None = None, exporter: str = "legacy",
           opset: int = OPSET, verify: bool = True, seed: int = 0, roi: Sequence[int] | None = None) -> ExportResult:
    """Export ``what`` of the bundle at ``bundle`` (checkpoint ``ckpt`` or ``<bundle>/models/model.pt``) to
    ``out`` (default ``<bundle>/models/<what>.ts|.onnx``), traced at ``shape`` (B C X Y Z) or at the spatial size
    ``roi`` (see ``build_wrapper``). With ``verify``, the saved file is loaded and run on a random input of the
    export shape and ``max_abs_diff`` (vs the PyTorch wrapper) is filled in."""
    if fmt not in FORMATS:
        raise MeduetConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if exporter not in ("legacy", "dynamo"):
        raise MeduetConfigError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    if opset < 17:
        raise MeduetConfigError(f"opset must be >= 17, got {opset}")
    bundle = Path(bundle)
    built = build_wrapper(what, ckpt or _default_ckpt(bundle), shape, roi)
    out = Path(out) if out else bundle / "models" / f"{what}{EXTENSIONS[fmt]}"
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(built.shape, generator=gen)
    record = _export_record(what, built, fmt, "torch.jit.trace" if fmt == "torchscript" else exporter)
    result = ExportResult(out, what, fmt, built.shape, exporter=record["exporter"])
    if fmt == "torchscript":
        meta = {**_bundle_meta(bundle), META_KEY: record}
        _save_torchscript(built.module, example, out, meta)
    else:
        _save_onnx(built.module, example, out, record, built.spatial_dynamic, exporter, opset)
    if verify:
        x = torch.randn(built.shape, generator=gen)
        with torch.no_grad():
            ref = built.module(x)
            ref = list(ref) if isinstance(ref, tuple) else [ref]
            if fmt == "torchscript":
                got = torch.jit.load(str(out), map_location="cpu")(x)
                got = list(got) if isinstance(got, tuple) else [got]
            else:
                got = run_onnx(out, x)
        result.max_abs_diff = max_abs_diff(ref, got)
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meduet.deploy.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle root (holds models/model.pt)")
    p.add_argument("--what", required=True, choices=WHATS)
    p.add_argument("--format", default="torchscript", choices=FORMATS)
    p.add_argument("--out", default=None, help="output file (default <bundle>/models/<what>.ts|.onnx)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shape", type=int, nargs="+", default=None, help="export input shape B C X Y Z")
    size.add_argument("--roi", type=int, nargs="+", default=None,
                      help="export spatial size X Y Z (or one side), batch 1 and the checkpoint's channels")
    p.add_argument("--ckpt", default=None, help="checkpoint (default <bundle>/models/model.pt)")
    p.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"), help="ONNX exporter")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip the parity check on a random input")
    args = p.parse_args(argv)
    try:
        res = export(args.bundle, args.what, args.format, args.out, args.shape, args.ckpt, args.exporter,
                     args.opset, verify=not args.no_verify, roi=args.roi)
    except MeduetConfigError as e:
        print(f"MeduetConfigError: {e}", file=sys.stderr)
        return 2
    diff = "" if res.max_abs_diff is None else f", max |exported - pytorch| = {res.max_abs_diff:.3g}"
    print(f"exported {res.what} ({res.exporter}) input {list(res.shape)} -> {res.path}{diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
