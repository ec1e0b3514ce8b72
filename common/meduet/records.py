"""The checkpoint record: what travels inside every ``model.pt`` of this project, written, read and checked here only.

A bundle's ``models/model.pt`` is a flat ``state_dict`` (what ``monai.bundle.load``, MONAI's ``CheckpointLoader`` and
MONAI Label expect). The facts the next stage must not re-guess travel inside it as the network's PyTorch extra state
(key ``_extra_state``): a fixed-size ``uint8`` tensor holding a JSON *record*

    {"kind": "vae" | "meduet" | "mae" | "dit" | "controlnet" | "factor_prior" | "meduet_seg" | "inr",
     "architecture": {constructor arguments},
     ...meta: latent scale factor, latent channels, domains, preprocessing, config hashes, crop size, ...}

so every tool that copies state dicts by tensor shape carries it along and ``torch.load(weights_only=True)`` reads it.

* ``RecordMixin``: networks inherit it (``kind``, ``arch``, ``meta``); loading a record of another kind or of another
  architecture into a network is a one-line ``MeduetConfigError``, never silently random weights.
* ``register``: the class decorator with which a network module declares the kind it builds; ``load(path)`` rebuilds
  any registered network from its file alone (the networks package registers every kind when it is imported).
* ``read(path)``: the state dict and its record, with a one-line error naming the file and the fix; ``require``:
  the same error for a missing upstream checkpoint before anything is built. Both (through ``read_state_dict``)
  first check the packaged bundle the file belongs to, if any (``meduet.integrity.check_path``), whichever
  ``meduet`` is imported.
* ``fix_hint(bundle)``: the one place that says how to make a missing checkpoint.
* ``stamp_training(state, epoch, max_epochs, complete)``: the record's ``training`` entry, which the training
  checkpointer writes into every ``model.pt`` it saves: ``complete`` is false in the per-epoch saves and true only
  when the run finished, and ``read`` refuses an incomplete one (a killed run's ``model.pt`` is not a trained model).

Records written before ``kind`` was stored for the VAE (an ``architecture`` with ``latent_channels`` and a
``downsample_factor``) are read as ``"vae"``.
"""

from __future__ import annotations

import copy
import importlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from meduet import integrity
from meduet.errors import MeduetConfigError
from meduet.io import jsonable

__all__ = [
    "RECORD_BYTES",
    "KIND_BUNDLE",
    "encode",
    "decode",
    "arch_diff",
    "fix_hint",
    "stamp_training",
    "require",
    "read_state_dict",
    "kind_of",
    "read",
    "RecordMixin",
    "register",
    "registered",
    "load",
    "load_part",
    "part_of",
    "fill_by_name",
    "load_into",
    "load_weights",
    "with_meta",
]

#: Size of the JSON record stored in the state dict under ``_extra_state``.
RECORD_BYTES = 8192

#: Which bundle writes which kind of network (for the fix hints).
KIND_BUNDLE: dict[str, str] = {
    "vae": "meduet_vae",
    "meduet": "meduet_pretrain",
    "mae": "meduet_pretrain",
    "meduet_encoder": "meduet_pretrain",
    "mae_encoder": "meduet_pretrain",
    "dit": "meduet_diffusion",
    "dualflow": "meduet_diffusion",
    "factor_prior": "meduet_diffusion",
    "controlnet": "meduet_diffusion",
    "meduet_seg": "meduet_seg",
    "inr": "meduet_recon",
}

_WHAT = {
    "meduet_vae": "VAE checkpoint",
    "meduet_pretrain": "pretraining checkpoint",
    "meduet_diffusion": "diffusion checkpoint",
    "meduet_seg": "segmentation checkpoint",
    "meduet_recon": "reconstruction checkpoint",
}


# ----------------------------------------------------------------------------------------------------------------
# the byte format
# ----------------------------------------------------------------------------------------------------------------
def encode(record: Mapping[str, Any]) -> torch.Tensor:
    """A JSON-able dict as a fixed-size ``uint8`` tensor of ``RECORD_BYTES`` (zero-padded)."""
    raw = json.dumps(record, sort_keys=True).encode("utf-8")
    if len(raw) > RECORD_BYTES:
        raise ValueError(f"checkpoint record is {len(raw)} bytes, more than {RECORD_BYTES}")
    buf = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf


def decode(state: Any) -> dict[str, Any]:
    """Inverse of ``encode``; also accepts a plain dict. ``{}`` for an empty or absent record."""
    if isinstance(state, dict):
        return state
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        return {}
    raw = bytes(state.cpu().numpy().tobytes()).rstrip(b"\x00")
    return json.loads(raw.decode("utf-8")) if raw else {}


def stamp_training(state: Mapping[str, Any], epoch: int, max_epochs: int, complete: bool) -> dict[str, Any]:
    """A copy of a network's ``state_dict`` whose record says how far its training got:
    ``training = {"epoch", "max_epochs", "complete"}``. A state without a record is returned as it is."""
    out = dict(state)
    record = decode(out.get("_extra_state"))
    if record:
        record["training"] = {"epoch": int(epoch), "max_epochs": int(max_epochs), "complete": bool(complete)}
        out["_extra_state"] = encode(record)
    return out


def arch_diff(saved: Mapping[str, Any], own: Mapping[str, Any], ignore: Sequence[str] = ()) -> dict[str, Any]:
    """``{key: (saved, own)}`` for the shared keys whose values differ, recursing into nested dicts (keys joined
    with ``.``) and skipping ``ignore`` at every level (arguments that do not change which weights exist)."""
    diff: dict[str, Any] = {}
    for k in saved.keys() & own.keys():
        if k in ignore:
            continue
        a, b = saved[k], own[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diff.update({f"{k}.{kk}": v for kk, v in arch_diff(a, b, ignore).items()})
        elif a != b:
            diff[k] = (a, b)
    return diff


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def fix_hint(bundle: str) -> str:
    """How to make a missing checkpoint of ``bundle``: the one wording every error uses."""
    return (f"train {bundle} first (python -m monai.bundle run training --config_file "
            f"\"['<{bundle}>/configs/train.yaml','<{bundle}>/configs/presets/demo.yaml']\" from the folder that "
            f"holds the bundles) or download the bundle")


def _other_kind(what: str, path: str | Path, kind: str, wanted: str, fix: str) -> MeduetConfigError:
    """The one wording of "this file holds another network than the one wanted"."""
    return MeduetConfigError(f"{what} '{path}' holds a '{kind}' network (a {KIND_BUNDLE.get(kind, 'foreign')} "
                             f"checkpoint), not {wanted}; {fix}")


def require(path: str | Path, bundle: str) -> str:
    """``path`` as a string if the file exists, holds a network of ``bundle`` and is not from an unfinished training
    run; else a one-line error naming it and how to make it (before any workflow component is built)."""
    if not Path(path).is_file():
        raise MeduetConfigError(f"checkpoint '{path}' does not exist; {fix_hint(bundle)}")
    state = read_state_dict(path, "checkpoint", fix_hint(bundle))
    record = decode(state.get("_extra_state"))
    kind = kind_of(record)
    if kind and KIND_BUNDLE.get(kind) != bundle:
        raise _other_kind("checkpoint", path, kind, f"a {bundle} one",
                          f"give this bundle's own models/model.pt (--ckpt_path), or {fix_hint(bundle)}")
    _require_complete(record, path, "checkpoint")
    return str(path)


def _require_complete(record: Mapping[str, Any], path: str | Path, what: str) -> None:
    training = record.get("training") or {}
    if training.get("complete") is False:
        raise MeduetConfigError(f"{what} '{path}' is from a training run that did not finish (saved after epoch "
                                f"{training.get('epoch')} of {training.get('max_epochs')}); run the same training "
                                "again to finish it (it resumes from models/checkpoint.pt), or with --max_epochs "
                                f"{training.get('epoch')} to keep it as it is")


def _load_failure(path: Path, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's message is a paragraph)."""
    text = str(e).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        if not zipfile.is_zipfile(path):
            return "it is not a file written by torch.save"
        return "it holds Python objects other than tensors, which weights_only=True refuses to unpickle"
    return text.splitlines()[0] if text else type(e).__name__


def read_state_dict(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A state dict loaded with ``torch.load(weights_only=True)``; the usual wrappers (``{"model": sd}``,
    ``{"state_dict": sd}``, ``{"autoencoder": sd}``, ``{"unet_state_dict": sd}``) and ``module.`` prefixes are
    accepted. Any failure is one ``MeduetConfigError`` line naming the file and ``fix``. A file inside a packaged
    bundle is read only after that bundle passed its checksum check (``meduet.integrity.check_path``: a
    ``BundleIntegrityError`` line naming the changed file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise MeduetConfigError(f"{what} '{path}' does not exist; {fix}")
    integrity.check_path(path)  # a checkpoint of a packaged bundle: that bundle's files first, whatever meduet runs
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported as one line
        raise MeduetConfigError(f"{what} '{path}' cannot be loaded safely ({_load_failure(path, e)}); {fix}") from None
    for key in ("model", "state_dict", "autoencoder", "unet_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise MeduetConfigError(f"{what} '{path}' is not a state dict; {fix}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def kind_of(record: Mapping[str, Any]) -> str | None:
    """The record's kind (``"vae"`` for VAE records written before the kind was stored), or None."""
    kind = record.get("kind")
    if kind:
        return str(kind)
    arch = record.get("architecture")
    if isinstance(arch, Mapping) and "latent_channels" in arch and "downsample_factor" in record:
        return "vae"
    return None


def _kinds(expect: str | Sequence[str] | None) -> tuple[str, ...]:
    if expect is None:
        return ()
    return (expect,) if isinstance(expect, str) else tuple(expect)


def read(path: str | Path, expect: str | Sequence[str] | None = None,
         what: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, record)`` of one of our ``model.pt`` files.

    ``expect``: the kind(s) the caller can use (e.g. ``("meduet", "mae")``); a file without a record, or with a
    record of another kind, is a one-line error that names the file, what it holds and which bundle makes the
    right one."""
    kinds = _kinds(expect)
    bundle = KIND_BUNDLE.get(kinds[0]) if kinds else None
    what = what or (_WHAT.get(bundle, "checkpoint") if bundle else "checkpoint")
    fix = fix_hint(bundle) if bundle else "give a model.pt written by one of the meduet bundles"
    state = read_state_dict(path, what, fix)
    record = decode(state.get("_extra_state"))
    kind = kind_of(record)
    if kind is None or not record.get("architecture"):
        made_by = f"{bundle}'s" if bundle else "a meduet bundle's"
        raise MeduetConfigError(f"{what} '{path}' has no checkpoint record (not a model.pt of {made_by} training); "
                                f"{fix}")
    if kinds and kind not in kinds:
        raise _other_kind(what, path, kind, " or ".join(repr(k) for k in kinds), fix)
    _require_complete(record, path, what)
    return state, record


# ----------------------------------------------------------------------------------------------------------------
# the network side
# ----------------------------------------------------------------------------------------------------------------
class RecordMixin:
    """Mixin for our networks (put it before ``nn.Module``): the record travels as ``_extra_state``.

    A network sets ``kind`` (class attribute), ``arch`` (its constructor arguments, JSON-able) and ``meta`` (what
    downstream stages need, filled by the trainer) and may declare:

    * ``non_weight_args``: constructor arguments that never change which weights exist (crop sizes of cached
      position buffers, dropout, ...), ignored when a record's architecture is compared with the network's;
    * ``derived_keys``: record keys computed from the network (written, not read back into ``meta``);
    * ``optional_weights``: substrings of state-dict keys that may be absent from a file (``load_part``);
    * ``runtime_args``: constructor arguments that change only how the network computes (memory, speed), which
      ``load(path, **runtime)`` may set;
    * ``kinds``: every kind the class builds (``register``), when instances differ in ``kind``;
    * ``accepts``: further kinds whose records (and weights, by name) it takes (``load_part``, ``part_of``).
    """

    # plain class attributes without annotations: TorchScript (MONAI's ckpt_export) compiles annotated class
    # attributes of a module and fails on these; ``arch`` and ``meta`` are set by each network's constructor
    kind = ""
    non_weight_args = ()
    derived_keys = ()
    optional_weights = ()
    runtime_args = ()
    kinds = ()
    accepts = ()

    def record(self) -> dict[str, Any]:
        """The record this network writes (kind, architecture, meta)."""
        return {"kind": self.kind, "architecture": jsonable(self.arch), **self.meta}

    def get_extra_state(self) -> torch.Tensor:
        return encode(self.record())

    def set_extra_state(self, state: Any) -> None:
        record = decode(state)
        if not record:
            return
        kind = kind_of(record)
        if kind and kind != self.kind and kind not in self.accepts:
            raise MeduetConfigError(
                f"checkpoint holds a '{kind}' network ({KIND_BUNDLE.get(kind, 'another program')}) but this is a "
                f"'{self.kind}' network; give the matching file, or rebuild the network from the file with "
                "meduet.records.load(path)")
        diff = arch_diff(record.get("architecture") or {}, jsonable(self.arch), self.non_weight_args)
        if diff:
            raise MeduetConfigError(
                f"checkpoint was trained with another '{self.kind}' architecture {diff} (checkpoint, network); use "
                "the same preset, or rebuild the network from the file with meduet.records.load(path)")
        skip = {"kind", "architecture", *self.derived_keys}
        self.meta = {k: copy.deepcopy(v) for k, v in record.items() if k not in skip}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **runtime: Any) -> nn.Module:
        """The network a record describes (weights not loaded), with ``runtime`` options (``runtime_args``)."""
        unknown = sorted(set(runtime) - set(cls.runtime_args))
        if unknown:
            raise MeduetConfigError(f"{cls.__name__}: {unknown} are not runtime options (allowed: "
                                    f"{list(cls.runtime_args)})")
        return cls(**{**record["architecture"], **runtime})  # type: ignore[call-arg]


_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: ``load`` builds files of ``cls.kind`` (or of each of ``cls.kinds``) with ``cls.from_record``."""
    kinds = tuple(getattr(cls, "kinds", ()) or ()) or (getattr(cls, "kind", ""),)
    if not all(kinds):
        raise TypeError(f"{cls.__name__} has no kind to register")
    for kind in kinds:
        _REGISTRY[kind] = cls
    return cls


def _build(cls: type, record: Mapping[str, Any], **runtime: Any) -> nn.Module:
    """``cls.from_record(record)`` without touching the global random state: rebuilding a stored network (whose
    random initialisation is overwritten at once) must not shift the random numbers of what a workflow does next."""
    with torch.random.fork_rng(devices=[]):
        return cls.from_record(record, **runtime)


def registered(kind: str) -> type:
    """The class that builds ``kind`` (importing the networks package registers every kind)."""
    if kind not in _REGISTRY:
        importlib.import_module("meduet.networks")  # the network modules register their kinds when imported
    if kind not in _REGISTRY:
        raise MeduetConfigError(f"no network of kind '{kind}' is known (known: {sorted(_REGISTRY)})")
    return _REGISTRY[kind]


def load(path: str | Path, device: str | torch.device = "cpu", expect: str | Sequence[str] | None = None,
         what: str | None = None, **runtime: Any) -> nn.Module:
    """Rebuild the network of a ``model.pt`` from the file alone (architecture and meta travel inside), with its
    weights loaded (strict), in eval mode on ``device``. ``expect``: the kind(s) the caller accepts (see ``read``);
    ``runtime``: options that change only memory use or speed (the network class's ``runtime_args``)."""
    state, record = read(path, expect, what)
    net = _build(registered(kind_of(record)), record, **runtime)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def load_into(network: nn.Module, path: str | Path, what: str | None = None) -> nn.Module:
    """``network`` (built from a config's ``network_def``) with the weights and record of ``path`` loaded strictly: a
    file of another kind or architecture is a one-line error (MONAI's ``CheckpointLoader`` with the record check).
    Returns the network in eval mode."""
    state, _ = read(path, getattr(network, "kind", None) or None, what)
    network.load_state_dict(state, strict=True)
    return network.eval()


def load_part(path: str | Path, cls: type, device: str | torch.device = "cpu", what: str | None = None) -> nn.Module:
    """A network that holds part of a checkpoint's weights under the same names (e.g. the deployable encoder of a
    pretraining checkpoint): built by ``cls.from_record(record)`` (which accepts the kinds in ``cls.accepts``) and
    filled by name. Every weight it has must be in the file, except those its ``optional_weights`` name (their load
    hooks supply defaults)."""
    kinds = tuple(dict.fromkeys((*(getattr(cls, "kinds", ()) or (cls.kind,)), *getattr(cls, "accepts", ()))))
    state, record = read(path, kinds, what)
    net = _build(cls, record)
    missing = fill_by_name(net, state)
    if missing:
        bundle = KIND_BUNDLE.get(kind_of(record) or "", "")
        raise MeduetConfigError(f"checkpoint '{path}' lacks {len(missing)} weights of {cls.__name__} "
                                f"(e.g. {missing[:2]}); {fix_hint(bundle) if bundle else 'give the full model.pt'}")
    return net.to(device).eval()


def part_of(network: nn.Module, cls: type) -> nn.Module:
    """The part of an in-memory network that ``cls`` holds (e.g. the deployable encoder of a training network), with
    the weights copied by name and the network's record (``meta``) carried over; the random state is untouched."""
    net = _build(cls, network.record())
    missing = fill_by_name(net, network.state_dict())
    if missing:
        raise MeduetConfigError(f"{type(network).__name__} lacks {len(missing)} weights of {cls.__name__} "
                                f"(e.g. {missing[:2]})")
    net.meta = copy.deepcopy(dict(network.meta))
    return net


def fill_by_name(network: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Load the entries of ``state`` whose names ``network`` has (strictly on those), when every weight it has is
    there except those its ``optional_weights`` name (their load hooks supply defaults); else load nothing and
    return the names it lacks."""
    own = network.state_dict()
    optional = getattr(network, "optional_weights", ())
    missing = [k for k in own if k not in state and not any(o in k for o in optional)]
    if not missing:
        network.load_state_dict({k: state[k] for k in own if k in state}, strict=True)
    return missing


def with_meta(network: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
    """``network`` with ``meta`` (JSON-able) as the record's meta, e.g. the facts of the latent cache it is trained
    on (``meduet.latent.latent_record``); returns the network, for configs."""
    network.meta = jsonable(dict(meta))
    return network


def load_weights(network: nn.Module, path: str | Path | None, what: str = "pretrained weights",
                 fix: str = "give a state dict of this architecture (or null)") -> nn.Module:
    """``network`` with a plain state dict loaded from ``path`` (e.g. MAISI's published autoencoder weights), keeping
    the network's own record; ``None``/empty ``path``: unchanged. Keys and shapes must match exactly (a ``module.``
    prefix and ``{"state_dict"|"model": ...}`` wrappers are accepted); a mismatch is a one-line error rather than
    silently random weights."""
    if not path:
        return network
    state = read_state_dict(path, what, fix)
    file_record = state.pop("_extra_state", None)
    file_kind, own_kind = kind_of(decode(file_record)), getattr(network, "kind", None)
    if file_kind and own_kind and file_kind != own_kind:
        raise _other_kind(what, path, file_kind, repr(own_kind), fix)
    expected = {k: v for k, v in network.state_dict().items() if k != "_extra_state"}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise MeduetConfigError(
            f"{what} '{path}' do not fit the configured architecture ({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(wrong)} of another shape e.g. {wrong[:2]}); "
            f"{fix}")
    network.load_state_dict(state, strict=False)
    if file_record is not None and hasattr(network, "set_extra_state"):
        network.set_extra_state(file_record)
    return network
