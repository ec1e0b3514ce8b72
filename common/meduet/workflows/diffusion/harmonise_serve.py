"""The served side of meduet_diffusion's harmonisation: the pieces ``harmonise.json`` declares (inferer, writer) and
``HarmoniseService``, which runs that same config one file at a time (the MONAI Label task calls it).

``harmonise.json`` is a MONAI inference config: ``dataset`` (the input scans) -> ``preprocessing``
(``Harmoniser.load_transforms``: meduet_vae's input checks and preprocessing) -> ``inferer`` (``HarmoniseInferer``:
the target site or reference scan and the sampling settings) on ``network`` (``Harmoniser``) -> ``postprocessing``
(MONAI ``Invertd`` back to the input grid, Hounsfield units for CT, ``SaveHarmonisedd``: atomic NIfTI).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from meduet.data import case_name
from meduet.errors import MeduetConfigError
from meduet.io import save_nifti
from meduet.workflows.diffusion.harmonise import GENERATE_MODES, Harmoniser

__all__ = ["HarmoniseInferer", "SaveHarmonisedd", "HarmoniseService", "target_name", "as_prediction"]


def target_name(target_site: str | None = None, reference: str | None = None) -> str:
    """The output file's postfix: ``to_<site>`` or ``to_<reference case>``."""
    if target_site:
        return f"to_{target_site}"
    return f"to_{case_name({'image': reference})}" if reference else "harmonised"


def as_prediction(image: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (the image's shape) carrying a MetaTensor ``image``'s meta and applied operations, as MONAI's
    inferers return them (``Invertd`` reads them to go back to the input grid); ``values`` for a plain tensor."""
    if not isinstance(image, MetaTensor):
        return values
    out = image.detach().clone()
    out.copy_(values.to(device=out.device, dtype=out.dtype))
    return out


@dataclasses.dataclass
class HarmoniseInferer(Inferer):
    """``inferer(inputs, network)`` for a batch of preprocessed scans ``(B, 1, H, W, D)`` and a ``Harmoniser``: each
    scan in the target style (``target_site`` or the ``reference`` scan file, read with the network's own
    preprocessing); ``source_site`` (metadata generators only; None: the null condition); the sampling settings of
    ``Harmoniser.render``."""

    target_site: str | None = None
    reference: str | None = None
    source_site: str | None = None
    num_steps: int = 30
    guidance_scale: float = 1.5
    strength: float = 0.6
    generate: str = "windows"
    window_overlap: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        Inferer.__init__(self)
        if self.generate not in GENERATE_MODES:
            raise MeduetConfigError(f"generate must be one of {GENERATE_MODES}, got {self.generate!r}; fix --generate")
        if not 0.0 <= float(self.window_overlap) < 1.0:
            raise MeduetConfigError(f"window_overlap must be in [0, 1), got {self.window_overlap}; fix --window_overlap")
        if int(self.num_steps) < 1:
            raise MeduetConfigError(f"num_steps must be a positive integer, got {self.num_steps}; fix --num_steps")
        for key in ("target_site", "reference", "source_site"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise MeduetConfigError(f"{key} must be a string or null, got {value!r}; fix --{key}")
            if value == "":
                setattr(self, key, None)
        self._styles: dict[str, torch.Tensor] = {}

    def with_target(self, target_site: str | None = None, reference: str | None = None,
                    source_site: str | None = None) -> HarmoniseInferer:
        """The same settings for another target (one request of a server)."""
        return dataclasses.replace(self, target_site=target_site, reference=reference, source_site=source_site)

    def settings(self) -> dict[str, Any]:
        return {"num_steps": int(self.num_steps), "guidance_scale": float(self.guidance_scale),
                "strength": float(self.strength), "generate": self.generate,
                "window_overlap": float(self.window_overlap), "seed": int(self.seed)}

    def check(self, network: Harmoniser) -> bool:
        """The target before any scan is read: one of ``target_site`` / ``reference``, a known site, a readable
        reference (and a generator a reference can give a style to); True when fine (a run list step)."""
        if (self.target_site is None) == (self.reference is None):
            raise MeduetConfigError("name either a target_site (one of "
                                    f"{', '.join(network.known_sites()) or 'none'}) or a reference scan, not "
                                    f"{'both' if self.target_site is not None else 'neither'}; set --target_site or "
                                    "--reference")
        if self.source_site is not None and network.condition == "metadata":
            network.site_condition(self.source_site, "source_site")
        if self.target_site is not None:
            if network.condition == "metadata":
                network.site_condition(self.target_site)
            else:
                network.site_style(self.target_site)
        else:
            self.reference_style(network)
        return True

    def reference_style(self, network: Harmoniser) -> torch.Tensor | None:
        if self.reference is None:
            return None
        network.check_reference()
        if self.reference not in self._styles:
            data = network.load_transforms()({"image": self.reference})
            image = data["image"]
            image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
            self._styles[self.reference] = network.style_of(image[None])
        return self._styles[self.reference]

    def __call__(self, inputs: torch.Tensor, network: Harmoniser, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        style = self.reference_style(network)
        out = torch.cat([network.harmonise(x[b:b + 1], self.target_site, style, self.source_site, **self.settings())
                         for b in range(x.shape[0])]).to(device=x.device, dtype=x.dtype)
        return as_prediction(inputs, out)


class SaveHarmonisedd(MapTransform):
    """Write ``data[key]`` ``(1, X, Y, Z)`` (a MetaTensor on the input grid, after ``Invertd``) as float32 NIfTI with
    its affine, atomically (temporary file + rename: a failed or killed run leaves no partial file), to
    ``data[path_key]`` when the item names one, else ``<output_dir>/<case>_<postfix>.nii.gz``; the written path
    goes to ``data[path_key]``."""

    def __init__(self, keys: str = "pred", output_dir: str = ".", postfix: str = "harmonised",
                 image_key: str = "image", path_key: str = "output_path") -> None:
        super().__init__(keys)
        self.output_dir, self.postfix, self.image_key, self.path_key = str(output_dir), str(postfix), image_key, path_key

    def _name(self, d: Mapping[Hashable, Any]) -> str:
        meta = getattr(d.get(self.image_key), "meta", None) or {}
        src = meta.get("filename_or_obj") or "scan"
        if isinstance(src, (list, tuple)):
            src = src[0]
        return f"{case_name({'image': src})}_{self.postfix}.nii.gz"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            arr = np.asarray(pred.detach().cpu().numpy() if torch.is_tensor(pred) else pred, dtype=np.float32)
            if arr.ndim == 4:
                arr = arr[0]
            affine = getattr(pred, "affine", None)
            if affine is None:
                raise MeduetConfigError(f"'{key}' has no affine to write it on the input grid; put Invertd before "
                                        "SaveHarmonisedd")
            affine = np.asarray(affine.cpu().numpy() if torch.is_tensor(affine) else affine, dtype=np.float64)
            path = Path(d.get(self.path_key) or os.path.join(self.output_dir, self._name(d)))
            save_nifti(path, arr, affine)
            d[self.path_key] = str(path)
        return d


class HarmoniseService:
    """``harmonise.json`` (a bundle folder's, e.g. one prepared for MONAI Label) built once and run one file at a
    time: ``service(image, output, target_site=..., reference=...)`` writes the harmonised scan (NIfTI on the
    input's grid, atomically) to ``output`` and returns its path. The same components as ``monai.bundle run``:
    ``network``, ``preprocessing``, ``inferer`` (with the request's target), ``postprocessing``.
    ``overrides``: config keys (e.g. ``device``)."""

    def __init__(self, config_file: str | os.PathLike, bundle_root: str | os.PathLike | None = None,
                 **overrides: Any) -> None:
        parser = ConfigParser()
        parser.read_config(str(config_file))
        if bundle_root is not None:
            parser["bundle_root"] = str(bundle_root)
        for key, value in overrides.items():
            parser[key] = value
        parser["input_data"] = []
        parser.get_parsed_content("key_check")
        self.network: Harmoniser = parser.get_parsed_content("network")
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer: HarmoniseInferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self._lock = threading.Lock()  # one generator on this device: requests take turns (no 2x memory)

    def known_sites(self) -> list[str]:
        return self.network.known_sites()

    def __call__(self, image: str | os.PathLike, output: str | os.PathLike, target_site: str | None = None,
                 reference: str | None = None, source_site: str | None = None) -> Path:
        inferer = self.inferer.with_target(target_site or None, reference or None, source_site or None)
        inferer.check(self.network)  # before any work: one line naming what is wrong with the target
        data = self.preprocessing({"image": os.fspath(image)})
        with self._lock:
            data["pred"] = inferer(data["image"][None], self.network)[0]
        data["output_path"] = os.fspath(output)
        return Path(self.postprocessing(data)["output_path"])
