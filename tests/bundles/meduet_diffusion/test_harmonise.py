"""Served harmonisation (configs/harmonise.json, harmonise_eval.yaml) at the tiny preset, run as users do: the site
style bank, one scan (NIfTI or DICOM series) harmonised to a site or a reference scan, written on the input's grid in
HU; the MONAI Label folder's service giving the same volume; the travelling-subject measurement; one-line errors
that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from conftest import REPO, bundle_run, write_ct_series
from meduet import records
from meduet.deploy.monailabel import prepare_monailabel_harmoniser
from meduet.errors import MeduetConfigError
from meduet.losses.diffusion import DiffusionObjective
from meduet.networks.dit import build_dit
from meduet.workflows.diffusion.harmonise import load_harmoniser
from meduet.workflows.diffusion.harmonise_serve import HarmoniseService

ERROR_PREFIXES = ("MeduetInputError: ", "MeduetConfigError: ")
STEPS = ["--num_steps", "4"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data, tiny_vae, tiny_latents, tiny_pretrain, sit_factors) -> dict:
    """The tiny chain's overrides for harmonise.json, with the site style bank written by its run id site_styles
    (into a folder of its own: the shared generator's models/ stay untouched)."""
    root = tmp_path_factory.mktemp("harmonise")
    styles = root / "site_styles.json"
    args = ["--bundle_root", str(sit_factors), "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--pretrain_ckpt",
            str(tiny_pretrain / "models/model.pt"), "--latent_datalist", str(tiny_latents), "--site_styles_file",
            str(styles)]
    bundle_run("meduet_diffusion", "harmonise", *args, run_id="site_styles")
    dl = json.loads((tiny_data / "phantoms/datalist.json").read_text())
    test = [dict(it, image=str(tiny_data / "phantoms" / it["image"]), label=str(tiny_data / "phantoms" / it["label"]))
            for it in dl["test"]]
    return {"args": args, "styles": styles, "root": root, "test": test, "data": tiny_data}


def _harmonise(chain: dict, out: Path, *extra: str, check: bool = True):
    return bundle_run("meduet_diffusion", "harmonise", *chain["args"], "--output_dir", str(out), *STEPS, *extra,
                      check=check)


def _volume(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def test_site_styles_bank(chain, tiny_latents):
    bank = json.loads(chain["styles"].read_text())
    train_sites = {it["domain"] for it in json.loads(Path(tiny_latents).read_text())["training"]}
    assert bank["kind"] == "meduet_site_styles" and bank["split"] == "training"
    assert set(bank["sites"]) == train_sites
    widths = {len(v["style"]) for v in bank["sites"].values()}
    assert len(widths) == 1 and all(v["n"] >= 1 and np.isfinite(v["style"]).all() for v in bank["sites"].values())


def test_harmonised_scan_is_on_the_input_grid_in_hu_and_differs_from_the_round_trip(chain, tmp_path):
    a = next(it for it in chain["test"] if it["domain"] == "site0")
    target = next(s for s in sorted(json.loads(chain["styles"].read_text())["sites"]) if s != a["domain"])
    out = tmp_path / "out"
    _harmonise(chain, out, "--input", a["image"], "--target_site", target)
    _harmonise(chain, out, "--input", a["image"], "--reference", a["image"])  # A's own style: the plain round trip
    name = Path(a["image"]).name[: -len(".nii.gz")]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{name}_to_{target}.nii.gz", f"{name}_to_{name}.nii.gz"])
    src, src_aff = _volume(a["image"])
    harmonised, aff = _volume(out / f"{name}_to_{target}.nii.gz")
    round_trip, _ = _volume(out / f"{name}_to_{name}.nii.gz")
    assert harmonised.shape == src.shape and np.allclose(aff, src_aff, atol=1e-4)
    assert nib.load(str(out / f"{name}_to_{target}.nii.gz")).get_data_dtype() == np.float32
    for vol in (harmonised, round_trip):
        assert np.isfinite(vol).all() and vol.min() >= -175.0 - 1e-3 and vol.max() <= 250.0 + 1e-3
        assert vol.std() > 1.0  # an image, not a constant
    # what a 2-epoch generator can show: the target style reaches the output (its adaLN-zero condition path has
    # barely moved, so the change is tiny; the demo's measured gap closed and anatomy kept are in the docs)
    body = _volume(a["label"])[0] > 0
    assert float(np.abs(harmonised - round_trip)[body].max()) > 0.0


def test_dicom_series_and_monailabel_folder_serve_the_same_volume(chain, tiny_vae, tiny_pretrain, sit_factors,
                                                                   tmp_path):
    a = chain["test"][0]
    vol, _ = _volume(a["image"])
    series = write_ct_series(vol, tmp_path / "series")
    out = tmp_path / "out"
    _harmonise(chain, out, "--input", str(series), "--target_site", "site1")
    served = out / "series_to_site1.nii.gz"
    harmonised, aff = _volume(served)
    ref = LoadImage(image_only=True)(str(series))
    assert harmonised.shape == tuple(ref.shape) and np.allclose(aff, np.asarray(ref.affine), atol=1e-3)
    # the MONAI Label folder (its own copy of every checkpoint and the bank) through the library's service
    folder = prepare_monailabel_harmoniser(REPO / "bundles/meduet_diffusion", tmp_path / "app/model/meduet_harmonise",
                                           model=str(sit_factors / "models/model.pt"),
                                           vae=str(tiny_vae / "models/model.pt"),
                                           pretrain=str(tiny_pretrain / "models/model.pt"),
                                           site_styles=str(chain["styles"]))
    assert not (folder / "configs/inference.json").exists()
    service = HarmoniseService(folder / "configs/harmonise.json", bundle_root=folder, num_steps=4)
    assert service.known_sites() == sorted(json.loads(chain["styles"].read_text())["sites"])
    again = service(series, tmp_path / "again.nii.gz", target_site="site1")
    np.testing.assert_allclose(_volume(again)[0], harmonised, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_travelling_subjects_evaluation(chain, tmp_path):
    out = tmp_path / "eval"
    bundle_run("meduet_diffusion", "harmonise_eval", *chain["args"], "--dataset_dir", str(chain["data"] / "phantoms"), "--output_dir", str(out), "--max_sources", "2",
               "--num_steps", "3")
    res = json.loads((out / "harmonise_eval.json").read_text())
    assert res["method"] == "rflow inversion" and res["sources"] == 2 and res["rows"]
    for row in res["rows"]:
        assert row["site_from"] != row["site_to"] and row["d_source"] > 0
        assert all(np.isfinite(row[k]) for k in ("gap_closed", "gap_closed_vs_rec", "anatomy_kept", "vae_ceiling"))
    summary = res["all"]
    assert summary["pairs"] == len(res["rows"])
    for key in ("gap_closed", "anatomy_kept"):
        low, high = summary[f"{key}_ci95"]
        assert low <= summary[key] <= high
    assert set(res["by_target"]) <= {"bank", "heldout"}
    assert (out / "harmonise_eval.png").stat().st_size > 0 and "gap_closed" in (out / "harmonise_eval.md").read_text()


def _generator(tmp_path: Path, sit_factors: Path, condition: str, objective: str | None = None) -> Path:
    """A generator conditioned on ``condition`` (weights untrained; its record and the code paths matter here)."""
    ref = records.load(sit_factors / "models/model.pt", expect="dit")
    extra = {"num_domains": len(ref.meta["domains"])} if condition == "metadata" else {}
    net = build_dit("tiny", input_size=ref.arch["input_size"], condition=condition,
                    num_train_timesteps=ref.arch["num_train_timesteps"], **extra)
    net.meta = dict(ref.meta, condition=condition)
    if objective:
        net.meta["objective"] = DiffusionObjective.from_config(objective).config()
    path = tmp_path / f"{condition}.pt"
    torch.save(net.state_dict(), path)
    return path


def test_metadata_ddpm_generator_takes_the_site_and_sdedit(chain, tiny_vae, sit_factors, tmp_path):
    """A DiT conditioned on the site (untrained: the code path, not the quality): the trained sites are the known
    ones, SDEdit re-renders the scan on its grid, a reference scan is refused (it gives such a generator no style)."""
    h = load_harmoniser(str(_generator(tmp_path, sit_factors, "metadata", "ddpm")), str(tiny_vae / "models/model.pt"))
    held = set(h.record.get("heldout_domains") or [])
    assert h.known_sites() == [d for d in h.record["domains"] if d not in held] and h.site_styles is None
    x = h.load_transforms()({"image": chain["test"][0]["image"]})["image"].as_tensor()[None]
    y = h.harmonise(x, h.known_sites()[-1], source_site=h.known_sites()[0], num_steps=3, strength=0.5)
    assert y.shape == x.shape and torch.isfinite(y).all() and 0.0 <= float(y.min()) <= float(y.max()) <= 1.0
    with pytest.raises(MeduetConfigError, match="reference scan gives it no style"):
        h.harmonise(x, None, reference=torch.zeros(1, 4))
    with pytest.raises(MeduetConfigError, match="unknown target_site 'site9'; known sites"):
        h.harmonise(x, "site9")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, chain) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bad_harmonise")
    good = Path(chain["test"][0]["image"])
    image = nib.load(str(good))
    data = np.asarray(image.dataobj, dtype=np.float32)
    raw = good.read_bytes()
    (out / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(data[:, :, data.shape[2] // 2], image.affine), out / "flat2d.nii.gz")
    nan = data.copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), out / "with_nan.nii.gz")
    nib.save(nib.Nifti1Image(np.clip(data, 0, None) + 10.0, image.affine), out / "mr_like.nii.gz")
    return {"good": good, "truncated": out / "truncated.nii.gz", "2d": out / "flat2d.nii.gz",
            "nan": out / "with_nan.nii.gz", "mr": out / "mr_like.nii.gz"}


BAD = {  # case -> (overrides builder, what the last line must contain)
    "unknown_site": (lambda c, b, t: ["--input", str(b["good"]), "--target_site", "site9"],
                     "unknown target_site 'site9'; known sites: site0"),
    "no_target": (lambda c, b, t: ["--input", str(b["good"])], "name either a target_site"),
    "condition_none": (lambda c, b, t: ["--input", str(b["good"]), "--target_site", "site1", "--ckpt_path",
                                        str(t["none"])], "unconditional generator"),
    "condition_semantic": (lambda c, b, t: ["--input", str(b["good"]), "--target_site", "site1", "--ckpt_path",
                                            str(t["semantic"])], "conditioned on 'semantic'"),
    "missing_vae": (lambda c, b, t: ["--input", str(b["good"]), "--target_site", "site1", "--vae_ckpt",
                                     str(t["nowhere"])], "nowhere.pt' does not exist; train meduet_vae"),
    "missing_pretrain": (lambda c, b, t: ["--input", str(b["good"]), "--target_site", "site1", "--pretrain_ckpt",
                                          str(t["nowhere"])], "nowhere.pt' does not exist; train meduet_pretrain"),
    "truncated": (lambda c, b, t: ["--input_data", f"[{{'image': '{b['good']}'}}, {{'image': '{b['truncated']}'}}]",
                                   "--target_site", "site1"], "truncated.nii.gz"),
    "2d": (lambda c, b, t: ["--input", str(b["2d"]), "--target_site", "site1"], "flat2d.nii.gz"),
    "nan": (lambda c, b, t: ["--input", str(b["nan"]), "--target_site", "site1"], "with_nan.nii.gz"),
    "mr_in_ct_chain": (lambda c, b, t: ["--input", str(b["mr"]), "--target_site", "site1"], "mr_like.nii.gz"),
    "mr_override": (lambda c, b, t: ["--input", str(b["mr"]), "--target_site", "site1",
                                     "--preprocessing_args#modality", "MR"], "trained on CT scans"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, chain, bad_inputs, sit_factors, tmp_path):
    others = {"none": _generator(tmp_path, sit_factors, "none"), "nowhere": tmp_path / "nowhere.pt"}
    if case == "condition_semantic":
        others["semantic"] = _generator(tmp_path, sit_factors, "semantic")
    build, named = BAD[case]
    out = tmp_path / "out"
    proc = _harmonise(chain, out, *build(chain, bad_inputs, others), check=False)
    text = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    assert proc.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-4000:]
    assert last.startswith(ERROR_PREFIXES) and "; " in last and named in last, last
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))
