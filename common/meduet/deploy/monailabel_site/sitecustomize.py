"""Let PyPI's torchvision import beside a CPU-only torch (for MONAI Label's server, which imports torchvision).

PyPI's torchvision wheel is built against CUDA torch; beside ``torch==<x>+cpu`` its compiled ops library does not
load and ``import torchvision`` then fails on ``torch.library.register_fake("torchvision::nms")`` ("operator
torchvision::nms does not exist"). When -- and only when -- that library fails to load, this module declares the
two operator schemas torchvision registers fake kernels for unconditionally, so the import succeeds. Detection ops
(nms) are still unavailable, which MONAI Label's segmentation path never calls.

Use: put this folder on ``PYTHONPATH`` when starting MONAI Label, e.g.
``PYTHONPATH=$(python -c "import meduet.deploy, os; print(os.path.dirname(meduet.deploy.__file__))")/monailabel_site``
(``python -m meduet.deploy.monailabel --print-pythonpath`` prints it). Training subprocesses inherit it.
"""

from __future__ import annotations


def _torchvision_ops_missing() -> bool:
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False  # no torchvision: nothing to patch
    folder = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not libs:
        return True
    import torch

    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
        return False
    except (ImportError, OSError):
        return True


def _declare_schemas() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_LIB"] = lib  # keep the registration alive


try:
    if _torchvision_ops_missing():
        _declare_schemas()
except Exception:  # never break interpreter start-up
    pass
