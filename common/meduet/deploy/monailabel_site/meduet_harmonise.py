"""MONAI Label task for meduet_diffusion's served harmonisation (a model folder prepared by
``python -m meduet.deploy.monailabel --harmonise``): one image in, the same anatomy in a target site's style out.

Imported by the app ``main.py`` that ``meduet.deploy.monailabel`` writes (MONAI Label's virtualenv, this folder on
``PYTHONPATH``; not part of the ``meduet`` library). Why a task of its own and not MONAI Label's ``BundleInferTask``:
that task builds one network from ``network_def``, loads ``models/model.pt`` into it as a state dict (non-strictly)
and calls ``inferer(image, network)`` with nothing from the request, while harmonisation chains three checkpoints
(VAE, generator, MeDUET encoder) and needs the request's ``target_site``. This task runs the folder's
``configs/harmonise.json`` through ``meduet.workflows.diffusion.harmonise_serve.HarmoniseService`` (the same
preprocessing, network, inferer and postprocessing as ``monai.bundle run``) and returns the harmonised volume as the
result file MONAI Label sends back (``output=image``), a float32 NIfTI on the input's grid (HU for CT).

Request parameters (``params`` form field, JSON): ``target_site`` (one of the task's ``config()["target_site"]``),
or ``reference`` (a datastore image id or a path on the server: a scan whose MeDUET style is taken), and for
generators conditioned on the site, optionally ``source_site``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from meduet.errors import MeduetConfigError, find_meduet_error
from meduet.workflows.diffusion.harmonise_serve import HarmoniseService

__all__ = ["HARMONISE_CONFIG", "HarmoniseTask", "harmonise_infers", "is_harmoniser"]

logger = logging.getLogger(__name__)

#: what marks a model folder as a harmoniser (and what the task runs)
HARMONISE_CONFIG = os.path.join("configs", "harmonise.json")


def is_harmoniser(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HARMONISE_CONFIG))


class HarmoniseTask(InferTask):
    """The harmonisation of the model folder ``path`` as a MONAI Label infer task (module docstring).

    ``datastore``: a callable giving the app's datastore (a ``reference`` given as an image id is looked up there).
    A folder that cannot be served (a missing checkpoint, ...) gives an invalid task (left out of ``/info/``) whose
    requests are answered with the reason."""

    def __init__(self, path: str, conf: Mapping[str, Any] | None = None,
                 datastore: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.datastore = datastore
        self.error: BaseException | None = None
        self.service: HarmoniseService | None = None
        sites: list[str] = []
        try:
            self.service = HarmoniseService(os.path.join(path, HARMONISE_CONFIG), bundle_root=path)
            sites = self.service.known_sites()
        except Exception as e:  # noqa: BLE001 - reported by every request and in the log
            self.error = find_meduet_error(e) or e
            logger.error(f"meduet harmonisation in {path} cannot be served: {self.error}")
        condition = self.service.network.condition if self.service is not None else "?"
        super().__init__(
            type=InferType.OTHERS, labels=[], dimension=3,
            description=("meduet_diffusion harmonisation: the image's anatomy in a target site's style "
                         f"(generator conditioned on {condition}); params target_site or reference"),
            config={"target_site": sites, "reference": "", "source_site": ""})

    def is_valid(self) -> bool:
        return self.service is not None

    def _reference(self, value: Any) -> str | None:
        if not value:
            return None
        value = str(value)
        if os.path.exists(value):
            return value
        uri = self.datastore().get_image_uri(value) if self.datastore is not None else None
        if not uri:
            raise MeduetConfigError(f"unknown reference '{value}': neither a file on the server nor an image id of "
                                    "its datastore; pass an image id (GET /datastore/?output=all lists them)")
        return str(uri)

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.service is None:
            raise self.error or MeduetConfigError(f"{self.path}: not a harmonisation model folder")
        start = time.time()
        site = request.get("target_site")
        site = site if isinstance(site, str) and site else None  # the config's list: nothing chosen
        source = request.get("source_site") if isinstance(request.get("source_site"), str) else None
        reference = self._reference(request.get("reference"))
        output = os.path.join(tempfile.gettempdir(), f"meduet_harmonised_{uuid.uuid4().hex}.nii.gz")
        path = self.service(request["image"], output, target_site=site, reference=reference, source_site=source)
        total = round(time.time() - start, 2)
        return str(path), {"target_site": site, "reference": request.get("reference") or None,
                           "label_names": {}, "latencies": {"total": total, "infer": total}}


def harmonise_infers(infers: dict[str, InferTask], models: Mapping[str, str], conf: Mapping[str, Any] | None = None,
                     datastore: Callable[[], Any] | None = None) -> dict[str, InferTask]:
    """``infers`` with a ``HarmoniseTask`` for every model folder (``models``: name -> folder, the app's
    ``self.models``) prepared for harmonisation, in place of the bundle task MONAI Label made for it (which has
    no ``inference.json`` to run)."""
    out = dict(infers)
    for name, path in models.items():
        if is_harmoniser(path):
            out[name] = HarmoniseTask(path, conf, datastore)
            logger.info(f"+++ Adding meduet harmonisation:: {name} => {path}")
    return out
