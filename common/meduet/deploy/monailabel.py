"""Put a trained meduet_seg bundle into a MONAI Label ``monaibundle`` app.

MONAI Label reads a bundle's ``configs/inference.json`` and ``configs/train.json|yaml`` on their own: it does not
merge presets and it does not know our upstream checkpoints. So the network a bundle serves must be fully described
by those two files. This module writes such a copy of a *trained* meduet_seg bundle:

* ``configs/inference.json``: the bundle's inference config with the network (VAE encoder architecture, ViT,
  decoder width, classes), sliding-window ROI and preprocessing taken from ``models/model.pt``'s record, so it
  serves exactly the trained network whatever preset trained it;
* ``configs/train.json``: the bundle's train config where the network *starts from the current model.pt* (it is
  self-contained: frozen VAE encoder, fine-tuned ViT, decoder), preprocessing and ROI from the record, ``resume``
  off (MONAI Label fine-tunes for the epochs it asks for), no upstream checkpoints needed;
* ``configs/metadata.json`` with the record's label names in ``channel_def``, plus ``multi_gpu_train.yaml``,
  ``logging.conf``, ``docs/``, ``LICENSE`` and ``models/model.pt``.

The folder is written next to its destination and renamed into place, so a failed run leaves nothing behind.

When the destination sits in an app whose ``main.py`` is MONAI Label's ``monaibundle`` sample app, that file is kept
as ``main_monaibundle.py`` and replaced by a ``main.py`` whose app class is the sample's with
``meduet_monailabel.MeduetHTTPErrors`` (``monailabel_site/``) in front: a bad inference request then gets a 4xx
with our one-line reason instead of a bare 500 (404 naming an unknown image id; 400 for an unreadable, empty or
non-NIfTI upload or a bad volume), and a failed upload leaves no temp file. Why it is done in the app class and
not in the task: that module's docstring. ``--keep-app-main`` leaves ``main.py`` alone.

    python -m meduet.deploy.monailabel --bundle <trained meduet_seg folder> --out apps/monaibundle/model/meduet_seg

meduet_diffusion's served harmonisation (``--harmonise``, :func:`prepare_monailabel_harmoniser`): a folder with the
bundle's ``configs/harmonise.json`` reading only its own ``models/`` (generator, VAE, MeDUET encoder, site style
bank) and no ``inference.json``; the app ``main.py`` serves it with ``monailabel_site/meduet_harmonise.py``'s task
(request parameter ``target_site`` or ``reference``; the harmonised volume is the returned file):

    python -m meduet.deploy.monailabel --harmonise --bundle <trained meduet_diffusion folder> \\
        --out apps/monaibundle/model/meduet_harmonise

MONAI Label itself lives in its own virtualenv (see DEVELOPERS.md); ``meduet`` must be importable there
(``pip install --no-deps -e .``), and on CPU-only torch its torchvision import needs
``PYTHONPATH=$(python -m meduet.deploy.monailabel --print-pythonpath)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meduet import records
from meduet.errors import MeduetConfigError

__all__ = ["prepare_monailabel_bundle", "prepare_monailabel_harmoniser", "install_app_main", "site_path", "main"]

#: first line of the app ``main.py`` this module writes
APP_MAIN_MARKER = "# meduet-monailabel-app: written by meduet.deploy.monailabel"
_APP_MAIN = f"""{APP_MAIN_MARKER}
# MONAI Label's monaibundle sample app (kept as main_monaibundle.py) with meduet's HTTP errors in front: a bad
# infer request gets a 4xx with meduet's one-line reason (see monailabel_site/meduet_monailabel.py in meduet).
import os
import sys

import meduet.deploy
from monailabel.interfaces.app import MONAILabelApp

_SITE = os.path.join(os.path.dirname(meduet.deploy.__file__), "monailabel_site")
if _SITE not in sys.path:  # normally on PYTHONPATH already (python -m meduet.deploy.monailabel --print-pythonpath)
    sys.path.append(_SITE)

import main_monaibundle as _sample  # noqa: E402
from meduet_harmonise import harmonise_infers  # noqa: E402
from meduet_monailabel import MeduetHTTPErrors  # noqa: E402


class MeduetApp(MeduetHTTPErrors, _sample.MyApp, MONAILabelApp):
    \"\"\"The monaibundle sample app; bad infer requests are answered with a 4xx and meduet's one-line reason.\"\"\"

    def init_infers(self):
        # model folders prepared for meduet_diffusion's harmonisation (--harmonise) get their own task
        return harmonise_infers(super().init_infers(), self.models, self.conf, self.datastore)
"""


def site_path() -> str:
    """The folder holding the torchvision-on-CPU ``sitecustomize.py`` (put it on ``PYTHONPATH``)."""
    return str(Path(__file__).resolve().parent / "monailabel_site")


def _record(model_path: Path) -> dict[str, Any]:
    return records.read(model_path, expect="meduet_seg")[1]


def _network_def(arch: dict[str, Any]) -> dict[str, Any]:
    if arch.get("init") == "unet":
        return {"_target_": "meduet.networks.seg.UNetSeg", **arch}
    return {"_target_": "meduet.networks.seg.MeduetSegNet", **arch}


def _preprocessing(record: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    pre = dict(record.get("preprocessing") or {})
    if not pre:
        raise MeduetConfigError("the model.pt record has no preprocessing; retrain it with this version of meduet_seg")
    pre["expected_channels"] = int(arch.get("vae_architecture", {}).get("in_channels", arch.get("in_channels", 1)))
    pre["modality_check"] = True  # an uploaded MR is refused by a CT model (and the reverse), never windowed as CT
    return pre


def _inference_config(src: Path, record: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(src.read_text())
    arch = record["architecture"]
    cfg["bundle_root"] = "."
    cfg["write_dicom_seg"] = False
    cfg["network_def"] = _network_def(arch)
    for key in ("model_preset", "init", "features", "vae"):
        cfg.pop(key, None)  # all in network_def now (feature_size stays: the config's key_check reads it)
    cfg["out_channels"] = int(arch["out_channels"])
    if record.get("roi_size"):
        cfg["roi_size"] = [int(r) for r in record["roi_size"]]
    cfg["preprocessing_args"] = _preprocessing(record, arch)
    cfg["input_data"] = []
    return cfg


def _train_config(src: Path, record: dict[str, Any]) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    cfg = ConfigParser.load_config_file(str(src))
    arch = record["architecture"]
    # (feature_size and label_fraction stay, unused: the config's key_check, run by multi_gpu_train.yaml, reads them)
    for key in ("vae_ckpt", "pretrain_ckpt", "model_preset", "init", "features", "train_domains"):
        cfg.pop(key, None)
    cfg["bundle_root"] = "."
    cfg["out_channels"] = int(arch["out_channels"])
    # start from the served model (self-contained: frozen VAE encoder + ViT + decoder); MONAI Label also adds a
    # CheckpointLoader of the same file when "pretrained" is on, which loads the same weights again
    cfg["network_def"] = "$meduet.records.load(os.path.join(@bundle_root, 'models', 'model.pt'), expect='meduet_seg')"
    cfg["network"] = "$@network_def.to(@device)"
    cfg["preprocessing"] = _preprocessing(record, arch)
    if record.get("roi_size"):
        cfg["roi_size"] = [int(r) for r in record["roi_size"]]
    cfg["resume"] = False  # MONAI Label asks for max_epochs of fine-tuning each time
    cfg["num_workers"] = 0
    cfg["training_cases"] = []  # MONAI Label sets train#dataset#data from its datastore
    cfg["validate"]["dataset"]["data"] = []  # ... and validate#dataset#data from its validation split
    cfg["initialize"] = ["$monai.utils.set_determinism(seed=@seed)"]
    cfg["training"] = ["$monai.utils.set_determinism(seed=@seed)", "$@train#trainer.run()"]
    return cfg


def install_app_main(app: str | os.PathLike) -> bool:
    """Put meduet's HTTP errors in front of the ``monaibundle`` sample app in ``app`` (see the module docstring).

    Returns True when ``app/main.py`` is (now) ours; False, touching nothing, when ``app`` has no ``main.py`` or
    another app's (add ``meduet_monailabel.MeduetHTTPErrors`` in front of its app class by hand).
    """
    app = Path(app)
    main_py = app / "main.py"
    if not main_py.is_file():
        return False
    text = main_py.read_text()
    if text.startswith(APP_MAIN_MARKER):
        if text != _APP_MAIN:  # ours, from an older meduet: brought up to date (main_monaibundle.py stays)
            _write_text(app / "main.py", _APP_MAIN)
        return True
    if "class MyApp(MONAILabelApp)" not in text or "get_bundle_models" not in text:
        return False
    for name, content in (("main_monaibundle.py", text), ("main.py", _APP_MAIN)):
        _write_text(app / name, content)
    return True


def _write_text(path: Path, content: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _check_out(out: Path, overwrite: bool) -> None:
    """One-line errors for a served folder that exists (without ``overwrite``) or whose name MONAI Label reads as
    another task type."""
    if out.exists() and not overwrite:
        raise MeduetConfigError(f"'{out}' already exists; pass --overwrite to replace it")
    if any(word in out.name.lower() for word in ("deepedit", "deepgrow", "detection")):
        raise MeduetConfigError(f"'{out.name}': MONAI Label treats folder names containing deepedit/deepgrow/"
                                "detection as other task types; choose another name")


@contextlib.contextmanager
def _staged(bundle: Path, out: Path, app_main: bool) -> Iterator[Path]:
    """A folder next to ``out`` with empty ``configs/`` and ``models/`` to fill; afterwards the bundle's ``docs/``
    and ``LICENSE`` are added and it is renamed to ``out`` (replacing it), or removed if filling it failed; then,
    with ``app_main`` and ``out`` = ``<app>/model/<name>``, the app's ``main.py`` (:func:`install_app_main`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        yield tmp
        if (bundle / "docs").is_dir():
            shutil.copytree(bundle / "docs", tmp / "docs")
        if (bundle / "LICENSE").is_file():
            shutil.copy2(bundle / "LICENSE", tmp / "LICENSE")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if app_main and out.parent.name == "model":
        install_app_main(out.parent.parent)


def prepare_monailabel_bundle(bundle: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                              overwrite: bool = False, app_main: bool = True) -> Path:
    """Write a MONAI-Label-ready copy of the trained meduet_seg bundle ``bundle`` to the folder ``out``.

    Args:
        bundle: the meduet_seg bundle folder (``configs/``, ``models/model.pt``).
        out: destination, normally ``<app>/model/<name>``; the folder name is the model name MONAI Label shows
            (avoid names containing "deepedit", "deepgrow" or "detection": they switch MONAI Label's task type).
        model: another ``model.pt`` to serve instead of ``<bundle>/models/model.pt``.
        overwrite: replace an existing ``out``.
        app_main: when ``out`` is ``<app>/model/<name>`` and ``<app>/main.py`` is the monaibundle sample app, put
            meduet's HTTP errors in front of it (:func:`install_app_main`).

    Returns:
        ``out`` as a ``Path``.
    """
    bundle, out = Path(bundle), Path(out)
    configs = bundle / "configs"
    for name in ("inference.json", "train.yaml", "metadata.json"):
        if not (configs / name).is_file():
            raise MeduetConfigError(f"'{bundle}' is not a meduet_seg bundle folder ({configs / name} is missing)")
    model_path = Path(model) if model else bundle / "models" / "model.pt"
    record = _record(model_path)
    _check_out(out, overwrite)

    with _staged(bundle, out, app_main) as tmp:
        (tmp / "configs" / "inference.json").write_text(
            json.dumps(_inference_config(configs / "inference.json", record), indent=4) + "\n")
        (tmp / "configs" / "train.json").write_text(
            json.dumps(_train_config(configs / "train.yaml", record), indent=4) + "\n")
        meta = json.loads((configs / "metadata.json").read_text())
        labels = record.get("labels") or {}
        pred = meta["network_data_format"]["outputs"]["pred"]
        if labels:
            pred["channel_def"] = {str(k): str(v) for k, v in labels.items()}
        pred["num_channels"] = int(record["architecture"]["out_channels"])
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        for name in ("multi_gpu_train.yaml", "logging.conf"):
            if (configs / name).is_file():
                shutil.copy2(configs / name, tmp / "configs" / name)
        shutil.copy2(model_path, tmp / "models" / "model.pt")
    return out


# ----------------------------------------------------------------------------------------------------------------
# meduet_diffusion's served harmonisation (configs/harmonise.json), a task of its own in the app (meduet_harmonise)
# ----------------------------------------------------------------------------------------------------------------
HARMONISE_CONDITIONS = ("factors", "metadata")


def _harmonise_config(src: Path, condition: str) -> dict[str, Any]:
    """The bundle's harmonise.json reading everything from the served folder (no sibling bundles, no latent
    cache): checkpoints and the site style bank in ``models/``, no default input."""
    cfg = json.loads(src.read_text())
    cfg["bundle_root"] = "."
    cfg["vae_ckpt"] = "$os.path.join(@bundle_root, 'models', 'vae.pt')"
    cfg["pretrain_ckpt"] = "$os.path.join(@bundle_root, 'models', 'pretrain.pt')" if condition == "factors" else None
    cfg["site_styles_file"] = "$os.path.join(@bundle_root, 'models', 'site_styles.json')"
    cfg["latent_datalist"] = None
    cfg["input_data"] = []
    cfg.pop("site_styles", None)  # the run id that builds the bank from a latent cache: not in a served folder
    return cfg


def prepare_monailabel_harmoniser(bundle: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                                  vae: str | None = None, pretrain: str | None = None,
                                  site_styles: str | None = None, overwrite: bool = False,
                                  app_main: bool = True) -> Path:
    """Write a MONAI-Label-ready harmonisation folder of the trained meduet_diffusion bundle ``bundle`` to ``out``.

    The folder holds ``configs/harmonise.json`` (the bundle's, reading only the folder: ``models/model.pt`` the
    generator, ``models/vae.pt`` meduet_vae's, ``models/pretrain.pt`` meduet_pretrain's encoder for generators
    conditioned on factors, and ``models/site_styles.json``, the per-site mean styles that harmonise.json's run
    id ``site_styles`` writes), ``configs/metadata.json``, ``docs/`` and ``LICENSE``; no ``inference.json``, so
    MONAI Label's bundle task leaves it alone and the app's ``meduet_harmonise.HarmoniseTask`` serves it (the app
    ``main.py`` this module writes). Defaults: ``<bundle>/models/model.pt`` and ``site_styles.json``, the sibling
    bundles' ``meduet_vae/models/model.pt`` and ``meduet_pretrain/models/model.pt``. Written next to ``out`` and
    renamed into place (nothing is left behind on error)."""
    bundle, out = Path(bundle), Path(out)
    configs = bundle / "configs"
    for name in ("harmonise.json", "metadata.json"):
        if not (configs / name).is_file():
            raise MeduetConfigError(f"'{bundle}' is not a meduet_diffusion bundle folder ({configs / name} is missing)")
    model_path = Path(model) if model else bundle / "models" / "model.pt"
    vae_path = Path(vae) if vae else bundle.parent / "meduet_vae" / "models" / "model.pt"
    record = records.read(model_path, expect=("dit", "dualflow"))[1]
    condition = str(record.get("condition", "none"))
    if condition not in HARMONISE_CONDITIONS:
        raise MeduetConfigError(f"'{model_path}' is a generator conditioned on '{condition}', which takes no target "
                                "style; serve a meduet_diffusion generator conditioned on factors (train.yaml's "
                                "default) or metadata")
    records.read(vae_path, expect="vae")
    files = {"model.pt": model_path, "vae.pt": vae_path}
    if condition == "factors":
        files["pretrain.pt"] = Path(pretrain) if pretrain else bundle.parent / "meduet_pretrain" / "models" / "model.pt"
        records.read(files["pretrain.pt"], expect=("meduet_encoder", "meduet", "mae_encoder", "mae"))
        styles = Path(site_styles) if site_styles else bundle / "models" / "site_styles.json"
        if not styles.is_file():
            raise MeduetConfigError(f"site styles '{styles}' do not exist; write them first: python -m monai.bundle "
                                    "run site_styles --config_file \"['<meduet_diffusion>/configs/harmonise.json',"
                                    "'<meduet_diffusion>/configs/presets/demo.yaml']\" (or pass --site-styles)")
        files["site_styles.json"] = styles
    _check_out(out, overwrite)
    with _staged(bundle, out, app_main) as tmp:
        (tmp / "configs" / "harmonise.json").write_text(
            json.dumps(_harmonise_config(configs / "harmonise.json", condition), indent=4) + "\n")
        shutil.copy2(configs / "metadata.json", tmp / "configs" / "metadata.json")
        if (configs / "logging.conf").is_file():
            shutil.copy2(configs / "logging.conf", tmp / "configs" / "logging.conf")
        for name, src in files.items():
            shutil.copy2(src, tmp / "models" / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meduet.deploy.monailabel",
        description="Write a MONAI-Label-ready copy of a trained meduet_seg bundle (or, with --harmonise, of "
                    "meduet_diffusion's harmonisation) into a monaibundle app.")
    parser.add_argument("--bundle", help="trained meduet_seg bundle folder (meduet_diffusion with --harmonise; "
                        "required with --out)")
    parser.add_argument("--out", help="destination, e.g. apps/monaibundle/model/meduet_seg")
    parser.add_argument("--model", default=None, help="serve this model.pt instead of <bundle>/models/model.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--keep-app-main", action="store_true",
                        help="leave the app's main.py alone (bad requests then get MONAI Label's bare 500)")
    parser.add_argument("--harmonise", action="store_true",
                        help="serve meduet_diffusion's harmonisation (--bundle: the meduet_diffusion folder)")
    parser.add_argument("--vae", default=None, help="--harmonise: meduet_vae's model.pt (default: the sibling bundle's)")
    parser.add_argument("--pretrain", default=None,
                        help="--harmonise: meduet_pretrain's model.pt (default: the sibling bundle's)")
    parser.add_argument("--site-styles", default=None,
                        help="--harmonise: the site style bank (default: <bundle>/models/site_styles.json)")
    parser.add_argument("--print-pythonpath", action="store_true",
                        help="print the folder to put on PYTHONPATH for MONAI Label on CPU-only torch, and exit")
    args = parser.parse_args(argv)
    if args.print_pythonpath:
        print(site_path())
        return 0
    if not args.out or not args.bundle:
        parser.error("--bundle and --out are required")
    try:
        if args.harmonise:
            out = prepare_monailabel_harmoniser(args.bundle, args.out, args.model, args.vae, args.pretrain,
                                                args.site_styles, args.overwrite, app_main=not args.keep_app_main)
        else:
            out = prepare_monailabel_bundle(args.bundle, args.out, args.model, args.overwrite,
                                            app_main=not args.keep_app_main)
    except MeduetConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = out.parent.parent
    if (app / "main.py").is_file() and (app / "main.py").read_text().startswith(APP_MAIN_MARKER):
        print(f"{app / 'main.py'}: the monaibundle app (kept as main_monaibundle.py) with meduet's HTTP errors")
    print(f"wrote {out}\nstart MONAI Label (in its own virtualenv, see DEVELOPERS.md):\n"
          f"  PYTHONPATH={site_path()} python -m monailabel.main start_server --app {app} --studies <images> "
          f"--conf models {out.name} --conf zoo_source github --conf sam2 false --host 127.0.0.1 --port 8000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
