"""meduet_seg as a MONAI Deploy application: a DICOM study folder in, a DICOM SEG (and a NIfTI copy) out.

    python app.py -i <dicom folder> -o <out folder> -m <meduet_seg bundle folder or zip> [--rules rules.json]
    python <this folder> -i ... -o ... -m ...          (``__main__.py``: the form the MAP packager runs)
    HOLOSCAN_INPUT_PATH=... HOLOSCAN_OUTPUT_PATH=... HOLOSCAN_MODEL_PATH=... python app.py

There is no ``monai-deploy exec`` since App SDK 0.6 (its v1.0.0 release notes): the SDK's ``init_app_context`` reads
-i/-o/-m, or else the ``HOLOSCAN_*`` variables, which is how a MAP runs the app in its container
(``monai-deploy run <image> -i <in> -o <out>`` mounts them). README.md: the packaging command and what is checked.

Operators (all the SDK's except the two small ones defined here):

    DICOMDataLoaderOperator -> RuleSeriesSelector (the SDK's DICOMSeriesSelectorOperator + "min_slices" and a
    geometry check) -> DICOMSeriesToVolumeOperator -> MonaiBundleInferenceOperator (the bundle's own
    inference.json preprocessing, network, sliding-window inferer and postprocessing) -> DICOMSegmentationWriterOperator
    (+ NiftiWriter: the same label map as NIfTI on the volume's RAS grid)

The bundle: the packaged meduet_seg (``python -m meduet.deploy.package``), as its zip or unzipped folder. The SDK's
bundle operator reads a *zip* as a TorchScript archive (``torch.jit.load`` of the zip itself), and meduet_seg ships
eager weights (``models/model.pt``, its docs say why not TorchScript), so a zip is extracted first and the operator
gets the folder; for a folder it builds ``network`` from ``configs/inference.json`` and loads ``model.pt`` into it.

Bad input (an empty folder, no series matching the rules, a series with missing slices or mixed orientations) ends
with one line ``AppInputError: ...`` on stderr, exit status 1 and nothing written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, ConditionType, IOType, Operator, OperatorSpec
from monai.deploy.core.domain import Image
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator
from pydicom.sr.coding import Code

HERE = Path(__file__).resolve().parent
DEFAULT_RULES = HERE / "selection_rules.json"
RULES_ENV = "MEDUET_APP_RULES"  # a rules file where only -i/-o/-m or HOLOSCAN_* are passed (a MAP)


class AppInputError(Exception):
    """Input the application refuses; reported as one line."""


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "inference.json").is_file() and (folder / "configs" / "metadata.json").is_file()


def resolve_bundle(path: str | os.PathLike, workdir: Path) -> Path:
    """The bundle folder (holding ``configs/inference.json``) of a bundle folder, its parent, a bundle zip (extracted
    into ``workdir``), or a folder holding one bundle zip in it or in a folder below it: the MAP packager copies
    ``--models <zip>`` to ``/opt/holoscan/models/<zip stem>/<zip>`` and sets ``HOLOSCAN_MODEL_PATH`` to the parent."""
    path = Path(path)
    where = [path, *sorted(p for p in path.iterdir() if p.is_dir())] if path.is_dir() else []
    for cand in where:
        if _is_bundle(cand):
            return cand.resolve()
    zips = [z for d in where for z in sorted(d.glob("*.zip")) if zipfile.is_zipfile(z)]
    if path.is_file() and zipfile.is_zipfile(path):
        zips = [path]
    if len(zips) > 1:
        raise AppInputError(f"{path} holds {len(zips)} zips ({', '.join(z.name for z in zips)}); pass -m <the "
                            "meduet_seg bundle zip or folder> itself")
    if zips:
        with zipfile.ZipFile(zips[0]) as z:
            z.extractall(workdir)
        for cand in [workdir, *sorted(p for p in workdir.iterdir() if p.is_dir())]:
            if _is_bundle(cand):
                return cand.resolve()
    raise AppInputError(f"{path} is not a meduet_seg bundle (no configs/inference.json and configs/metadata.json in "
                        "it, in a folder below it or in a zip there); pass -m <bundle folder or zip>")


def load_rules(path: str | os.PathLike) -> str:
    try:
        rules = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AppInputError(f"cannot read the series selection rules {path}: {e}") from None
    if not isinstance(rules, dict) or not rules.get("selections"):
        raise AppInputError(f"{path}: the rules need a non-empty \"selections\" list (the SDK's format)")
    return json.dumps(rules)


def check_geometry(series) -> None:
    """One orientation for every slice, and evenly spaced slices (none missing) along the slice normal."""
    where = f"series {series.SeriesInstanceUID}"
    dss = [inst.get_native_sop_instance() for inst in series.get_sop_instances()]
    try:
        oris = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in dss])
        pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
    except AttributeError:
        raise AppInputError(f"{where}: a slice has no ImageOrientationPatient / ImagePositionPatient") from None
    if np.abs(oris - oris[0]).max() > 1e-3:
        raise AppInputError(f"{where} mixes slice orientations; export each orientation as its own series")
    normal = np.cross(oris[0][:3], oris[0][3:])
    z = np.sort(pos @ normal)
    if len(z) < 2:
        return
    gaps = np.diff(z)
    step = float(np.median(gaps))
    if step <= 1e-3 or np.abs(gaps - step).max() > 0.1 * step:
        raise AppInputError(f"{where} has uneven slice positions along the slice normal (steps {gaps.min():.3g} to "
                            f"{gaps.max():.3g} mm): slices are missing or duplicated; send the complete series")


class RuleSeriesSelector(DICOMSeriesSelectorOperator):
    """The SDK's selector (its rules JSON) plus a per-selection ``"min_slices"``: the first series that meets
    a selection's conditions and has at least that many instances. No study or no matching series is an
    error, and the chosen series must be complete and of one orientation."""

    def __init__(self, fragment, *args, rules: str, rules_name: str = "", **kwargs):
        self._rules_name = rules_name
        super().__init__(fragment, *args, rules=rules, all_matched=False, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        if not dicom_study_list:
            raise AppInputError("the input folder holds no DICOM study (no readable DICOM instance in it)")
        self._min_slices = {}
        for sel in selection_rules["selections"]:
            self._min_slices[id(sel.get("conditions"))] = int(sel.get("min_slices", 1))
        out = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not out:
            n = sum(len(s.get_all_series()) for s in dicom_study_list)
            raise AppInputError(f"none of the {n} series in the input matches the selection rules "
                                f"{self._rules_name}; edit the rules or send the series they describe")
        check_geometry(out[0].selected_series[0].series)
        return out

    def _select_series(self, attributes, study, all_matched=False, sort_by_sop_instance_count=False):
        need = self._min_slices.get(id(attributes), 1)
        found = super()._select_series(attributes, study, True, sort_by_sop_instance_count)
        found = [s for s in found if len(s.get_sop_instances()) >= need]
        return found if all_matched else found[:1]

class DescribedSegment(SegmentDescription):
    """The SDK's SegmentDescription plus the free-text Segment Description (0062,0006), which neither it nor highdicom's
    ``SegmentDescription`` takes as an argument (a Type 3 attribute of the Segment Description Macro): set on the
    highdicom item the SDK's writer puts into the SEG, as ``meduet.data.dicom`` does for inference.json's SEG."""

    def __init__(self, *args, description: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._description = description

    def to_segment_description(self, segment_number: int):
        item = super().to_segment_description(segment_number)
        if self._description:
            item.SegmentDescription = self._description[:64].rstrip()  # VR LO: at most 64 characters
        return item


class MeduetBundleInference(MonaiBundleInferenceOperator):
    """The SDK's bundle operator with one step added: it drops the bundle's load transform (``CheckedLoadImaged``,
    MONAI's ``LoadImaged`` with ``ensure_channel_first``) and hands the volume over without a channel axis, so the
    channel axis that load step would add is added here before the bundle's own preprocessing runs."""

    def pre_process(self, data, *args, **kwargs):
        from monai.transforms import EnsureChannelFirst

        first = EnsureChannelFirst(channel_dim="no_channel")
        data = {k: first(v) if getattr(v, "ndim", 0) == 3 else v for k, v in data.items()}
        return super().pre_process(data, *args, **kwargs)


class NiftiWriter(Operator):
    """The label map (the SDK's Image, D x H x W) as NIfTI on the volume's RAS grid
    (``nifti_affine_transform`` of DICOMSeriesToVolumeOperator)."""

    def __init__(self, fragment, *args, output_folder: Path, file_name: str = "seg.nii.gz", **kwargs):
        self._out_dir, self._file_name = Path(output_folder), file_name  # (`name` is Holoscan's operator name)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("seg_image")
        spec.input("image").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        import nibabel as nib

        seg = op_input.receive("seg_image")
        affine = np.asarray(seg.metadata().get("nifti_affine_transform", np.eye(4)), dtype=np.float64)
        data = np.ascontiguousarray(np.swapaxes(np.asarray(seg.asnumpy()), 0, 2)).astype(np.uint8)
        self._out_dir.mkdir(parents=True, exist_ok=True)
        final = self._out_dir / self._file_name
        tmp = self._out_dir / f".{self._file_name}.tmp.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
        os.replace(tmp, final)

class MeduetSegApp(Application):
    """DICOM study -> rule-selected series -> volume -> meduet_seg bundle -> DICOM SEG + NIfTI."""

    def __init__(self, argv: list[str], bundle: Path, rules_path: Path):
        self.app_argv, self.bundle, self.rules_path = list(argv), bundle, rules_path
        super().__init__([argv[0]])

    def compose(self):
        from meduet.data.dicom import _channel_def, load_metadata, segment_codings

        ctx = Application.init_app_context(self.app_argv)
        ctx.models = None  # the bundle operator gets the bundle folder itself (not a TorchScript model)
        in_path, out_path = Path(ctx.input_path), Path(ctx.output_path)
        meta = load_metadata(self.bundle / "configs" / "metadata.json")
        codings = segment_codings(_channel_def(meta), meta.get("label_codes"))
        segments = [DescribedSegment(segment_label=c.label, description=c.description,
                                     segmented_property_category=Code(*c.category),
                                     segmented_property_type=Code(*c.type), algorithm_name="meduet_seg",
                                     algorithm_version=str(meta.get("version", "")))
                    for _, c in sorted(codings.items())]

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=in_path, name="dicom_loader")
        selector = RuleSeriesSelector(self, rules=load_rules(self.rules_path), rules_name=str(self.rules_path),
                                      name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        bundle_ctx = AppContext({})  # reads HOLOSCAN_MODEL_PATH if set (a MAP) and would hand the operator that
        bundle_ctx.models = None  # path as a TorchScript model: the operator gets the extracted bundle folder instead
        infer = MeduetBundleInference(
            self, app_context=bundle_ctx, bundle_path=self.bundle,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)], name="bundle_inference")
        seg_writer = DICOMSegmentationWriterOperator(self, segment_descriptions=segments,
                                                     output_folder=out_path, name="dicom_seg_writer")
        nifti = NiftiWriter(self, output_folder=out_path, name="nifti_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, infer, {("image", "image")})
        self.add_flow(infer, seg_writer, {("pred", "seg_image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(infer, nifti, {("pred", "seg_image")})



def _split_argv(argv: list[str]) -> tuple[list[str], Path]:
    """Our own ``--rules <file>`` out of the SDK's arguments (-i/-o/-m/-w/-l)."""
    rules = Path(os.environ.get(RULES_ENV) or DEFAULT_RULES)
    rest = [argv[0]]
    it = iter(argv[1:])
    for a in it:
        if a == "--rules":
            rules = Path(next(it, ""))
        elif a.startswith("--rules="):
            rules = Path(a.split("=", 1)[1])
        else:
            rest.append(a)
    return rest, rules


def run(argv: list[str]) -> int:
    argv, rules = _split_argv(argv)
    ctx = Application.init_app_context(argv)
    with tempfile.TemporaryDirectory(prefix="meduet_seg_app_") as tmp:
        bundle = resolve_bundle(ctx.model_path, Path(tmp))
        load_rules(rules)
        in_path = Path(ctx.input_path)
        if not in_path.is_dir() or not any(p.is_file() for p in in_path.rglob("*")):
            raise AppInputError(f"the input folder {in_path} is empty or not a folder; pass -i <DICOM study folder>")
        # the packaged bundle's vendored meduet first (as monai.bundle run does from the bundle folder)
        sys.path.insert(0, str(bundle))
        out = Path(ctx.output_path)
        out.mkdir(parents=True, exist_ok=True)
        before = set(out.iterdir())
        try:
            MeduetSegApp(argv, bundle=bundle, rules_path=rules).run()
        except BaseException:
            for p in set(out.iterdir()) - before:  # nothing partial stays behind
                p.unlink() if p.is_file() else None
            raise
    return 0


def _one_line(e: BaseException) -> str:
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, AppInputError) or type(err).__name__.startswith("Meduet"):
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    try:
        return run(list(sys.argv if argv is None else argv))
    except (AppInputError, Exception) as e:  # noqa: BLE001 - every failure is reported as one line
        logging.getLogger("meduet_seg_app").debug("failure", exc_info=True)
        print(_one_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
