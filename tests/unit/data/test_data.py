"""Tests for meduet.data: sample generator, datalists, input checks, transform chains.

Small sample data (32^3, 8 subjects, 4 sites) is generated once per module into a temporary folder.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from meduet.data.datalist import get_split, load_datalist, write_datalist
from meduet.data.sample import main as sample_main
from meduet.errors import MeduetInputError

SMALL = ["--size", "32", "--subjects", "8", "--sites", "4", "--no-brain"]


def _array(path: str) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _save(path, data, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _assert_one_line(excinfo, *names: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for name in names:
        assert os.path.basename(str(name)) in msg, msg


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "sample"
    assert sample_main(["--out", str(out), "--seed", "0", *SMALL]) == 0
    return str(out)


@pytest.fixture(scope="module")
def phantoms(sample) -> dict:
    return load_datalist(os.path.join(sample, "phantoms", "datalist.json"))


# ------------------------------------------------------------------------------------------------ sample data
def test_datalist_validates_and_resolves(sample, phantoms):
    raw = json.load(open(os.path.join(sample, "phantoms", "datalist.json")))
    assert raw["domains"] == ["site0", "site1", "site2", "site3"]
    assert raw["heldout_domains"] == ["site3"]
    assert raw["modality"] == "CT"
    assert raw["labels"] == {"0": "background", "1": "body", "2": "organ_a", "3": "organ_b", "4": "lesion"}
    for split in ("training", "validation", "test"):
        assert phantoms[split], split
        for raw_item, item in zip(raw[split], phantoms[split]):
            assert not os.path.isabs(raw_item["image"])  # stored relative to the datalist
            assert os.path.isabs(item["image"]) and os.path.isfile(item["image"])
            assert os.path.isfile(item["label"])
            assert item["domain_index"] == raw["domains"].index(item["domain"])
            assert item["subject"] == raw_item["subject"]  # extra keys kept
    assert get_split(os.path.join(sample, "phantoms", "datalist.json"), "test") == phantoms["test"]


def test_splits(phantoms):
    heldout = set(phantoms["heldout_domains"])
    seen = set(phantoms["domains"]) - heldout
    subjects = {s: {it["subject"] for it in phantoms[s]} for s in ("training", "validation", "test")}
    assert not subjects["training"] & subjects["validation"]
    assert not (subjects["training"] | subjects["validation"]) & subjects["test"]
    for split in ("training", "validation"):
        assert {it["domain"] for it in phantoms[split]} <= seen  # held-out sites never trained on
        assert len(phantoms[split]) == len(subjects[split])  # one rendering per subject
    assert {it["domain"] for it in phantoms["training"]} == seen  # balanced: every seen site is used
    for subject in subjects["test"]:
        sites = {it["domain"] for it in phantoms["test"] if it["subject"] == subject}
        assert sites == set(phantoms["domains"])


def test_phantom_files(phantoms):
    item = phantoms["training"][0]
    img, lab = nib.load(item["image"]), nib.load(item["label"])
    assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
    assert img.shape == lab.shape == (32, 32, 32)
    np.testing.assert_allclose(img.affine, lab.affine)
    np.testing.assert_allclose(np.diag(img.affine)[:3], [1.5, 1.5, 1.5])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.any(img.affine[:3, 3] != 0)
    labels = set()
    for it in phantoms["training"] + phantoms["validation"]:
        labels |= set(np.unique(_array(it["label"])).tolist())
    assert len(labels) >= 4 and labels <= {0, 1, 2, 3, 4}


def test_style_differs_content_same(phantoms):
    subject = phantoms["test"][0]["subject"]
    items = [it for it in phantoms["test"] if it["subject"] == subject]
    assert len({it["label"] for it in items}) == 1  # one label map (content) per subject
    label = _array(items[0]["label"])
    a, b = _array(items[0]["image"]), _array(items[1]["image"])
    assert items[0]["domain"] != items[1]["domain"]
    z_max = 0.0
    for c in np.unique(label)[1:]:
        ra, rb = a[label == c], b[label == c]
        se = np.sqrt(ra.var() / ra.size + rb.var() / rb.size)
        z_max = max(z_max, abs(ra.mean() - rb.mean()) / se)
    assert z_max > 10.0  # some region's mean differs far beyond sampling noise: the styles differ
    # ... while the content is the same: class means of this label map explain both images far better than
    # those of another subject's label map would
    other = _array(phantoms["training"][0]["label"])
    for img in (a, b):
        assert _explained(img, label) > _explained(img, other) + 0.1


def _explained(img: np.ndarray, label: np.ndarray) -> float:
    """R^2 inside the body of the piecewise-constant fit 'mean intensity per label class'."""
    inside = label > 0
    fitted = np.zeros_like(img)
    for c in np.unique(label[inside]):
        fitted[label == c] = img[label == c].mean()
    x, f = img[inside], fitted[inside]
    return float(1.0 - ((x - f) ** 2).sum() / ((x - x.mean()) ** 2).sum())


def test_determinism_and_rerun(tmp_path, sample, phantoms, capsys):
    again, other = tmp_path / "again", tmp_path / "other"
    assert sample_main(["--out", str(again), "--seed", "0", *SMALL]) == 0
    assert sample_main(["--out", str(other), "--seed", "1", *SMALL]) == 0
    root = os.path.join(sample, "phantoms")
    for it in phantoms["training"][:2] + phantoms["test"][:2]:
        for key in ("image", "label"):
            rel = os.path.relpath(it[key], root)
            np.testing.assert_array_equal(_array(it[key]), _array(str(again / "phantoms" / rel)))
    assert json.load(open(again / "phantoms" / "datalist.json")) == json.load(open(os.path.join(root, "datalist.json")))
    lab0, lab1 = (_array(str(d / "phantoms" / "labels" / "s000.nii.gz")) for d in (again, other))
    assert not np.array_equal(lab0, lab1)

    # same parameters: nothing to do, files untouched; --force regenerates atomically
    stamp = os.stat(again / "sample.json").st_mtime_ns
    capsys.readouterr()
    assert sample_main(["--out", str(again), "--seed", "0", *SMALL]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(again / "sample.json").st_mtime_ns == stamp
    assert sample_main(["--out", str(again), "--seed", "0", "--force", *SMALL]) == 0
    assert os.stat(again / "sample.json").st_mtime_ns != stamp
    assert json.load(open(again / "sample.json"))["params"]["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["again", "other"]  # no temp folders left behind

    # a non-empty folder that the generator did not write is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert sample_main(["--out", str(foreign), *SMALL]) == 2
    assert os.listdir(foreign) == ["keep.txt"]


def test_pretraining_pool_is_unlabeled_seen_sites_and_changes_nothing_else(tmp_path, sample, phantoms):
    out = tmp_path / "pool"
    assert sample_main(["--out", str(out), "--seed", "0", *SMALL, "--pretrain-subjects", "6"]) == 0
    dl = load_datalist(str(out / "phantoms" / "datalist.json"))
    pool = dl["pretraining"]
    assert len(pool) == 6 and all("label" not in it for it in pool)
    seen = [d for d in dl["domains"] if d not in dl["heldout_domains"]]
    counts = {d: sum(it["domain"] == d for it in pool) for d in seen}
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced over the seen sites only
    labelled = {it["subject"] for s in ("training", "validation", "test") for it in dl[s]}
    assert not labelled & {it["subject"] for it in pool}
    assert all(os.path.isfile(it["image"]) and _array(it["image"]).ndim == 3 for it in pool)
    assert not (out / "phantoms" / "labels" / f"{pool[0]['subject']}.nii.gz").exists()
    # the labelled splits are the same files as without the pool
    for s in ("training", "validation", "test"):
        assert [(it["subject"], it["domain"]) for it in dl[s]] == [(it["subject"], it["domain"]) for it in phantoms[s]]
    a, b = phantoms["training"][0], dl["training"][0]
    np.testing.assert_array_equal(_array(a["image"]), _array(b["image"]))
    assert sample_main(["--out", str(tmp_path / "neg"), *SMALL, "--pretrain-subjects", "-1"]) == 2


def test_subjects_too_few_is_input_error(tmp_path):
    assert sample_main(["--out", str(tmp_path / "x"), "--subjects", "2", "--no-brain"]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_brain(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "s"
    argv = ["--out", str(out), "--size", "16", "--subjects", "3", "--sites", "3", "--brain-size", "32"]
    assert sample_main(argv) == 0
    dl = load_datalist(out / "brain" / "datalist.json")
    assert dl["modality"] == "MR" and dl["domains"] == ["mni152"] and dl["validation"] == []
    assert dl["labels"] == {"0": "background", "1": "grey matter", "2": "white matter"}
    item = dl["test"][0]
    img, lab = _array(item["image"]), _array(item["label"])
    assert img.shape == lab.shape == (32, 32, 32)
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    assert np.isfinite(img).all() and img.max() > img.min()
    # the MR chain normalises to [0, 1] and keeps the labels
    from meduet.data.transforms import get_load_transforms

    out_item = get_load_transforms("MR", spacing=None)(item)
    assert 0.0 <= float(out_item["image"].min()) and float(out_item["image"].max()) <= 1.0
    assert set(np.unique(out_item["label"].numpy()).tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------ transforms
def test_ct_load_chain(phantoms):
    import torch

    from meduet.data.transforms import get_load_transforms

    item = phantoms["test"][0]
    file_aff = torch.as_tensor(nib.load(item["image"]).affine, dtype=torch.float64)
    out = get_load_transforms("CT")(item)
    img, lab = out["image"], out["label"]
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape == lab.shape
    assert all(s % 4 == 0 for s in img.shape[1:])
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.max()) > 0.1
    assert set(np.unique(lab.numpy()).tolist()) <= {0, 1, 2, 3, 4}
    assert out["domain_index"] == item["domain_index"] and out["subject"] == item["subject"]
    # crop/pad shift the origin by whole voxels only; the axes stay the file's
    aff = img.affine.double()
    torch.testing.assert_close(aff[:3, :3], file_aff[:3, :3])
    shift = torch.linalg.solve(file_aff[:3, :3], aff[:3, 3] - file_aff[:3, 3])
    torch.testing.assert_close(shift, shift.round(), atol=1e-4, rtol=0)
    torch.testing.assert_close(lab.affine.double(), aff)

    # no crop, grid already RAS at 1.5 mm and divisible by 4: the affine is the file's exactly
    full = get_load_transforms("CT", crop_foreground=False)(item)
    assert tuple(full["image"].shape[1:]) == (32, 32, 32)
    torch.testing.assert_close(full["image"].affine.double(), file_aff)

    # items without a label are fine
    no_label = {k: v for k, v in item.items() if k != "label"}
    assert "label" not in get_load_transforms("CT")(no_label)


def test_ct_body_crop_does_not_depend_on_the_site(phantoms):
    """The same anatomy rendered by every site (different blur, noise, bias, tissue values) gets the same crop:
    the field of view must not tell the site apart. A crop at the window floor (-175 HU, the old default, still
    reachable with foreground_threshold=0) does move with the site on these phantoms."""
    from meduet.data.transforms import get_load_transforms

    by_subject: dict = {}
    for it in phantoms["test"]:
        by_subject.setdefault(it["subject"], []).append(it)
    body, floor = get_load_transforms("CT"), get_load_transforms("CT", foreground_threshold=0.0)
    floor_shapes = set()
    for items in by_subject.values():
        assert len(items) == len(phantoms["domains"])
        outs = [body(it) for it in items]
        assert len({tuple(o["image"].shape) for o in outs}) == 1
        for o in outs[1:]:  # the same box up to one voxel (1.5 mm) where noise touches the body edge
            np.testing.assert_allclose(o["image"].affine.numpy(), outs[0]["image"].affine.numpy(), atol=1.5)
        floor_shapes |= {(items[0]["subject"], tuple(floor(it)["image"].shape)) for it in items}
    assert len(floor_shapes) > len(by_subject)  # the window-floor crop varies with the site for some subject


def test_train_crops(phantoms):
    import torch

    from meduet.data.transforms import get_load_transforms, get_train_crop_transforms

    item = get_load_transforms("CT")(phantoms["training"][0])
    crops = get_train_crop_transforms((16, 16, 16), num_samples=3, seed=0)(item)
    assert len(crops) == 3
    for c in crops:
        assert c["image"].shape == c["label"].shape == (1, 16, 16, 16)
        assert hasattr(c["image"], "affine")
    again = get_train_crop_transforms((16, 16, 16), num_samples=3, seed=0)(item)
    for c, d in zip(crops, again):
        torch.testing.assert_close(c["image"].as_tensor(), d["image"].as_tensor())
    one = get_train_crop_transforms((48, 48, 48), seed=1)(item)  # larger than the volume: padded first
    assert one["image"].shape == (1, 48, 48, 48)


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases(tmp_path) -> dict[str, tuple[str, str | None, dict]]:
    """name -> (image path, label path or None, check_image kwargs); every case must be rejected."""
    rng = np.random.default_rng(0)
    good = rng.normal(size=(8, 8, 8)).astype(np.float32)
    img = _save(tmp_path / "good.nii.gz", good)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.nii.gz"
    _save(tmp_path / "full.nii.gz", rng.normal(size=(16, 16, 16)).astype(np.float32))
    truncated.write_bytes((tmp_path / "full.nii.gz").read_bytes()[:3000])
    nan, inf = good.copy(), good.copy()
    nan[1, 2, 3] = np.nan
    inf[3, 2, 1] = np.inf
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 0.0, 5.0]
    return {
        "missing": (str(tmp_path / "missing.nii.gz"), None, {}),
        "garbage": (str(garbage), None, {}),
        "truncated": (str(truncated), None, {}),
        "2d": (_save(tmp_path / "slice2d.nii.gz", good[:, :, 0]), None, {}),
        "4d": (_save(tmp_path / "multi4d.nii.gz", np.stack([good, good + 1], -1)), None, {"expected_channels": 1}),
        "nan": (_save(tmp_path / "nan.nii.gz", nan), None, {}),
        "inf": (_save(tmp_path / "inf.nii.gz", inf), None, {}),
        "constant": (_save(tmp_path / "const.nii.gz", np.full((8, 8, 8), 7.0, np.float32)), None, {}),
        "zeros": (_save(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8), np.float32)), None, {}),
        "label_shape": (img, _save(tmp_path / "lab_shape.nii.gz", np.zeros((8, 8, 6), np.uint8)), {}),
        "label_affine": (img, _save(tmp_path / "lab_affine.nii.gz", np.zeros((8, 8, 8), np.uint8), shifted), {}),
        "label_float": (img, _save(tmp_path / "lab_float.nii.gz", good), {}),
        "label_missing": (img, str(tmp_path / "no_label.nii.gz"), {}),
    }


CASES = ["missing", "garbage", "truncated", "2d", "4d", "nan", "inf", "constant", "zeros",
         "label_shape", "label_affine", "label_float", "label_missing"]


@pytest.mark.parametrize("case", CASES)
def test_check_image_rejects(tmp_path, case):
    from meduet.data.checks import check_image

    image, label, kwargs = _bad_cases(tmp_path)[case]
    with pytest.raises(MeduetInputError) as excinfo:
        check_image(image, label, **kwargs)
    offending = label if case.startswith("label") else image
    _assert_one_line(excinfo, offending)
    if case in ("label_shape", "label_affine"):
        _assert_one_line(excinfo, offending, image)  # grid mismatches name both files


@pytest.mark.parametrize("case", CASES)
def test_load_chain_rejects(tmp_path, case):
    """The same bad inputs through the MONAI chain: the error surfaces unwrapped, naming the file."""
    from meduet.data.transforms import get_load_transforms

    image, label, kwargs = _bad_cases(tmp_path)[case]
    item = {"image": image, "domain": "site0", **({"label": label} if label else {})}
    chain = get_load_transforms("CT", expected_channels=kwargs.get("expected_channels"))
    with pytest.raises(MeduetInputError) as excinfo:
        chain(item)
    _assert_one_line(excinfo, label if case.startswith("label") else image)


def test_check_image_accepts(tmp_path):
    from meduet.data.checks import check_image

    data = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    info = check_image(_save(tmp_path / "a.nii.gz", data[..., None], aff),  # trailing singleton 4th axis
                       _save(tmp_path / "l.nii.gz", (data > 0).astype(np.float32), aff), expected_channels=1)
    assert info["shape"] == (8, 9, 10) and info["channels"] == 1 and info["label_values"] == [0, 1]
    np.testing.assert_allclose(info["spacing"], [0.8, 0.8, 2.0])
    assert check_image(_save(tmp_path / "m.nii.gz", np.stack([data, data * 2], -1)))["channels"] == 2


def _write_dl(path, items, domains=("site0", "site1")) -> str:
    write_datalist(path, {"domains": list(domains), "training": items})
    return str(path)


def test_datalist_errors(tmp_path, sample):
    img = _save(tmp_path / "img.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 8)))
    dl = _write_dl(tmp_path / "dl.json", [{"image": "img.nii.gz", "domain": "site0"}])
    assert load_datalist(dl)["training"][0]["image"] == img

    bad_domain = _write_dl(tmp_path / "bad_domain.json", [{"image": "img.nii.gz", "domain": "site9"}])
    with pytest.raises(MeduetInputError) as excinfo:
        load_datalist(bad_domain)
    _assert_one_line(excinfo, bad_domain)
    assert "site9" in str(excinfo.value) and "site0" in str(excinfo.value) and "site1" in str(excinfo.value)

    items = [{"image": "img.nii.gz", "domain": "site0"}] * 3 + [{"image": "gone.nii.gz", "domain": "site1"}]
    missing = _write_dl(tmp_path / "missing.json", items)
    with pytest.raises(MeduetInputError) as excinfo:
        get_split(missing, "training")
    _assert_one_line(excinfo, missing, "gone.nii.gz")
    assert "item 3 of 'training'" in str(excinfo.value) and "meduet.data.sample" in str(excinfo.value)
    assert len(load_datalist(missing, check_files=False)["training"]) == 4

    for name, payload in {
        "no_domains.json": {"training": []},
        "dup_domains.json": {"domains": ["a", "a"], "training": []},
        "no_image.json": {"domains": ["a"], "training": [{"label": "x", "domain": "a"}]},
        "not_json.json": None,
    }.items():
        path = tmp_path / name
        if payload is None:
            path.write_text("{not json")
        else:
            write_datalist(path, payload)
        with pytest.raises(MeduetInputError) as excinfo:
            load_datalist(path)
        _assert_one_line(excinfo, name)
    with pytest.raises(MeduetInputError) as excinfo:
        load_datalist(tmp_path / "nowhere.json")
    _assert_one_line(excinfo, "nowhere.json")
    with pytest.raises(MeduetInputError) as excinfo:
        get_split(dl, "validation")
    _assert_one_line(excinfo, "dl.json")
    empty = tmp_path / "empty.json"
    write_datalist(empty, {"domains": ["site0"], "training": [], "validation": []})
    assert load_datalist(empty)["training"] == []
    with pytest.raises(MeduetInputError) as excinfo:  # an empty split would fail in a sampler ("num_samples=0")
        get_split(empty, "training")
    _assert_one_line(excinfo, "empty.json", "'training' has no items", "--train_split")


def test_write_datalist_atomic(tmp_path):
    path = tmp_path / "sub" / "d.json"
    write_datalist(path, {"domains": ["a"], "training": []})
    with pytest.raises(TypeError):
        write_datalist(path, {"domains": ["a"], "bad": object()})
    assert json.load(open(path)) == {"domains": ["a"], "training": []}  # previous content intact
    assert os.listdir(tmp_path / "sub") == ["d.json"]  # no temp file left


def test_dataset_error_can_be_unwrapped(tmp_path):
    """A MONAI Dataset wraps the chain's error once more; find_input_error recovers the one-line message."""
    from monai.data import Dataset

    from meduet.data.checks import find_input_error
    from meduet.data.transforms import get_load_transforms

    bad = _save(tmp_path / "nan_in_dataset.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    ds = Dataset([{"image": bad, "domain": "site0"}], transform=get_load_transforms("CT"))
    with pytest.raises(Exception) as excinfo:
        ds[0]
    err = find_input_error(excinfo.value)
    assert isinstance(err, MeduetInputError) and "nan_in_dataset.nii.gz" in str(err) and "\n" not in str(err)


def test_dicom_series_folder(tmp_path):
    itk = pytest.importorskip("itk")
    from meduet.data.checks import check_image
    from meduet.data.transforms import get_load_transforms

    arr = (np.random.default_rng(0).normal(size=(6, 10, 12)) * 100).astype(np.int16)  # ITK order: z, y, x
    series = tmp_path / "series"
    series.mkdir()
    img = itk.image_from_array(arr)
    img.SetSpacing([0.8, 0.9, 2.0])
    names = [str(series / f"{i:03d}.dcm") for i in range(arr.shape[0])]
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New(
        Input=img, FileNames=names, ImageIO=itk.GDCMImageIO.New()
    )
    writer.Update()
    info = check_image(series)
    assert info["shape"] == (12, 10, 6)
    out = get_load_transforms("CT", spacing=None, crop_foreground=False, pad_multiple=None)({"image": str(series)})
    assert out["image"].shape == (1, 12, 10, 6)

    broken = tmp_path / "broken_series"
    broken.mkdir()
    (broken / "a.dcm").write_bytes(b"not a dicom file" * 100)
    with pytest.raises(MeduetInputError) as excinfo:
        check_image(broken)
    _assert_one_line(excinfo, broken)


# ------------------------------------------------------------------------------------------------ DICOM SEG output
# Source series are written here with pydicom in a chosen orientation; where each label lands is worked out from
# that geometry in the test (slice index k, row r, column c of the source), never with meduet.data.dicom.

SEG_ROWS, SEG_COLS, SEG_SLICES = 7, 9, 5
SEG_SPACING = (0.8, 1.1, 2.5)  # between rows, between columns, between slices (mm)
SEG_ORIENTATIONS = {  # ImageOrientationPatient: direction of increasing column index, of increasing row index (LPS)
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
SEG_ORIGIN = (-12.0, 30.5, 101.25)  # LPS position of slice 0, row 0, column 0
SEG_LABELS = {"0": "background", "1": "body", "2": "organ_a", "3": "organ_b", "4": "lesion", "5": "thing_x"}


def _oriented_series(folder, orientation: str) -> tuple[list[str], np.ndarray]:
    """Write a CT series of ``SEG_SLICES`` slices (``SEG_ROWS`` x ``SEG_COLS``) in ``orientation``; slice k lies at
    ``SEG_ORIGIN + k * dz * normal``. Files are named and numbered in a shuffled order, so only the geometry tells
    the slices apart. Returns the SOP instance UID of every slice index and the slice normal (row x column)."""
    from pydicom.uid import generate_uid

    from conftest import write_ct_slice

    row_dir, col_dir = (np.asarray(v) for v in SEG_ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    dr, dc, dz = SEG_SPACING
    folder.mkdir(parents=True)
    series_uids = (generate_uid(), generate_uid(), generate_uid())
    rng = np.random.default_rng(3)
    order = rng.permutation(SEG_SLICES)
    uids = []
    for k in range(SEG_SLICES):
        sop = write_ct_slice(folder / f"im{order[k]:03d}.dcm", rng.integers(-100, 100, (SEG_ROWS, SEG_COLS)),
                             uids=series_uids, position=np.asarray(SEG_ORIGIN) + k * dz * normal, row_dir=row_dir,
                             col_dir=col_dir, pixel_spacing=(dr, dc), thickness=dz, instance=int(order[k]) + 1)
        uids.append(sop)
    return uids, normal


def _source_labels() -> np.ndarray:
    """The labels as the test places them on the source: ``(slice, row, column)``; slice 4 is empty, class 3
    (organ_b) is absent, class 4 touches the last row and column, class 5 the first pixel of the first slice."""
    lab = np.zeros((SEG_SLICES, SEG_ROWS, SEG_COLS), np.uint8)
    lab[1:4, 1:6, 2:8] = 1
    lab[2, 2:4, 3:5] = 2
    lab[3, 4, 6] = 4
    lab[0, SEG_ROWS - 1, SEG_COLS - 1] = 4
    lab[0, 0, 0] = 5
    return lab


def _reader_volume(lab: np.ndarray, orientation: str, perm: tuple[int, int, int],
                   flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """``lab`` (slice, row, column) as a reader might hold it: axes (column, row, slice) permuted by ``perm`` and
    flipped, with the RAS affine of that array built from the series geometry."""
    row_dir, col_dir = (np.asarray(v) for v in SEG_ORIENTATIONS[orientation])
    dr, dc, dz = SEG_SPACING
    vol = lab.transpose(2, 1, 0)  # (column, row, slice)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = dc * row_dir, dr * col_dir, dz * np.cross(row_dir, col_dir)
    lps[:3, 3] = SEG_ORIGIN
    vol, lps[:3, :3] = vol.transpose(perm), lps[:3, list(perm)]
    for axis, flip in enumerate(flips):
        if flip:  # new index i' = n - 1 - i
            vol = np.flip(vol, axis)
            lps[:3, 3] += (vol.shape[axis] - 1) * lps[:3, axis]
            lps[:3, axis] *= -1
    return np.ascontiguousarray(vol), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _seg_frames(path) -> list[tuple[int, np.ndarray, str, np.ndarray]]:
    """(segment number, ImagePositionPatient, referenced SOP instance UID, pixels) of every frame of a SEG file."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = []
    for group, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out.append((number, ipp, uid, frame))
    return out


# longer than a DICOM LO (64 characters): the SEG carries its first 64
LONG_DESCRIPTION = "the larger organ of the synthetic phantom, which holds one to three small spherical lesions"
SEG_CODES = {  # the metadata's label_codes in the tests: explicit codes for two labels, the rest by name
    "organ_a": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"],
                "description": LONG_DESCRIPTION},
    "organ_b": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["64033007", "SCT", "Kidney"],
                "description": "the smaller organ"},
    "not_predicted": {"category": ["85756007", "SCT", "Tissue"], "type": ["85756007", "SCT", "Tissue"]},
}
SEG_EXPECTED_TYPES = {  # label -> (category value, type value, description)
    "body": ("91723000", "38266002", "body"),  # by name: Anatomical Structure / Entire body
    "organ_a": ("91723000", "10200004", LONG_DESCRIPTION[:64].rstrip()),  # from label_codes, cut to 64
    "organ_b": ("91723000", "64033007", "the smaller organ"),
    "lesion": ("49755003", "52988006", "lesion"),  # by name: Morphologically Abnormal Structure / Lesion
    "thing_x": ("85756007", "85756007", "thing_x"),  # unknown name: generic Tissue, own label and description
}


def test_segment_codings_by_name_and_metadata():
    from meduet.data.dicom import segment_codings
    from meduet.errors import MeduetConfigError

    got = segment_codings(SEG_LABELS, SEG_CODES)
    assert sorted(got) == [1, 2, 3, 4, 5]  # background has no segment
    for index, name in SEG_LABELS.items():
        if index != "0":
            c = got[int(index)]
            assert (c.label, (c.category[0], c.type[0], c.description[:64].rstrip())) == (
                name, SEG_EXPECTED_TYPES[name])
    assert got[2].description == LONG_DESCRIPTION  # the coding keeps it whole; the SEG writer cuts it to 64
    by_name = segment_codings({1: "Lesion2", 2: "liver_lesion", 3: "grey matter", 4: "kidneys", 5: "organ_b",
                               6: "class6", 7: "Body"})
    assert [by_name[i].type[2] for i in range(1, 8)] == [
        "Lesion", "Lesion", "Gray Matter", "Kidney", "Organ", "Tissue", "Entire body"]
    bad = [{"organ_a": {"type": ["1", "SCT", "x"]}}, {"organ_a": {"category": ["1", "SCT"], "type": ["1", "SCT", "x"]}},
           {"organ_a": {"colour": "red"}}, {"organ_a": ["10200004", "SCT", "Liver"]}]
    for codes in bad:
        with pytest.raises(MeduetConfigError) as excinfo:
            segment_codings(SEG_LABELS, codes)
        _assert_one_line(excinfo, "organ_a")


def test_built_in_and_bundle_codes_are_dicom_snomed_concepts():
    """Every code the writer can emit on its own, and every code of meduet_seg's metadata, is a SNOMED CT concept
    of pydicom's table of the DICOM standard's codes, with that meaning."""
    from pydicom.sr.codedict import codes

    from meduet.data.dicom import NAME_CODES, TISSUE, load_metadata, segment_codings

    meanings: dict[str, set[str]] = {}
    for keyword in codes.SCT.dir():
        code = getattr(codes.SCT, keyword)
        meanings.setdefault(code.value, set()).add(code.meaning.lower())
    concepts = {TISSUE} | {c for _, category, prop_type in NAME_CODES for c in (category, prop_type)}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    meta = load_metadata(os.path.join(repo, "bundles", "meduet_seg", "configs", "metadata.json"))
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    bundle = segment_codings(channels, meta["label_codes"])
    assert [c.label for c in bundle.values()] == [channels[k] for k in sorted(channels, key=int) if k != "0"]
    assert set(meta["label_codes"]) == {c.label for c in bundle.values()}
    concepts |= {c for coding in bundle.values() for c in (coding.category, coding.type)}
    for value, scheme, meaning in concepts:
        assert scheme == "SCT" and meaning.lower() in meanings.get(value, set()), (value, meaning)


@pytest.mark.parametrize("orientation, perm, flips", [
    ("axial", (2, 0, 1), (True, False, False)),
    ("sagittal", (0, 1, 2), (False, True, True)),
    ("coronal", (1, 2, 0), (False, False, True)),
])
def test_dicom_seg_frames_lie_on_their_source_slices(tmp_path, orientation, perm, flips):
    """Each SEG frame's position and referenced instance name one source slice (worked out from the geometry the
    test wrote), and its pixels are exactly the labels the test put on that slice; every segment is labelled and
    coded from the metadata."""
    import pydicom

    from meduet.data.dicom import write_dicom_seg

    series = tmp_path / f"series_{orientation}"
    uids, normal = _oriented_series(series, orientation)
    row_dir, col_dir = (np.asarray(v) for v in SEG_ORIENTATIONS[orientation])
    lab = _source_labels()
    vol, affine = _reader_volume(lab, orientation, perm, flips)
    out = write_dicom_seg(vol, affine, series, tmp_path / "seg.dcm", SEG_LABELS, label_codes=SEG_CODES)
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, [*row_dir, *col_dir])
    # segments: the classes present, in class order, each with its own label, description and codes
    present = [name for k, name in sorted(SEG_LABELS.items()) if k != "0" and (lab == int(k)).any()]
    assert present == ["body", "organ_a", "lesion", "thing_x"]
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segments) == list(range(1, len(present) + 1))
    class_of = {}
    for number, s in segments.items():
        name = present[number - 1]
        category, prop_type = s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]
        assert (s.SegmentLabel, (category.CodeValue, prop_type.CodeValue, s.SegmentDescription)) == (
            name, SEG_EXPECTED_TYPES[name])
        assert category.CodingSchemeDesignator == prop_type.CodingSchemeDesignator == "SCT"
        class_of[number] = int(next(k for k, v in SEG_LABELS.items() if v == name))
    assert len({s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments.values()}) == len(segments)
    # frames: which source slice each one is, from its own position, checked against its reference
    dz = SEG_SPACING[2]
    seen = set()
    for number, ipp, uid, pixels in _seg_frames(out):
        offset = ipp - np.asarray(SEG_ORIGIN)
        k = float(offset @ normal) / dz
        assert abs(k - round(k)) < 1e-4 and abs(offset @ row_dir) < 1e-4 and abs(offset @ col_dir) < 1e-4
        k = round(k)
        assert 0 <= k < SEG_SLICES and uid == uids[k]
        np.testing.assert_array_equal(pixels.astype(bool), lab[k] == class_of[number],
                                      err_msg=f"segment {number} on slice {k}")
        assert (number, k) not in seen
        seen.add((number, k))
    wanted = {(n, k) for n, cls in class_of.items() for k in range(SEG_SLICES) if (lab[k] == cls).any()}
    assert wanted <= seen  # every labelled slice of every segment has its frame (others, if any, are empty)


def test_dicom_seg_writer_takes_names_and_codes_from_the_metadata(tmp_path):
    """The inference handler with the bundle metadata (as ``@_meta_`` or a path) and no names from the network:
    segment labels come from the metadata's channel_def, codes and descriptions from its label_codes."""
    from types import SimpleNamespace

    import pydicom
    from monai.data import MetaTensor

    from meduet.data.dicom import DicomSegWriter
    from meduet.errors import MeduetConfigError

    series = tmp_path / "ct"
    _oriented_series(series, "axial")
    lab = _source_labels()
    vol, affine = _reader_volume(lab, "axial", (0, 1, 2), (False, False, False))
    meta = {"label_codes": SEG_CODES, "network_data_format": {"outputs": {"pred": {"channel_def": SEG_LABELS}}}}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    for metadata in (meta, str(path)):
        writer = DicomSegWriter(str(tmp_path / "out"), network=SimpleNamespace(meta={}), metadata=metadata)
        pred = MetaTensor(vol[None], affine=affine, meta={"filename_or_obj": str(series)})
        writer(SimpleNamespace(state=SimpleNamespace(output=[{"pred": pred}])))
        seg = pydicom.dcmread(writer.written[-1])
        got = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                                s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentDescription)
               for s in seg.SegmentSequence}
        assert got == {name: SEG_EXPECTED_TYPES[name] for name in ("body", "organ_a", "lesion", "thing_x")}
    with pytest.raises(MeduetConfigError) as excinfo:  # a malformed entry fails when the handler is built
        DicomSegWriter(str(tmp_path / "out"), metadata={"label_codes": {"tumour": {"type": "108369006"}}})
    _assert_one_line(excinfo, "tumour")


def test_noise_free_phantom_is_the_image_without_its_noise(sample, phantoms):
    from meduet.data.reference import noise_free_phantom

    datalist_file = os.path.join(sample, "phantoms", "datalist.json")
    sites = phantoms["sites"]
    for item in phantoms["test"][:3] + phantoms["training"][:1]:
        img = nib.load(item["image"])
        clean, affine = noise_free_phantom(datalist_file, item)
        np.testing.assert_allclose(affine, img.affine, atol=1e-6)
        noise = np.asarray(img.dataobj, dtype=np.float64) - clean
        want = sites[item["domain"]]["noise_std"]
        assert abs(noise.std() / want - 1.0) < 0.03, (item["image"], noise.std(), want)  # 32^3 voxels: ~0.4 % error
        assert abs(noise.mean()) < 4 * want / np.sqrt(noise.size)
        # white noise: no trace of the anatomy left in it (a shifted or wrong render would leave edges)
        label = _array(item["label"])
        assert abs(np.corrcoef(noise.ravel(), label.ravel())[0, 1]) < 0.05
    with pytest.raises(MeduetInputError) as e:
        noise_free_phantom(os.path.join(sample, "brain", "datalist.json"), {"image": "x", "domain": "mni152"})
    _assert_one_line(e)


def test_noise_free_on_grid_lines_up_with_the_preprocessed_input(sample, phantoms):
    """The evaluate workflow's noise-free reference on the cropped/padded grid differs from the input by noise only."""
    import torch

    from meduet.data import get_load_transforms
    from meduet.workflows.vae.common import load_case
    from meduet.workflows.vae.evaluate import noise_free_on_grid

    datalist_file = os.path.join(sample, "phantoms", "datalist.json")
    prep = dict(modality="CT", spacing=[1.5] * 3, ct_window=[-175.0, 250.0], crop_foreground=True, pad_multiple=8)
    transform = get_load_transforms(**prep, keys=("image", "label"))
    for item in phantoms["test"][:2]:
        x, affine, _ = load_case(transform, item, torch.device("cpu"))
        nf = noise_free_on_grid(datalist_file, item, prep, affine, x.shape[2:])
        assert nf is not None and nf.shape == tuple(x.shape[2:])
        x = x[0, 0].numpy()
        inside = (nf > 0.05) & (nf < 0.95) & (x > 0) & (x < 1)  # unclipped voxels
        want = phantoms["sites"][item["domain"]]["noise_std"] / 425.0
        assert abs((x - nf)[inside].std() / want - 1.0) < 0.08  # off by one voxel: organ edges would swamp this
        shifted = np.roll(nf, 1, axis=0)
        assert (x - shifted)[inside].std() > 1.2 * want
    assert noise_free_on_grid(datalist_file, phantoms["test"][0], dict(prep, modality="MR"), affine, x.shape) is None


def test_modality_check_refuses_an_mr_read_as_ct_and_the_reverse(tmp_path):
    """Inference has no datalist stating the modality: CheckModalityd refuses the wrong one with one line."""
    import nibabel as nib

    from meduet.data.checks import dicom_modality
    from meduet.data.transforms import get_load_transforms
    from conftest import write_ct_series

    rng = np.random.default_rng(0)
    ct = np.full((16, 16, 12), -1000.0, np.float32)
    ct[3:13, 3:13, 2:10] = 40.0 + 10.0 * rng.standard_normal((10, 10, 8))  # tissue in air, HU
    mr = np.clip(300.0 + 80.0 * rng.standard_normal((16, 16, 12)), 0, None).astype(np.float32)  # non-negative
    for name, arr in (("ct.nii.gz", ct), ("mr.nii.gz", mr), ("zscored.nii.gz", (mr - 300.0) / 80.0)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / name)

    def load(modality, name):
        return get_load_transforms(modality, keys=["image"], spacing=None, pad_multiple=None,
                                   modality_check=True)({"image": str(tmp_path / name)})

    assert load("CT", "ct.nii.gz")["image"].shape[0] == 1
    windowed = np.clip(ct, -175.0, 118.0)  # a CT written through a soft-tissue window (e.g. a generated volume)
    nib.save(nib.Nifti1Image(windowed, np.eye(4)), tmp_path / "windowed.nii.gz")
    assert load("CT", "windowed.nii.gz")["image"].shape[0] == 1
    assert load("MR", "mr.nii.gz")["image"].shape[0] == 1
    for name in ("mr.nii.gz", "zscored.nii.gz"):  # no value below -50 HU: not a CT in Hounsfield units
        with pytest.raises(MeduetInputError, match=r"are not a CT in Hounsfield units.*--preprocessing_args#modality MR") as err:
            load("CT", name)
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MeduetInputError, match=r"look like a CT in Hounsfield units.*--preprocessing_args#modality CT"):
        load("MR", "ct.nii.gz")
    # off by default (training reads the modality from its datalist)
    get_load_transforms("CT", keys=["image"], spacing=None, pad_multiple=None)({"image": str(tmp_path / "mr.nii.gz")})
    # a DICOM series: its header decides, whatever the intensities
    soft = (30 + 10 * rng.standard_normal((16, 16, 4))).astype(np.int16)  # soft tissue only, no air
    series = write_ct_series(soft, tmp_path / "series")  # not a CT by its intensities, a CT by its header
    assert dicom_modality(str(series)) == "CT" and dicom_modality(str(tmp_path / "ct.nii.gz")) is None
    assert load("CT", "series")["image"].shape[0] == 1
    with pytest.raises(MeduetInputError, match=r"its DICOM header says CT but this workflow reads it as MR; pass "
                                               r"--preprocessing_args#modality CT"):
        load("MR", "series")
