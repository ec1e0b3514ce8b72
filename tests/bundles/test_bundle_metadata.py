"""Check every bundle's configs/metadata.json against schemas/meta_schema.json.

The schema is the repository's offline stand-in for MONAI's published metadata schema (the URL in each
metadata.json "schema" field cannot be downloaded here).  ``monai.bundle verify_metadata`` downloads the schema
only when ``--filepath`` does not exist yet (monai.apps.utils.download_url returns early for an existing file when
no hash is given), so the CLI runs below get a copy of the schema at ``--filepath`` and are run with every socket
call patched to fail and leave a marker file, which proves that no download was attempted.

Bundles are discovered by glob, so new bundles are covered without editing this file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "schemas" / "meta_schema.json"
METADATA_FILES = sorted(REPO.glob("bundles/*/configs/metadata.json"))
BUNDLES = {p.parts[-3]: p for p in METADATA_FILES}
CLI_TIMEOUT = 300  # seconds; the run itself is an interpreter start + `import monai` + a sub-second validation

# Imported by the CLI subprocesses (first on PYTHONPATH): any socket use is recorded in a marker file and fails.
NETWORK_GUARD = '''
import os
import socket

_MARKER = os.environ["MEDUET_NETWORK_MARKER"]


def _blocked(*args, **kwargs):
    with open(_MARKER, "a") as f:
        f.write(repr(args[:3]) + "\\n")
    raise OSError("network access attempted in an offline metadata test")


socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
'''


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


SCHEMA = _load(SCHEMA_PATH)
VALIDATOR = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)


def _all_errors(instance: dict) -> list:
    """All validation errors, including the ones nested in anyOf/oneOf contexts."""
    out, stack = [], list(VALIDATOR.iter_errors(instance))
    while stack:
        err = stack.pop()
        out.append(err)
        stack.extend(err.context)
    return out


def _describe(errors: list) -> str:
    return "\n".join(f"  at {list(e.absolute_path)}: {e.message}" for e in errors) or "  (no errors)"


# ---------------------------------------------------------------------------------------------------------------
# (a) + (d): the real CLI, run offline.  All runs start together (they are dominated by `import monai`).
# ---------------------------------------------------------------------------------------------------------------


def _prepare_run(workdir: Path, meta_file: Path) -> dict:
    workdir.mkdir(parents=True)
    guard_dir = workdir / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
    schema_copy = workdir / "meta_schema.json"
    shutil.copyfile(SCHEMA_PATH, schema_copy)
    assert schema_copy.is_file()  # exists before the call, so verify_metadata has nothing to download
    marker = workdir / "network_attempts.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MEDUET_NETWORK_MARKER"] = str(marker)
    env["no_proxy"] = env["NO_PROXY"] = "*"
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
           "--filepath", str(schema_copy)]
    return {"cmd": cmd, "env": env, "cwd": workdir, "schema_copy": schema_copy, "marker": marker}


def _run(run: dict) -> dict:
    proc = subprocess.run(run["cmd"], env=run["env"], cwd=run["cwd"], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    return {**run, "proc": proc, "output": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("verify_metadata")
    runs = {name: _prepare_run(base / name, meta) for name, meta in BUNDLES.items()}
    if METADATA_FILES:
        broken = _load(METADATA_FILES[0])
        del broken["task"]
        (base / "missing_task").mkdir()
        broken_file = base / "missing_task" / "metadata.json"
        broken_file.write_text(json.dumps(broken, indent=4))
        runs["<missing task>"] = _prepare_run(base / "missing_task" / "run", broken_file)
    with ThreadPoolExecutor(max_workers=max(1, min(len(runs), os.cpu_count() or 1))) as pool:
        return dict(zip(runs, pool.map(_run, runs.values())))


def test_bundles_discovered():
    assert METADATA_FILES, "no bundles/*/configs/metadata.json found"


def test_network_guard_detects_network_use(tmp_path):
    """The guard used for the CLI runs does catch a download attempt (so its silence below means something)."""
    (tmp_path / "sitecustomize.py").write_text(NETWORK_GUARD)
    marker = tmp_path / "network_attempts.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MEDUET_NETWORK_MARKER": str(marker)}
    code = "import urllib.request; urllib.request.urlopen('https://github.com', timeout=5)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert marker.is_file(), proc.stderr


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_verify_metadata_cli_passes_offline(bundle, cli_runs):
    run = cli_runs[bundle]
    assert run["proc"].returncode == 0, f"verify_metadata failed for {BUNDLES[bundle]}:\n{run['output']}"
    assert not run["marker"].exists(), f"network access attempted:\n{run['marker'].read_text()}"
    assert "skipped downloading" in run["output"], run["output"]
    assert "metadata is verified with no error" in run["output"], run["output"]
    assert run["schema_copy"].read_bytes() == SCHEMA_PATH.read_bytes()  # not replaced by a download


def test_verify_metadata_cli_fails_without_task(cli_runs):
    run = cli_runs["<missing task>"]
    assert run["proc"].returncode != 0, f"verify_metadata accepted metadata without 'task':\n{run['output']}"
    assert "'task' is a required property" in run["output"], run["output"]
    assert not run["marker"].exists(), f"network access attempted:\n{run['marker'].read_text()}"


# ---------------------------------------------------------------------------------------------------------------
# (b): the schema itself, with jsonschema directly: valid metadata passes, broken variants are rejected.
# ---------------------------------------------------------------------------------------------------------------


def test_schema_is_valid_json_schema():
    type(VALIDATOR).check_schema(SCHEMA)
    assert "MONAI" in SCHEMA["$comment"] and "offline" in SCHEMA["$comment"]


def test_changelog_guards_are_consistent():
    """Each enumerated if/then pairs a version with the same changelog key (see the schema's $comment)."""
    guards = SCHEMA["allOf"][0]["then"]["allOf"]
    assert guards
    for guard in guards:
        version = guard["if"]["properties"]["version"]["const"]
        assert guard["then"]["properties"]["changelog"]["required"] == [version]


def _drop_output_num_channels(meta: dict) -> tuple:
    name = next(iter(meta["network_data_format"]["outputs"]))
    del meta["network_data_format"]["outputs"][name]["num_channels"]
    return ("network_data_format", "outputs", name), "required", "num_channels"


def _drop_network_data_format(meta: dict) -> tuple:
    del meta["network_data_format"]
    return (), "required", "network_data_format"


def _non_semver_version(meta: dict) -> tuple:
    meta["version"] = "1.0"
    meta["changelog"]["1.0"] = "not semver"
    return ("version",), "pattern", "1.0"


def _changelog_without_current_version(meta: dict) -> tuple:
    version = meta["version"]
    del meta["changelog"][version]
    if not meta["changelog"]:
        meta["changelog"]["0.0.1" if version != "0.0.1" else "0.0.2"] = "an older version"
    return ("changelog",), "required", version


def _drop_input_modality(meta: dict) -> tuple:
    name = next(iter(meta["network_data_format"]["inputs"]))
    del meta["network_data_format"]["inputs"][name]["modality"]
    return ("network_data_format", "inputs", name), "required", "modality"


BREAKERS = {
    "missing network_data_format": _drop_network_data_format,
    "output without num_channels": _drop_output_num_channels,
    "non-semver version": _non_semver_version,
    "changelog missing current version": _changelog_without_current_version,
    "input without modality": _drop_input_modality,
}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_is_valid(bundle):
    errors = _all_errors(_load(BUNDLES[bundle]))
    assert not errors, f"{BUNDLES[bundle]} violates schemas/meta_schema.json:\n{_describe(errors)}"


@pytest.mark.parametrize("variant", sorted(BREAKERS))
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_schema_rejects_broken_metadata(bundle, variant):
    meta = _load(BUNDLES[bundle])
    assert not _all_errors(meta), "baseline must be valid for the rejection to mean anything"
    broken = copy.deepcopy(meta)
    path, validator, needle = BREAKERS[variant](broken)
    errors = _all_errors(broken)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)
    hint = ""
    if variant == "changelog missing current version":
        hint = (f"\nthe schema's changelog guard does not cover version {meta['version']!r}: extend the enumerated "
                "if/then list in schemas/meta_schema.json (see its $comment)")
    assert any(
        tuple(e.absolute_path) == path and e.validator == validator and needle in e.message for e in errors
    ), f"expected a {validator!r} error at {list(path)} mentioning {needle!r}, got:\n{_describe(errors)}{hint}"


SECONDARY_FORMATS = sorted((b, k) for b, p in BUNDLES.items() for k in json.loads(p.read_text())
                           if k.endswith("_data_format") and k != "network_data_format")


def test_some_bundle_declares_a_secondary_network():
    assert SECONDARY_FORMATS, "meduet_vae declares its decoder as a secondary *_data_format"


@pytest.mark.parametrize("bundle,key", SECONDARY_FORMATS)
def test_schema_checks_secondary_data_formats(bundle, key):
    """Any <name>_data_format key besides network_data_format follows the same structure (patternProperties)."""
    meta = _load(BUNDLES[bundle])
    for key in [key]:
        broken = copy.deepcopy(meta)
        name = next(iter(broken[key]["outputs"]))
        del broken[key]["outputs"][name]["num_channels"]
        errors = _all_errors(broken)
        assert any(tuple(e.absolute_path) == (key, "outputs", name) and "num_channels" in e.message
                   for e in errors), _describe(errors)
        broken = copy.deepcopy(meta)
        del broken[key]["inputs"]
        assert any(tuple(e.absolute_path) == (key,) and "'inputs'" in e.message
                   for e in _all_errors(broken)), key


# ---------------------------------------------------------------------------------------------------------------
# (c): the input/output names MONAI Label and monai.bundle verify_net_in_out read.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_network_io_keys(bundle):
    fmt = _load(BUNDLES[bundle])["network_data_format"]
    assert "image" in fmt["inputs"], f"network_data_format.inputs has {sorted(fmt['inputs'])}, needs 'image'"
    assert "pred" in fmt["outputs"], f"network_data_format.outputs has {sorted(fmt['outputs'])}, needs 'pred'"
