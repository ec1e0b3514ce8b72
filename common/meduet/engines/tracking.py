"""MLflow tracking URIs for ``monai.bundle run ... --tracking mlflow`` with a local file store.

MONAI 1.6's ``MLFlowHandler`` refuses ``file:`` URIs and plain paths (also through ``MLFLOW_TRACKING_URI``): it
expects SQLite, which needs SQLAlchemy, not part of ``mlflow-skinny``. MLflow >= 3.13 opens its file store only
with ``MLFLOW_ALLOW_FILE_STORE=true``. :func:`mlflow_uri` turns a local directory (or ``file:`` URI) into a URI both
accept: the same location under the scheme ``meduet-file``, which it registers with MLflow as the ordinary file
store (allowing the file store when that store is opened, unless ``MLFLOW_ALLOW_FILE_STORE`` is already set).
What lands on disk is a plain MLflow file store, read back with ``file:<dir>``, e.g.
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:<dir>``. Any other URI (``http(s)://``,
``sqlite:///``, ``databricks``) is returned unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["FILE_SCHEME", "mlflow_uri", "store_path"]

FILE_SCHEME = "meduet-file"
_MLFLOW_NAMED_URIS = {"databricks", "databricks-uc", "uc"}  # tracking URIs MLflow knows by name, not paths


def store_path(uri_or_path: str | os.PathLike) -> Path | None:
    """The local directory of a file-store URI or path (``file:``, ``meduet-file:`` or none), else ``None``."""
    text = os.fspath(uri_or_path)
    if text in _MLFLOW_NAMED_URIS:
        return None
    parsed = urlparse(text)
    if parsed.scheme in ("file", FILE_SCHEME):
        path = unquote(parsed.path)
        if os.name == "nt" and len(path) > 2 and path[0] == "/" and path[2] == ":":
            path = path[1:]  # file:///C:/x
        return Path(path).absolute()
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # plain path (or C:\ on Windows)
        return Path(text).absolute()
    return None


def _file_store(store_uri: str, artifact_uri: str | None = None, **_: object):
    """MLflow store builder for ``meduet-file:`` URIs: MLflow's own ``FileStore`` at that directory."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.store.tracking.file_store import FileStore

    root = store_path(store_uri)
    return FileStore(str(root), artifact_uri or root.as_uri())


def mlflow_uri(uri_or_path: str | os.PathLike) -> str:
    """A tracking URI for MONAI's ``MLFlowHandler``: local stores as ``meduet-file:`` (see the module doc)."""
    root = store_path(uri_or_path)
    if root is None:
        return os.fspath(uri_or_path)
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.register(FILE_SCHEME, _file_store)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"cannot register a local MLflow file store with this MLflow ({err}); "
            "pass --tracking_uri http(s)://<server> or sqlite:///<file>.db instead"
        ) from None
    return FILE_SCHEME + ":" + root.as_uri()[len("file:"):]  # percent-encoded: '#', '?' and spaces survive
