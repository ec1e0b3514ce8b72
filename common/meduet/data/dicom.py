"""Clinical I/O: label maps as DICOM SEG (highdicom) referencing the source CT/MR series.

MONAI reads a DICOM series folder into a volume with an affine (RAS world coordinates); a segmentation predicted
on that grid is written back as a DICOM Segmentation whose frames lie exactly on the source instances: for every
source slice, each pixel's patient position (from ``ImagePositionPatient``, ``ImageOrientationPatient``,
``PixelSpacing``) is mapped through the inverse affine to the label volume's voxel (nearest). This is independent of
how the reader ordered or flipped the axes. Writing is atomic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meduet.errors import MeduetInputError
from meduet.io import atomic_path

__all__ = ["read_series", "label_frames", "write_dicom_seg", "DicomSegWriter"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


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
                    algorithm: str = "meduet_seg", version: str = "0.1.0") -> Path:
    """Write ``label`` (class indices on the grid of ``affine_ras``) as a DICOM SEG referencing the series in
    ``series_dir``: one segment per foreground class of ``labels`` (``{1: "body", ...}``) that is present."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = read_series(series_dir)
    frames = label_frames(label, affine_ras, datasets)
    names = {int(k): str(v) for k, v in labels.items() if int(k) > 0}
    present = [k for k in sorted(names) if (frames == k).any()]
    if not present:
        raise MeduetInputError(f"no foreground class in the prediction for '{series_dir}'; nothing to write as SEG")
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                              family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=names[k],
            segmented_property_category=codes.cid7150.Tissue, segmented_property_type=codes.cid7166.ConnectiveTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, k in enumerate(present)
    ]
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
    after ``Invertd``). Items read from NIfTI are skipped (their NIfTI output is written by ``SaveImaged``)."""

    def __init__(self, output_dir: str, labels: Mapping[str | int, str] | None = None, network: Any = None,
                 enabled: bool = True) -> None:
        self.output_dir, self.enabled = Path(output_dir), enabled
        self.labels, self.network = labels, network  # labels default to the loaded network's record
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
            labels = self.labels or (getattr(self.network, "meta", {}) or {}).get("labels") or {
                i: f"class{i}" for i in range(1, int(arr.max()) + 1)}
            path = self.output_dir / f"{Path(src).name}_seg.dcm"
            self.written.append(write_dicom_seg(arr, affine, src, path, labels))
