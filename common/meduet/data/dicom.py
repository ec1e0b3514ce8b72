"""Clinical I/O: label maps as DICOM SEG (highdicom) referencing the source CT/MR series.

MONAI reads a DICOM series folder into a volume with an affine (RAS world coordinates); a segmentation predicted
on that grid is written back as a DICOM Segmentation whose frames lie exactly on the source instances: for every
source slice, each pixel's patient position (from ``ImagePositionPatient``, ``ImageOrientationPatient``,
``PixelSpacing``) is mapped through the inverse affine to the label volume's voxel (nearest). This is independent of
how the reader ordered or flipped the axes. Writing is atomic.

Every segment carries its own label, free-text description and coded concept (segmented property category and
type). The codes come from the bundle metadata's ``label_codes`` (``{label name: {"category": [value, scheme,
meaning], "type": [...], "description": "..."}}``) when it names the label, else from the label name through
:data:`NAME_CODES` (SNOMED CT concepts of the DICOM segmentation context groups CID 7150 / 7151 / 7166), else the
generic "Tissue" concept; the segment label is always the class's own name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meduet.errors import MeduetConfigError, MeduetInputError
from meduet.io import atomic_path

__all__ = ["NAME_CODES", "DicomSegWriter", "SegmentCoding", "label_frames", "load_metadata", "read_series",
           "segment_codings", "write_dicom_seg"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS

#: a coded concept: (code value, coding scheme designator, code meaning)
Concept = tuple[str, str, str]

# segmented property categories (CID 7150)
ANATOMICAL_STRUCTURE: Concept = ("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE: Concept = ("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE: Concept = ("85756007", "SCT", "Tissue")

#: label-name keyword -> (category, type). A keyword matches whole words of the lower-cased name (``organ_a`` ->
#: "organ", ``Lesion2`` -> "lesion", ``grey matter``), a plural too; the first match wins: abnormal findings before
#: anatomy (``liver_lesion`` is a lesion), specific structures before the generic "organ" and "body".
NAME_CODES: tuple[tuple[str, Concept, Concept], ...] = (
    ("lesion", ABNORMAL_STRUCTURE, ("52988006", "SCT", "Lesion")),
    ("tumor", ABNORMAL_STRUCTURE, ("108369006", "SCT", "Neoplasm")),
    ("tumour", ABNORMAL_STRUCTURE, ("108369006", "SCT", "Neoplasm")),
    ("neoplasm", ABNORMAL_STRUCTURE, ("108369006", "SCT", "Neoplasm")),
    ("mass", ABNORMAL_STRUCTURE, ("4147007", "SCT", "Mass")),
    ("grey matter", ANATOMICAL_STRUCTURE, ("389081007", "SCT", "Gray Matter")),
    ("gray matter", ANATOMICAL_STRUCTURE, ("389081007", "SCT", "Gray Matter")),
    ("white matter", ANATOMICAL_STRUCTURE, ("389080008", "SCT", "White Matter")),
    ("brain", ANATOMICAL_STRUCTURE, ("12738006", "SCT", "Brain")),
    ("liver", ANATOMICAL_STRUCTURE, ("10200004", "SCT", "Liver")),
    ("spleen", ANATOMICAL_STRUCTURE, ("78961009", "SCT", "Spleen")),
    ("kidney", ANATOMICAL_STRUCTURE, ("64033007", "SCT", "Kidney")),
    ("pancreas", ANATOMICAL_STRUCTURE, ("15776009", "SCT", "Pancreas")),
    ("lung", ANATOMICAL_STRUCTURE, ("39607008", "SCT", "Lung")),
    ("heart", ANATOMICAL_STRUCTURE, ("80891009", "SCT", "Heart")),
    ("fat", TISSUE, ("55603005", "SCT", "Fat")),
    ("organ", ANATOMICAL_STRUCTURE, ("91772007", "SCT", "Organ")),
    ("body", ANATOMICAL_STRUCTURE, ("38266002", "SCT", "Entire body")),
)

_ENTRY_KEYS = ("category", "type", "description")


@dataclass(frozen=True)
class SegmentCoding:
    """What a DICOM SEG says about one class: segment label, description, property category and type."""

    label: str
    description: str
    category: Concept
    type: Concept


def _words(name: str) -> str:
    return " " + " ".join(re.findall(r"[a-z]+", name.lower())) + " "


def _name_codes(name: str) -> tuple[Concept, Concept]:
    """(category, type) of a label name from :data:`NAME_CODES`; generic tissue when no keyword matches."""
    words = _words(name)
    for keyword, category, prop_type in NAME_CODES:
        if f" {keyword} " in words or f" {keyword}s " in words:
            return category, prop_type
    return TISSUE, TISSUE


def _concept(value: Any, where: str) -> Concept:
    """``[value, scheme, meaning]`` or ``{"value", "scheme_designator", "meaning"}`` -> a :data:`Concept`."""
    if isinstance(value, Mapping):
        value = [value.get("value"), value.get("scheme_designator"), value.get("meaning")]
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise MeduetConfigError(f"{where} must be [code value, coding scheme, meaning] (strings), e.g. "
                                f"['52988006', 'SCT', 'Lesion']; got {value!r}")
    return (value[0].strip(), value[1].strip(), value[2].strip())


def segment_codings(labels: Mapping[str | int, str],
                    label_codes: Mapping[str, Any] | None = None) -> dict[int, SegmentCoding]:
    """``{class index: SegmentCoding}`` for the foreground classes of ``labels`` (``{1: "body", ...}``).

    ``label_codes`` (the metadata's ``label_codes``) maps a label *name* to ``{"category": concept, "type":
    concept, "description": str}`` (all optional, but category and type go together); what it does not give comes
    from :data:`NAME_CODES`, and the description defaults to the label name. Entries for names not in ``labels`` are
    ignored (the metadata may describe more classes than a network predicts).
    """
    label_codes = label_codes or {}
    if not isinstance(label_codes, Mapping):
        raise MeduetConfigError(f"label_codes must map label names to codes; got {type(label_codes).__name__}")
    out: dict[int, SegmentCoding] = {}
    for key, name in labels.items():
        index, name = int(key), str(name)
        if index <= 0:
            continue
        entry = label_codes.get(name) or {}
        where = f"label_codes[{name!r}]"
        if not isinstance(entry, Mapping) or set(entry) - set(_ENTRY_KEYS):
            raise MeduetConfigError(f"{where} must be a mapping with keys {list(_ENTRY_KEYS)}; got {entry!r}")
        if ("category" in entry) != ("type" in entry):
            raise MeduetConfigError(f"{where} gives only one of 'category' and 'type'; give both (or neither)")
        if "type" in entry:
            category, prop_type = _concept(entry["category"], f"{where}['category']"), _concept(
                entry["type"], f"{where}['type']")
        else:
            category, prop_type = _name_codes(name)
        description = str(entry.get("description") or name)
        out[index] = SegmentCoding(label=name, description=description, category=category, type=prop_type)
    return out


def load_metadata(metadata: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """A bundle's metadata (``configs/metadata.json``, a path or the parsed mapping, e.g. ``@_meta_``) as a dict;
    ``{}`` for ``None``."""
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return dict(metadata)
    path = Path(metadata)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MeduetConfigError(f"cannot read the bundle metadata '{path}': {e}") from e
    if not isinstance(data, dict):
        raise MeduetConfigError(f"the bundle metadata '{path}' is not a JSON object")
    return data


def _channel_def(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The metadata's ``network_data_format.outputs.pred.channel_def`` (class index -> name), or ``{}``."""
    pred = ((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    return {str(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}


def read_series(folder: str | os.PathLike) -> list[Any]:
    """The image instances of a DICOM series folder (pydicom datasets), sorted along the slice normal."""
    import pydicom

    folder = Path(folder)
    datasets = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - non-DICOM files in the folder are skipped
            continue
        if "ImagePositionPatient" in ds and "PixelData" in ds:
            datasets.append(ds)
    if not datasets:
        raise MeduetInputError(f"'{folder}' holds no DICOM image instances; point the input at a series folder")
    if len({ds.SeriesInstanceUID for ds in datasets}) != 1:
        raise MeduetInputError(f"'{folder}' mixes several DICOM series; give one series per folder")
    ori = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(ori[:3], ori[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def label_frames(label: np.ndarray, affine_ras: np.ndarray, datasets: Sequence[Any]) -> np.ndarray:
    """Sample a label volume ``(X, Y, Z)`` (voxel -> RAS ``affine_ras``) on every source slice's pixel grid ->
    ``(len(datasets), Rows, Columns)`` uint8 (nearest voxel; 0 outside the volume)."""
    label = np.asarray(label)
    inv = np.linalg.inv(_LPS @ np.asarray(affine_ras, dtype=np.float64))  # LPS world -> voxel
    frames = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        ori = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = ori[:3], ori[3:]  # direction of increasing column index, of increasing row index
        dr, dc = (float(v) for v in ds.PixelSpacing)  # spacing between rows, between columns
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        world = (np.asarray(ds.ImagePositionPatient, dtype=np.float64)[None, None, :]
                 + c[..., None] * dc * row_dir + r[..., None] * dr * col_dir)
        idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(label.shape)), axis=-1)
        frame = np.zeros((rows, cols), dtype=np.uint8)
        ii = idx[inside]
        frame[inside] = label[ii[:, 0], ii[:, 1], ii[:, 2]]
        frames.append(frame)
    return np.stack(frames)


def write_dicom_seg(label: np.ndarray, affine_ras: np.ndarray, series_dir: str | os.PathLike,
                    output_path: str | os.PathLike, labels: Mapping[str | int, str],
                    algorithm: str = "meduet_seg", version: str = "0.1.0",
                    label_codes: Mapping[str, Any] | None = None) -> Path:
    """Write ``label`` (class indices on the grid of ``affine_ras``) as a DICOM SEG referencing the series in
    ``series_dir``: one segment per foreground class of ``labels`` (``{1: "body", ...}``) that is present, labelled
    with the class name and coded by :func:`segment_codings` (``label_codes``: the metadata's ``label_codes``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    codings = segment_codings(labels, label_codes)
    datasets = read_series(series_dir)
    frames = label_frames(label, affine_ras, datasets)
    present = [k for k in sorted(codings) if (frames == k).any()]
    if not present:
        raise MeduetInputError(f"no foreground class in the prediction for '{series_dir}'; nothing to write as SEG")
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                              family=codes.cid7162.ArtificialIntelligence)
    segments = []
    for i, k in enumerate(present):
        coding = codings[k]
        segment = hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=coding.label,
            segmented_property_category=hd.sr.CodedConcept(*coding.category),
            segmented_property_type=hd.sr.CodedConcept(*coding.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        # Segment Description is a DICOM LO (at most 64 characters): longer metadata descriptions are cut there
        segment.SegmentDescription = coding.description[:64].rstrip()
        segments.append(segment)
    # segment numbers are 1..len(present) in the order of `present`
    remap = np.zeros(max(present) + 1 if present else 1, dtype=np.uint8)
    for i, k in enumerate(present):
        remap[k] = i + 1
    pixel = remap[np.clip(frames, 0, len(remap) - 1)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MeDUET bundles",
        manufacturer_model_name=algorithm, software_versions=version, device_serial_number="0")
    with atomic_path(output_path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return Path(output_path)


class DicomSegWriter:
    """Ignite handler for inference.json: for every item read from a DICOM series folder, write
    ``<output_dir>/<folder name>_seg.dcm`` from the evaluator's inverted ``pred`` (class indices on the input grid,
    after ``Invertd``). Items read from NIfTI are skipped (their NIfTI output is written by ``SaveImaged``).

    Class names: ``labels``, else the loaded network's record, else the ``metadata``'s ``outputs.pred.channel_def``,
    else ``class<i>``. Codes: the ``metadata``'s ``label_codes`` (the bundle's ``configs/metadata.json``, a path or
    the parsed mapping such as ``@_meta_``), else by name (:func:`segment_codings`)."""

    def __init__(self, output_dir: str, labels: Mapping[str | int, str] | None = None, network: Any = None,
                 enabled: bool = True, metadata: Mapping[str, Any] | str | os.PathLike | None = None) -> None:
        self.output_dir, self.enabled = Path(output_dir), enabled
        self.labels, self.network = labels, network  # labels default to the loaded network's record
        meta = load_metadata(metadata)
        self.label_codes: dict[str, Any] = dict(meta.get("label_codes") or {})
        self.metadata_labels = _channel_def(meta)
        # a malformed entry fails here, before inference
        segment_codings({i + 1: name for i, name in enumerate(self.label_codes)}, self.label_codes)
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        from monai.data import decollate_batch

        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else decollate_batch(outputs)
        for out in outputs:
            pred = out["pred"]
            src = str(getattr(pred, "meta", {}).get("filename_or_obj", ""))
            if not src or not os.path.isdir(src):
                continue
            arr = np.asarray(pred.detach().cpu())[0].astype(np.uint8)
            affine = np.asarray(pred.affine.cpu() if hasattr(pred.affine, "cpu") else pred.affine)
            labels = (self.labels or (getattr(self.network, "meta", {}) or {}).get("labels") or self.metadata_labels
                      or {i: f"class{i}" for i in range(1, int(arr.max()) + 1)})
            path = self.output_dir / f"{Path(src).name}_seg.dcm"
            self.written.append(write_dicom_seg(arr, affine, src, path, labels, label_codes=self.label_codes))
