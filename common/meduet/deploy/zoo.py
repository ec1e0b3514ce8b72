"""The MONAI model zoo's bundle checks that run offline on CPU, as our own code, for a bundle folder (the packaged
form: ``bundle_root: .``, the preset merged, ``models/model.pt``):

    python -m meduet.deploy.zoo <bundle folder> [--data <dataset_dir for the workflow checks>]

What the zoo's ``ci/verify_bundle.py`` and its ``ci/unit_tests`` pattern check, in the same order, with MONAI 1.6's
own functions:

1. ``files``: ``configs/metadata.json`` and ``LICENSE`` exist (required); ``configs/inference.json|yaml`` and
   ``models/model.pt`` (preferred);
2. ``version``: ``version`` is a key of ``changelog``;
3. ``net_in_out``: ``monai.bundle.verify_net_in_out`` of ``network_def`` with a fake input shaped as
   ``network_data_format.inputs.image`` says; inputs besides ``image`` (meduet_diffusion's timestep ``t``) are
   given as ``extra_forward_args``: the midpoint of their ``value_range`` (``extra_forward_args``), as on the
   command line ``--extra_forward_args "{'t': 500}"``;
4. ``torchscript``: ``monai.bundle.ckpt_export`` of ``network_def`` with ``models/model.pt`` (``torch.jit.script``);
   a bundle may instead document an opt-out, as the zoo allows (its ``exclude_verify_torchscript_list`` plus a
   statement in ``docs/README.md``): a ``## Model zoo checks`` section naming ``TorchScript`` (``torchscript_opt_out``);
5. ``train`` / ``infer``: ``ConfigWorkflow(workflow_type=...).initialize()`` and ``check_properties()`` of
   ``configs/train.yaml`` and ``configs/inference.json`` (MONAI builds every required property, so this also
   builds the trainer and the evaluator).

The metadata schema check is ``python -m monai.bundle verify_metadata`` with the schema the project ships
(``schemas/meta_schema.json``, tested in ``tests/bundles/test_bundle_metadata.py``): MONAI's published schema URL
cannot be fetched offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meduet.errors import MeduetConfigError

__all__ = ["REQUIRED_FILES", "PREFERRED_FILES", "extra_forward_args", "check_files", "check_version",
           "check_net_in_out", "check_torchscript", "torchscript_opt_out", "check_workflow", "output_channels",
           "main"]

REQUIRED_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt",)


def _meta(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _inference_config(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise MeduetConfigError(f"{bundle}: no configs/inference.json or inference.yaml")


def extra_forward_args(meta: Mapping[str, Any]) -> dict[str, float]:
    """``{name: midpoint of value_range}`` for every network input besides ``image`` (scalars per sample)."""
    out = {}
    for name, spec in (meta.get("network_data_format", {}).get("inputs") or {}).items():
        if name != "image" and isinstance(spec, Mapping):
            lo, hi = (list(spec.get("value_range") or [0, 0]) + [0, 0])[:2]
            out[name] = (float(lo) + float(hi)) / 2.0
    return out


def check_files(bundle: Path) -> list[str]:
    """Missing required files, then missing preferred ones (prefixed ``preferred:``)."""
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    missing += [f"preferred: {f}" for f in PREFERRED_FILES if not (bundle / f).is_file()]
    try:
        _inference_config(bundle)
    except MeduetConfigError:
        missing.append("preferred: configs/inference.json")
    return missing


def check_version(meta: Mapping[str, Any]) -> None:
    if meta.get("version") not in (meta.get("changelog") or {}):
        raise MeduetConfigError(f"version {meta.get('version')!r} is not a key of the changelog")


@contextmanager
def _in(folder: Path):
    """Run from the bundle folder with it first on ``sys.path`` (as ``monai.bundle run`` does for its imports)."""
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path


def _extras(meta: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([v]) for k, v in extra_forward_args(meta).items()}


def check_net_in_out(bundle: Path, config_files: Sequence[str | Path] | None = None, **override: Any) -> None:
    """``monai.bundle.verify_net_in_out("network_def", ...)`` with the metadata's extra inputs; raises on mismatch."""
    from monai.bundle import verify_net_in_out

    bundle = Path(bundle).resolve()
    files = [str(f) for f in (config_files or [_inference_config(bundle)])]
    meta_file = str(bundle / "configs" / "metadata.json")
    with _in(bundle):
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=files, bundle_root=str(bundle),
                          extra_forward_args=_extras(_meta(bundle)), device="cpu", **override)


def output_channels(config_files: Sequence[str | Path], meta: Mapping[str, Any], bundle_root: str | Path) -> int:
    """The channels of ``network_def``'s output on the metadata's fake input (what ``outputs.pred.num_channels``
    must say for these configs, e.g. with a preset merged)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(f) for f in config_files]))
    parser["bundle_root"] = str(bundle_root)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def").eval()
    image = meta["network_data_format"]["inputs"]["image"]
    # "*" (any size, as MONAI's verify_net_in_out reads it) is 1
    shape = [1 if str(s) == "*" else int(eval(str(s), {"__builtins__": {}}, {"n": 1, "p": 1}))  # noqa: S307
             for s in image["spatial_shape"]]
    with torch.no_grad():
        out = net(torch.rand(1, int(image["num_channels"]), *shape), **_extras(meta))
    return int(out.shape[1])


def torchscript_opt_out(bundle: Path) -> str | None:
    """The documented TorchScript opt-out of a bundle (its ``docs/README.md`` section ``## Model zoo checks``
    mentioning TorchScript), or None."""
    readme = Path(bundle) / "docs" / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^## Model zoo checks\s*$(.*?)(?=^## |\Z)", readme.read_text(), re.M | re.S)
    return match.group(1).strip() if match and "TorchScript" in match.group(1) else None


def check_torchscript(bundle: Path, out: str | Path) -> str | None:
    """``monai.bundle.ckpt_export`` (``torch.jit.script``, as the zoo runs it) to ``out``: None if it worked, else
    the first line of the error."""
    from monai.bundle import ckpt_export

    bundle = Path(bundle).resolve()
    with _in(bundle):
        try:
            ckpt_export(net_id="network_def", filepath=str(out), ckpt_file=str(bundle / "models" / "model.pt"),
                        meta_file=str(bundle / "configs" / "metadata.json"),
                        config_file=str(_inference_config(bundle)), bundle_root=str(bundle))
        except Exception as e:  # noqa: BLE001 - reported as one line
            msg = str(e).strip().splitlines()
            return f"{type(e).__name__}: {msg[0] if msg else ''}"
    return None


def check_workflow(bundle: Path, workflow_type: str, **override: Any) -> list[str] | None:
    """The zoo's unit-test pattern: ``ConfigWorkflow(...).initialize()`` then ``check_properties()`` of
    ``configs/train.yaml`` (``workflow_type="train"``) or the inference config; returns what ``check_properties``
    reports (None or an empty list when all is well). A missing required property raises, as in MONAI."""
    from monai.bundle import ConfigWorkflow

    bundle = Path(bundle).resolve()
    config = bundle / "configs" / "train.yaml" if workflow_type == "train" else _inference_config(bundle)
    with _in(bundle):
        workflow = ConfigWorkflow(config_file=str(config), meta_file=str(bundle / "configs" / "metadata.json"),
                                  logging_file=str(bundle / "configs" / "logging.conf"), workflow_type=workflow_type,
                                  bundle_root=str(bundle), **override)
        workflow.initialize()
        return workflow.check_properties()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meduet.deploy.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (e.g. a packaged bundle unzipped)")
    p.add_argument("--data", help="dataset_dir for the train/infer property checks (default: the config's)")
    p.add_argument("--ts-out", default=None, help="where ckpt_export writes (default: <bundle>/models/verify_model.ts)")
    args = p.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    override = {"dataset_dir": args.data} if args.data else {}
    results: list[tuple[str, str]] = []

    def step(name: str, fn) -> None:
        try:
            res = fn()
            results.append((name, "ok" if not res else f"FAIL {res}"))
        except Exception as e:  # noqa: BLE001 - the table shows each check's first line
            results.append((name, f"FAIL {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))

    step("files", lambda: [m for m in check_files(bundle) if not m.startswith("preferred")])
    step("version", lambda: check_version(_meta(bundle)))
    step("net_in_out", lambda: check_net_in_out(bundle))
    ts = check_torchscript(bundle, args.ts_out or bundle / "models" / "verify_model.ts")
    opt_out = torchscript_opt_out(bundle)
    results.append(("torchscript", "ok" if ts is None else (f"opted out (docs): {ts}" if opt_out else f"FAIL {ts}")))
    step("train", lambda: check_workflow(bundle, "train", **override))
    step("infer", lambda: check_workflow(bundle, "infer", **override))
    for name, res in results:
        print(f"{name:12s} {res}")
    return 0 if all(r == "ok" or r.startswith("opted out") for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
