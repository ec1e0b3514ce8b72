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
