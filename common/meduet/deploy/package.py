"""Package bundles as downloadable, self-contained zips.

    python -m meduet.deploy.package --bundles-dir bundles --preset demo --out dist    # every bundle there
    python -m meduet.deploy.package --bundle path/to/meduet_seg --preset demo --out dist \\
        [--max-file-mb 1900 --base-url https://github.com/<owner>/<repo>/releases/download/<tag>]

For each bundle this writes ``dist/<name>_v<version>.zip`` (version from ``configs/metadata.json``) holding one
top-level folder ``<name>/`` with:

- ``configs/``: every workflow config with the size preset the shipped weights were trained with merged in
  (MONAI's own ``ConfigParser.load_config_files``, as ``--config_file "[cfg, preset]"`` would) and
  ``bundle_root: .``; the configs find the bundles they chain through ``siblings``, the folder that holds
  ``bundle_root`` -- so, as in the MONAI model zoo, workflows run from the bundle folder (or with
  ``--bundle_root``) and the sibling bundles' checkpoints are found at ``<siblings>/<sibling>/models/model.pt``
  when the bundles are downloaded into one folder. Overlays (``multi_gpu_train.yaml``, ``mae_baseline.yaml``) and
  ``presets/`` are copied as they are, so another preset can still be merged on top.
- ``docs/``, ``LICENSE``, ``scripts/`` and ``large_files.yml`` when the bundle has them;
- ``models/``: ``model.pt`` and the other exported weights (not ``checkpoint*.pt`` resume states, which carry
  optimizer state, nor ``*_stage*`` intermediates, nor files the bundle's own ``large_files.yml`` lists, such as
  MAISI's downloaded autoencoder: ``download_large_files`` fetches those from their source);
- ``meduet/``: this library, vendored, so the bundle runs where only the packages its metadata declares are
  installed (MONAI puts the bundle folder on ``sys.path`` for ``monai.bundle run``), without ``NOT_VENDORED``
  (MONAI Label's site folder, which only that server's virtualenv uses); it carries
  ``_packaged.json``, which makes it verify the bundle on import (:mod:`meduet.deploy.integrity`);
- ``checksums.sha256``: the sha256 of every file above, large files included.

Files larger than ``--max-file-mb`` (GitHub release assets are limited to 2 GiB) are not put in the zip: they
are written beside it as ``<name>_v<version>_<path>`` and listed in the bundle's ``large_files.yml`` (url under
``--base-url``, sha256) for ``python -m monai.bundle download_large_files``. Next to the zips, ``SHA256SUMS``
lists the sha256 of every published file; publish it with them. Zips are reproducible (sorted entries, fixed
timestamps), written atomically, and nothing is left behind when packaging fails.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from meduet import __version__
from meduet.deploy.integrity import MANIFEST, PACKAGED_MARKER, sha256_file
from meduet.deploy.zoo import output_channels
from meduet.errors import MeduetConfigError

BUNDLES = ("meduet_vae", "meduet_pretrain", "meduet_diffusion", "meduet_seg", "meduet_recon")
# merged on top of train.yaml by users: copied as they are
OVERLAYS = ("multi_gpu_train.yaml", "mae_baseline.yaml", "controlnet_train.yaml")
NOT_WORKFLOWS = ("metadata.json", "logging.conf")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# module-level third-party imports of the vendored library -> the distribution metadata must declare
_DIST_OF = {"yaml": "pyyaml", "ignite": "pytorch-ignite", "skimage": "scikit-image", "sklearn": "scikit-learn",
            "PIL": "pillow"}
_ALWAYS = {"torch", "numpy", "monai"}  # monai_version / pytorch_version / numpy_version
# folders of the library that belong to another program's environment, not to a bundle: MONAI Label's site folder
# (its app's HTTP-error hook imports fastapi and monailabel, which only MONAI Label's virtualenv has)
NOT_VENDORED = ("monailabel_site",)


def _vendored_source() -> Path:
    return Path(__file__).resolve().parents[1]


def merged_config(files: list[Path]) -> dict:
    """Several config files merged exactly as ``monai.bundle run --config_file "[a, b]"`` merges them."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(f) for f in files])


def relocate(value, folder: str):
    """Sibling paths written as ``<folder>/meduet_vae/models/model.pt`` (``folder`` being the name of the folder that
    holds the bundles) made bundle-folder-relative (``../meduet_vae/models/model.pt``), in plain values and inside
    ``$`` expressions alike. The repository's configs name their chained bundles through ``siblings`` (the folder
    holding ``bundle_root``), which needs no rewriting; this keeps a user's own config with such paths working."""
    if isinstance(value, dict):
        return {k: relocate(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(f"{folder}/meduet_", "../meduet_")
    return value


def _write_config(cfg: dict, dst: Path, sources: list[str]) -> None:
    if dst.suffix == ".json":
        dst.write_text(json.dumps(cfg, indent=4) + "\n")
        return
    header = (f"# Packaged by meduet.deploy.package from {' + '.join(sources)} (the preset the shipped weights were\n"
              "# trained with). bundle_root is '.': run from this folder or pass --bundle_root. Commented sources:\n"
              "# the project repository's <name>/configs/.\n")
    dst.write_text(header + yaml.safe_dump(cfg, sort_keys=False, width=118, allow_unicode=True))


def _listed_large_files(bundle: Path) -> set[str]:
    """Paths the bundle's own ``large_files.yml`` already publishes (e.g. MAISI's autoencoder): users fetch them
    with ``download_large_files`` from their source, so a local copy is not shipped again."""
    lf = bundle / "large_files.yml"
    if not lf.is_file():
        return set()
    entries = (yaml.safe_load(lf.read_text()) or {}).get("large_files", []) or []
    return {Path(str(e.get("path", ""))).as_posix().removeprefix("./") for e in entries if isinstance(e, dict)}


def _model_files(models: Path, listed: set[str] = frozenset()) -> list[Path]:
    if not models.is_dir():
        return []
    return sorted(p for p in models.iterdir() if p.is_file() and p.suffix in (".pt", ".ts", ".onnx")
                  and not p.name.startswith("checkpoint") and "_stage" not in p.name
                  and f"models/{p.name}" not in listed)


def module_level_imports(package_dir: Path) -> dict[str, set[str]]:
    """``{top-level module: {files}}`` of third-party imports a module needs just to be imported.

    Only statements at module level (not inside functions, ``try`` blocks or ``if`` blocks) count: imports inside
    functions or guarded by ``try`` are optional features (e.g. nilearn for the sample brain, onnx for export).
    """
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for py in sorted(package_dir.rglob("*.py")):
        if any(part in NOT_VENDORED for part in py.relative_to(package_dir).parts):
            continue
        tree = ast.parse(py.read_text(), filename=str(py))
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in stdlib and top not in ("meduet", "__future__"):
                    found.setdefault(top, set()).add(str(py.relative_to(package_dir)))
    return found


def undeclared_imports(package_dir: Path, metadata: dict) -> dict[str, set[str]]:
    """Module-level imports of ``package_dir`` whose distribution ``metadata`` does not declare."""
    declared = {k.lower() for k in metadata.get("required_packages_version", {})} | _ALWAYS
    return {m: files for m, files in module_level_imports(package_dir).items()
            if _DIST_OF.get(m, m).lower() not in declared and m.lower() not in declared}


def _check_weights(root: Path) -> None:
    """The packaged ``inference.json`` must build a network the shipped ``models/model.pt`` fits."""
    import torch
    from monai.bundle import ConfigParser

    inf, ckpt = root / "configs" / "inference.json", root / "models" / "model.pt"
    if not (inf.is_file() and ckpt.is_file()):
        return
    parser = ConfigParser(merged_config([inf]))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    bad = [k for k, v in net.state_dict().items()
           if isinstance(v, torch.Tensor) and (k not in state or tuple(state[k].shape) != tuple(v.shape))]
    if bad:
        raise MeduetConfigError(
            f"{root.name}: the packaged configs/inference.json does not describe models/model.pt ({len(bad)} "
            f"parameters missing or of another shape, e.g. {bad[:2]}); pass --preset with the preset the weights "
            "were trained with")


def _describe_network(root: Path) -> None:
    """The packaged ``metadata.json`` describes the packaged network: ``outputs.pred.num_channels`` is what the
    ``network_def`` of the packaged (preset-merged) inference config gives on the metadata's input (e.g.
    meduet_pretrain's content + style channels depend on the size preset)."""
    inf, meta_path = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    if not inf.is_file():
        return
    meta = json.loads(meta_path.read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    channels = output_channels([inf], meta, root)
    if channels != pred["num_channels"]:
        pred["num_channels"] = channels
        meta_path.write_text(json.dumps(meta, indent=4) + "\n")


def _zip_dir(src: Path, top: str, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(src.rglob("*")):
                rel = p.relative_to(src).as_posix()
                if p.is_dir():
                    continue
                info = zipfile.ZipInfo(f"{top}/{rel}", date_time=ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(p, "rb") as f:
                    zf.writestr(info, f.read())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _update_sums(out: Path, digests: dict[str, str]) -> None:
    path = out / "SHA256SUMS"
    sums: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            d, _, name = line.partition("  ")
            if name:
                sums[name] = d
    sums.update(digests)
    tmp = path.with_name(f".SHA256SUMS.tmp{os.getpid()}")
    tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    os.replace(tmp, path)


def package_bundle(bundle: str | Path, out: str | Path, preset: str | None = None, models: str | Path | None = None,
                   max_file_mb: float = 1900.0, base_url: str | None = None, check: bool = True) -> Path:
    """Write ``<out>/<name>_v<version>.zip`` (and large files beside it); return the zip's path.

    ``bundle``: the bundle folder in the repository (configs, docs, LICENSE); ``preset``: the size preset the
    weights were trained with (merged into the packaged configs; ``None``: configs as they are); ``models``: where
    the trained weights are (default ``<bundle>/models``).
    """
    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    name = bundle.name
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise MeduetConfigError(f"{bundle}: configs/metadata.json is missing; pass a bundle folder (one holding "
                                "configs/metadata.json, e.g. the repository's meduet_seg)")
    meta = json.loads(meta_path.read_text())
    version = meta["version"]
    preset_file = bundle / "configs" / "presets" / f"{preset}.yaml" if preset else None
    if preset_file is not None and not preset_file.is_file():
        raise MeduetConfigError(f"{preset_file} does not exist; choose one of "
                                f"{sorted(p.stem for p in (bundle / 'configs' / 'presets').glob('*.yaml'))}")
    vendored = _vendored_source()
    missing = undeclared_imports(vendored, meta)
    if missing:
        raise MeduetConfigError(f"{meta_path}: required_packages_version does not declare {sorted(missing)} which "
                                f"the vendored library imports (e.g. in {sorted(next(iter(missing.values())))[0]}); "
                                "add them")
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{name}_v{version}.zip"
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as tmp:
        root = Path(tmp) / name
        (root / "configs").mkdir(parents=True)
        for src in sorted((bundle / "configs").rglob("*")):
            if src.is_dir():
                continue
            rel = src.relative_to(bundle / "configs")
            dst = root / "configs" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            is_workflow = (len(rel.parts) == 1 and src.suffix in (".json", ".yaml", ".yml")
                           and src.name not in NOT_WORKFLOWS and src.name not in OVERLAYS)
            if not is_workflow:
                shutil.copy2(src, dst)
                continue
            files = [src] + ([preset_file] if preset_file is not None else [])
            cfg = relocate(merged_config(files), bundle.parent.name)
            if "bundle_root" in cfg:
                cfg["bundle_root"] = "."
            _write_config(cfg, dst, [f.relative_to(bundle / "configs").as_posix() for f in files])
        if preset_file is not None:
            _describe_network(root)
        for extra in ("docs", "scripts", "LICENSE", "large_files.yml"):
            src = bundle / extra
            if src.is_dir():
                shutil.copytree(src, root / extra, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.is_file():
                shutil.copy2(src, root / extra)
        model_files = _model_files(Path(models) if models else bundle / "models", _listed_large_files(bundle))
        if model_files:
            (root / "models").mkdir()
            for f in model_files:
                shutil.copy2(f, root / "models" / f.name)
        shutil.copytree(vendored, root / "meduet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *NOT_VENDORED))
        (root / "meduet" / PACKAGED_MARKER).write_text(json.dumps(
            {"name": name, "version": version, "preset": preset, "meduet_version": __version__}, indent=2) + "\n")
        if check:
            _check_weights(root)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        digests = {rel: sha256_file(root / rel) for rel in files}
        # large files leave the zip for large_files.yml (their hash stays in the manifest)
        large = [rel for rel in files if (root / rel).stat().st_size > max_file_mb * 2**20]
        published: dict[str, str] = {}
        if large:
            if not base_url:
                raise MeduetConfigError(f"{name}: {large} exceed --max-file-mb {max_file_mb}; pass --base-url where "
                                        "they will be published (e.g. a GitHub release's download address)")
            lf_path = root / "large_files.yml"
            entries = (yaml.safe_load(lf_path.read_text()) or {}).get("large_files", []) if lf_path.is_file() else []
            entries = [e for e in entries if e.get("path") not in large]
            for rel in large:
                asset = f"{name}_v{version}_{rel.replace('/', '_')}"
                os.replace(root / rel, out / asset)
                published[asset] = digests[rel]
                entries.append({"path": rel, "url": f"{base_url.rstrip('/')}/{asset}", "hash_val": digests[rel],
                                "hash_type": "sha256"})
            lf_path.write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
            digests["large_files.yml"] = sha256_file(lf_path)
        (root / MANIFEST).write_text("".join(f"{d}  {rel}\n" for rel, d in sorted(digests.items())))
        _zip_dir(root, name, zip_path)
    published[zip_path.name] = sha256_file(zip_path)
    (out / f"{zip_path.name}.sha256").write_text(f"{published[zip_path.name]}  {zip_path.name}\n")
    _update_sums(out, published)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", help="bundle folder (repeatable)")
    p.add_argument("--bundles-dir", help=f"the folder holding the bundles: package {', '.join(BUNDLES)} from it")
    p.add_argument("--out", default="dist", help="where the zips go (default dist/)")
    p.add_argument("--preset", default=None, help="size preset the shipped weights were trained with "
                   "(tiny|demo|paper); merged into the packaged configs")
    p.add_argument("--models", action="append", default=[], metavar="NAME=DIR",
                   help="take NAME's weights from DIR instead of <bundle>/models (repeatable)")
    p.add_argument("--max-file-mb", type=float, default=1900.0, help="larger files go to large_files.yml")
    p.add_argument("--base-url", default=None, help="address the large files will be published under")
    p.add_argument("--no-check", action="store_true", help="skip loading model.pt into the packaged network")
    args = p.parse_args(argv)
    if not args.bundle and not args.bundles_dir:
        p.error("give --bundles-dir (the folder holding the bundles) or --bundle (repeatable)")
    bundles = [Path(b) for b in args.bundle or []] + [Path(args.bundles_dir) / b for b in BUNDLES
                                                      if args.bundles_dir]
    models = dict(m.split("=", 1) for m in args.models)
    for b in bundles:
        z = package_bundle(b, args.out, preset=args.preset, models=models.get(Path(b).name),
                           max_file_mb=args.max_file_mb, base_url=args.base_url, check=not args.no_check)
        print(f"{z}  sha256 {sha256_file(z)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
