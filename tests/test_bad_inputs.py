"""The bad-input matrix: every workflow x every bad input a user can give it, run as users run it
(``python -m monai.bundle run``, forks of one helper, on the shared tiny trained chain), must

* exit non-zero,
* end with one line (a ``Meduet...Error: ``) that names the bad file (or the key) and says what to do after a ``;``,
* print no Python traceback,
* leave no output file (inference: the first, good, item's output is removed too; training: nothing in the fresh
  bundle root).

The README's paragraph on bad input lists exactly the rows of :data:`CASES`. Each case is one row (workflow, bad
input); a new workflow or a new kind of bad input is a new row.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, bundle_run
from meduet.deploy.package import package_bundle

ERROR_PREFIXES = ("MeduetInputError: ", "MeduetConfigError: ", "BundleIntegrityError: ", "MeduetError: ")

# workflow -> (bundle, config, run id); see _args for what each one is given
WORKFLOWS = {
    "vae_train": ("meduet_vae", "train", "training"),
    "vae_inference": ("meduet_vae", "inference", None),
    "vae_encode": ("meduet_vae", "encode", None),
    "seg_train": ("meduet_seg", "train", "training"),
    "seg_inference": ("meduet_seg", "inference", None),
    "seg_evaluate": ("meduet_seg", "evaluate", None),
    "pretrain_train": ("meduet_pretrain", "train", "training"),
    "diffusion_train": ("meduet_diffusion", "train", "training"),
    "diffusion_probe": ("meduet_diffusion", "probe", None),
    "diffusion_interpolate": ("meduet_diffusion", "interpolate", None),
    "diffusion_manipulate": ("meduet_diffusion", "manipulate", None),
    "diffusion_controlnet_infer": ("meduet_diffusion", "controlnet_infer", None),
    "recon_reconstruct": ("meduet_recon", "reconstruct", None),
}
# the workflows on per-case attributes and cohorts (the tiny factors-conditioned SiT and MeDUET encoder)
CODE_WORKFLOWS = ("diffusion_probe", "diffusion_interpolate", "diffusion_manipulate")
IMAGE_WORKFLOWS = ("vae_train", "vae_inference", "vae_encode", "seg_train", "seg_inference")

# (workflow, bad input) -> what the last line must name; "<file>" = the bad file's name
CASES: dict[tuple[str, str], str] = {}
for _wf in IMAGE_WORKFLOWS:
    for _bad in ("truncated", "2d", "4d", "nan", "constant", "missing_file"):
        CASES[(_wf, _bad)] = "<file>"
for _wf in ("seg_train", "seg_evaluate"):
    CASES[(_wf, "label_other_grid")] = "<file>"
    CASES[(_wf, "label_other_affine")] = "<file>"
for _wf in ("vae_train", "vae_encode", "seg_train"):
    CASES[(_wf, "unknown_domain")] = "site9"
for _wf in ("vae_train", "vae_inference", "vae_encode", "seg_train", "seg_evaluate"):
    CASES[(_wf, "empty_datalist")] = "<datalist>"
CASES.update({
    ("vae_train", "wrong_type_override"): "--batch_size",
    ("seg_train", "wrong_type_override"): "--learning_rate",
    ("vae_inference", "wrong_type_override"): "--output_hounsfield",
    ("seg_inference", "wrong_type_override"): "--roi_size",
    ("vae_encode", "wrong_type_override"): "augment_copies",
    ("seg_evaluate", "wrong_type_override"): "max_cases",
    ("vae_encode", "missing_upstream_checkpoint"): "nowhere.pt",
    ("seg_train", "missing_upstream_checkpoint"): "nowhere.pt",
    ("seg_inference", "missing_upstream_checkpoint"): "nowhere.pt",
    ("pretrain_train", "missing_upstream_checkpoint"): "nowhere.json",
    ("diffusion_train", "missing_upstream_checkpoint"): "nowhere.pt",
    ("vae_inference", "another_bundles_checkpoint"): "model.pt",
    ("seg_inference", "another_bundles_checkpoint"): "model.pt",
    ("seg_train", "another_bundles_checkpoint"): "model.pt",
    ("seg_evaluate", "another_bundles_checkpoint"): "model.pt",
    ("vae_encode", "another_bundles_checkpoint"): "model.pt",
    ("vae_inference", "mr_without_modality"): "--preprocessing_args#modality MR",
    ("seg_inference", "mr_without_modality"): "--preprocessing_args#modality MR",
    ("diffusion_probe", "missing_attribute"): "nonexistent",
    ("diffusion_probe", "constant_attribute"): "lesion",
    ("diffusion_manipulate", "missing_attribute"): "nonexistent",
    ("diffusion_manipulate", "constant_attribute"): "lesion",
    ("diffusion_interpolate", "different_subjects"): "--allow_different_subjects True",
    ("diffusion_controlnet_infer", "measurement_shape"): "<file>",
    ("diffusion_controlnet_infer", "measurement_real_kspace"): "<file>",
    ("diffusion_controlnet_infer", "measurement_nan"): "<file>",
    ("diffusion_controlnet_infer", "missing_upstream_checkpoint"): "nowhere.pt",
    ("recon_reconstruct", "measurement_shape"): "<file>",
    ("recon_reconstruct", "measurement_real_kspace"): "<file>",
    ("recon_reconstruct", "measurement_nan"): "<file>",
    ("recon_reconstruct", "measurement_negative_counts"): "<file>",
    ("recon_reconstruct", "measurement_complex_counts"): "<file>",
    ("recon_reconstruct", "missing_upstream_checkpoint"): "nowhere.pt",
})
# a downloaded (packaged) meduet_vae, run with inference.json from inside its folder (a fresh `python -m monai.bundle
# run`, which imports the vendored meduet) and from another folder with --bundle_root (the installed meduet)
PACKAGED = {
    ("packaged_vae_inside", "tampered_model"): "models/model.pt",
    ("packaged_vae_inside", "added_code_file"): "meduet/extra.py",
    ("packaged_vae_outside", "tampered_model"): "models/model.pt",
    ("packaged_vae_outside", "added_code_file"): "meduet/extra.py",
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """One bad file of each kind, made from a tiny phantom (and the tiny brain MR)."""
    out = tmp_path_factory.mktemp("bad_inputs")
    dl = json.loads((tiny_data / "phantoms" / "datalist.json").read_text())
    item = dl["test"][0]
    image = nib.load(tiny_data / "phantoms" / item["image"])
    label = nib.load(tiny_data / "phantoms" / item["label"])
    data = np.asarray(image.dataobj, dtype=np.float32)
    files = {"good_image": tiny_data / "phantoms" / item["image"], "good_label": tiny_data / "phantoms" / item["label"]}

    def save(name: str, array: np.ndarray, affine=image.affine) -> Path:
        nib.save(nib.Nifti1Image(array, affine), out / f"{name}.nii.gz")
        return out / f"{name}.nii.gz"

    raw = files["good_image"].read_bytes()
    (out / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = out / "truncated.nii.gz"
    files["2d"] = save("flat2d", data[:, :, data.shape[2] // 2])
    files["4d"] = save("two_channels", np.stack([data, data], axis=-1))
    nan = data.copy()
    nan[3, 3, 3] = np.nan
    files["nan"] = save("with_nan", nan)
    files["constant"] = save("constant", np.full_like(data, 40.0))
    files["missing_file"] = out / "not_there.nii.gz"
    lab = np.asarray(label.dataobj)
    files["label_other_grid"] = save("label_small_grid", lab[:-4].astype(np.uint8), label.affine)
    shifted = label.affine.copy()
    shifted[:3, 3] += 30.0
    files["label_other_affine"] = save("label_shifted", lab.astype(np.uint8), shifted)
    brain = json.loads((tiny_data / "brain" / "datalist.json").read_text())
    first = next(v for k, v in brain.items() if isinstance(v, list) and v and isinstance(v[0], dict))[0]
    files["mr"] = tiny_data / "brain" / first["image"]
    assert gzip.decompress(raw)  # the good file is readable: the truncated one is bad because it is cut
    # ControlNet inference: an MRI acquisition JSON and k-space files that do not fit it
    shape = [28, 20, 28]
    (out / "acquisition.json").write_text(json.dumps({"modality": "mri", "image_shape": shape, "spacing": [1.5] * 3,
                                                      "mask": "cartesian", "acceleration": 4}))
    files["acquisition"] = out / "acquisition.json"
    kspace = (np.random.default_rng(0).standard_normal(shape) * (1 + 1j)).astype(np.complex64)
    np.save(out / "kspace_other_shape.npy", kspace[:, :, :24])
    np.save(out / "kspace_magnitude.npy", np.abs(kspace))
    kspace[1, 2, 3] = np.nan
    np.save(out / "kspace_nan.npy", kspace)
    files.update(measurement_shape=out / "kspace_other_shape.npy", measurement_real_kspace=out / "kspace_magnitude.npy",
                 measurement_nan=out / "kspace_nan.npy")
    kspace[1, 2, 3] = 0
    np.save(out / "kspace_good.npy", kspace)
    files["good_kspace"] = out / "kspace_good.npy"
    # meduet_recon: PET counts (a PET acquisition JSON) with a negative count, or stored complex
    from meduet.data.measurements import acquisition_from_dict, simulate, write_measurement

    pet = acquisition_from_dict({"modality": "pet", "image_shape": [16, 16, 16], "num_angles": 8, "total_counts": 1e4})
    write_measurement(out / "pet_good.npy", simulate(np.ones((16, 16, 16), np.float32), pet), pet,
                      out / "pet_acquisition.json")
    counts = np.load(out / "pet_good.npy")
    counts[0, 0, 0] = -2.0
    np.save(out / "counts_negative.npy", counts)
    np.save(out / "counts_complex.npy", np.abs(counts).astype(np.complex64))
    files.update(pet_acquisition=out / "pet_acquisition.json", measurement_negative_counts=out / "counts_negative.npy",
                 measurement_complex_counts=out / "counts_complex.npy")
    return files


def _datalist(path: Path, domains: list[str], good: dict, bad: dict | None, empty: bool = False) -> Path:
    """All splits hold [good, bad] (the bad item second, so that inference has written the good one when it
    meets the bad one); validation holds the good item only so a training run meets the bad one in training."""
    items = [] if empty else [good] + ([bad] if bad else [])
    payload = {"domains": domains, "training": items, "validation": [] if empty else [good], "test": items}
    path.write_text(json.dumps(payload))
    return path


def _args(workflow: str, bad: str, files: dict[str, Path], chain: dict[str, Path], tmp: Path) -> tuple[list, Path]:
    """The command-line overrides of one case and the folder where its outputs would go."""
    if workflow in CODE_WORKFLOWS:
        return _code_args(workflow, bad, chain, tmp)
    if workflow == "diffusion_controlnet_infer":
        return _controlnet_args(bad, files, chain, tmp)
    if workflow == "recon_reconstruct":
        return _recon_args(bad, files, chain, tmp)
    domains = json.loads((chain["data"] / "phantoms" / "datalist.json").read_text())["domains"]
    good = {"image": str(files["good_image"]), "label": str(files["good_label"]), "domain": domains[0]}
    badi = dict(good)
    if bad in ("truncated", "2d", "4d", "nan", "constant", "missing_file"):
        badi["image"] = str(files[bad])
    elif bad.startswith("label_"):
        badi["label"] = str(files[bad])
    elif bad == "unknown_domain":
        badi["domain"] = "site9"
    elif bad == "mr_without_modality":
        badi["image"] = str(files["mr"])
    dl = _datalist(tmp / "datalist.json", domains, good, badi if bad not in (
        "wrong_type_override", "missing_upstream_checkpoint", "another_bundles_checkpoint", "empty_datalist") else None,
        empty=bad == "empty_datalist")
    out = tmp / "out"
    vae, pre, seg = (chain[k] / "models" / "model.pt" for k in ("vae", "pretrain", "seg"))
    nowhere = tmp / "nowhere.pt"
    if workflow in ("vae_train", "seg_train", "pretrain_train", "diffusion_train"):
        args = ["--bundle_root", str(out), "--max_epochs", "1"]
        if workflow in ("vae_train", "seg_train"):
            args += ["--datalist", str(dl)]
        if workflow == "seg_train":
            args += ["--vae_ckpt", str(nowhere if bad == "missing_upstream_checkpoint" else pre
                                       if bad == "another_bundles_checkpoint" else vae), "--pretrain_ckpt", str(pre)]
        if workflow == "pretrain_train":
            args += ["--latent_datalist", str(tmp / "nowhere.json")]
        if workflow == "diffusion_train":
            args += ["--latent_datalist", str(chain["latents"]), "--pretrain_ckpt", str(nowhere)]
        if bad == "wrong_type_override":
            args += ["--batch_size", "abc"] if workflow == "vae_train" else ["--learning_rate", "fast"]
        return args, out
    ckpt = {"vae_inference": vae, "vae_encode": vae, "seg_inference": seg, "seg_evaluate": seg}[workflow]
    if bad == "missing_upstream_checkpoint":
        ckpt = nowhere
    elif bad == "another_bundles_checkpoint":
        ckpt = seg if workflow.startswith("vae") else vae
    key = {"vae_inference": "ckpt_path", "seg_inference": "ckpt_path", "vae_encode": "vae_ckpt",
           "seg_evaluate": "seg_ckpt"}[workflow]
    args = ["--datalist", str(dl), f"--{key}", str(ckpt)]
    args += ["--latent_dir" if workflow == "vae_encode" else "--output_dir", str(out)]
    if workflow == "vae_encode":
        args += ["--splits", "['training','test']"]
    if workflow == "seg_evaluate":
        args += ["--split", "test"]
    if bad == "wrong_type_override":
        args += {"vae_inference": ["--output_hounsfield", "yes"], "seg_inference": ["--roi_size", "abc"],
                 "vae_encode": ["--augment_copies", "two"], "seg_evaluate": ["--max_cases", "abc"]}[workflow]
    return args, out


def _code_args(workflow: str, bad: str, chain: dict[str, Path], tmp: Path) -> tuple[list, Path]:
    """probe / interpolate / manipulate on the tiny latents: an attribute no item has, one that is the same on every
    item of the split (the test phantoms all have a lesion), two scans of different subjects."""
    out = tmp / "out"
    args = ["--latent_datalist", str(chain["latents"]), "--pretrain_ckpt", str(chain["pretrain"] / "models/model.pt"),
            "--output_dir", str(out)]
    if workflow == "diffusion_probe":
        args += ["--sources", "['meduet_content']"]
    else:
        args += ["--model_ckpt", str(chain["diffusion"] / "models/model.pt"), "--vae_ckpt",
                 str(chain["vae"] / "models/model.pt"), "--num_steps", "2"]
    attribute = {"missing_attribute": "nonexistent", "constant_attribute": "lesion"}.get(bad)
    if workflow == "diffusion_probe":
        args += ["--attributes", f"['{attribute}']", "--splits", "['test']"]
    elif workflow == "diffusion_manipulate":
        args += ["--attribute", attribute, "--fit_splits", "['test']"]
    else:  # the first scans of the first two cohort subjects
        firsts: dict[str, str] = {}
        for it in json.loads(chain["latents"].read_text())["longitudinal"]:
            firsts.setdefault(it["subject"], Path(it["latent"]).name.replace(".nii.gz", ""))
        a, b = list(firsts.values())[:2]
        args += ["--cases", f"['{a}','{b}']"]
    return args, out


def _controlnet_args(bad: str, files: dict[str, Path], chain: dict[str, Path], tmp: Path) -> tuple[list, Path]:
    """controlnet_infer on the tiny mri ControlNet: a k-space file that does not fit its acquisition JSON, or a
    missing ControlNet checkpoint."""
    out = tmp / "out"
    args = ["--bundle_root", str(chain["controlnet"]), "--latent_datalist", str(chain["latents"]), "--vae_ckpt",
            str(chain["vae"] / "models/model.pt"), "--pretrain_ckpt", str(chain["pretrain"] / "models/model.pt"),
            "--output_dir", str(out), "--num_steps", "2"]
    if bad == "missing_upstream_checkpoint":
        return args + ["--controlnet_ckpt", str(tmp / "nowhere.pt"), "--simulate_from", "test"], out
    return args + ["--measurement", str(files[bad]), "--acquisition", str(files["acquisition"])], out


def _recon_args(bad: str, files: dict[str, Path], chain: dict[str, Path], tmp: Path) -> tuple[list, Path]:
    """meduet_recon's reconstruct.yaml on its tiny pretrained model: a measurement file that does not fit its
    acquisition JSON (k-space shape, real k-space, NaN; PET counts negative or complex), or a missing model.pt."""
    out = tmp / "out"
    args = ["--bundle_root", str(chain["recon"]), "--output_dir", str(out), "--iterations", "2"]
    if bad == "missing_upstream_checkpoint":
        return args + ["--ckpt_path", str(tmp / "nowhere.pt"), "--measurement", str(files["good_kspace"]),
                       "--acquisition", str(files["acquisition"])], out
    acq = files["pet_acquisition" if "counts" in bad else "acquisition"]
    return args + ["--measurement", str(files[bad]), "--acquisition", str(acq)], out


@pytest.fixture(scope="module")
def controlnet_root(tmp_path_factory, sit_factors, tiny_latents, tiny_vae, tiny_pretrain) -> Path:
    """A bundle root with a 1-epoch tiny mri ControlNet on a copy of the tiny factors SiT."""
    import shutil

    root = tmp_path_factory.mktemp("controlnet_bad")
    (root / "models").mkdir()
    shutil.copy2(sit_factors / "models/model.pt", root / "models/model.pt")
    bundle_run("meduet_diffusion", "train", "--bundle_root", str(root), "--latent_datalist", str(tiny_latents),
               "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt", str(tiny_pretrain / "models/model.pt"),
               "--max_epochs", "1", run_id="training",
               extra_configs=("controlnet_train",))
    return root


@pytest.fixture(scope="module")
def chain(tiny_data, tiny_vae, tiny_latents, tiny_pretrain, seg_trained, sit_factors, controlnet_root
          ) -> dict[str, Path]:
    return {"data": tiny_data, "vae": tiny_vae, "latents": tiny_latents, "pretrain": tiny_pretrain, "seg": seg_trained,
            "diffusion": sit_factors, "controlnet": controlnet_root}


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("workflow,bad", sorted(CASES), ids=[f"{w}-{b}" for w, b in sorted(CASES)])
def test_bad_input_is_one_line_naming_it_and_leaves_nothing(workflow, bad, bad_files, request, tmp_path):
    bundle, config, run_id = WORKFLOWS[workflow]
    # meduet_recon needs only its own tiny model, not the image chain
    chain = ({"recon": request.getfixturevalue("recon_trained")} if bundle == "meduet_recon"
             else request.getfixturevalue("chain"))
    args, out = _args(workflow, bad, bad_files, chain, tmp_path)
    proc = bundle_run(bundle, config, *args, run_id=run_id, check=False, timeout=300)
    text = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    assert proc.returncode != 0, f"{workflow} x {bad} exited 0:\n{text[-3000:]}"
    assert "Traceback" not in text, f"{workflow} x {bad} printed a traceback:\n{text[-4000:]}"
    assert last.startswith(ERROR_PREFIXES) and "; " in last, f"{workflow} x {bad}: last line {last!r}"
    named = CASES[(workflow, bad)]
    if named == "<file>":
        named = bad_files[bad].name
    elif named == "<datalist>":
        named = "datalist.json"
    assert named in last, f"{workflow} x {bad}: {named!r} not in the last line {last!r}"
    assert _files_under(out) == [], f"{workflow} x {bad} left {_files_under(out)}"


@pytest.fixture(scope="module")
def packaged_vae(tmp_path_factory, tiny_vae) -> Path:
    """The tiny meduet_vae packaged as users download it (meduet.deploy.package)."""
    return package_bundle(REPO / "bundles/meduet_vae", tmp_path_factory.mktemp("dist"), preset="tiny",
                          models=tiny_vae / "models")


@pytest.mark.parametrize("where,bad", sorted(PACKAGED), ids=[f"{w}-{b}" for w, b in sorted(PACKAGED)])
def test_a_tampered_downloaded_bundle_is_refused_inside_and_outside_its_folder(where, bad, packaged_vae, tiny_data,
                                                                                tmp_path):
    with zipfile.ZipFile(packaged_vae) as zf:
        zf.extractall(tmp_path / "downloaded")
    root = tmp_path / "downloaded" / "meduet_vae"
    if bad == "tampered_model":
        state = torch.load(root / "models/model.pt", weights_only=True)
        first = next(k for k, v in state.items() if torch.is_floating_point(v))
        state[first] = state[first] + 0.01
        torch.save(state, root / "models/model.pt")
    else:
        (root / "meduet/extra.py").write_text("print('not published')\n")
    out = tmp_path / "out"
    args = ["--dataset_dir", str(tiny_data / "phantoms"), "--output_dir", str(out)]
    env = dict(os.environ, MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.pop("MEDUET_SKIP_INTEGRITY", None)
    if where == "packaged_vae_inside":
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *args]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    else:
        proc = bundle_run("meduet_vae", "inference", "--bundle_root", str(root), *args, preset="", check=False,
                          timeout=300)
        assert "--config_file" in " ".join(proc.args)
    text = proc.stdout + proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert last.startswith("BundleIntegrityError: ") and PACKAGED[(where, bad)] in last and "; " in last, last
    assert _files_under(out) == [] and not (root / "eval").exists()


def test_the_readme_lists_exactly_the_matrix():
    """The README's bad-input paragraph names every workflow and every bad input of the matrix."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("<!-- bad-inputs -->"):readme.index("<!-- /bad-inputs -->")]
    for workflow in sorted({w for w, _ in CASES} | {w for w, _ in PACKAGED}):
        assert f"`{workflow}`" in section, workflow
    for bad in sorted({b for _, b in CASES} | {b for _, b in PACKAGED}):
        assert f"`{bad}`" in section, bad
    assert f"{len(CASES) + len(PACKAGED)} cases" in section
