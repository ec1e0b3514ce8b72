"""MONAI Label app hook: a bad inference request gets a 4xx whose body carries meduet's one-line reason.

Imported by the ``main.py`` that ``meduet.deploy.monailabel`` writes into a ``monaibundle`` app (it runs in MONAI
Label's virtualenv, with this folder on ``PYTHONPATH``; not part of the ``meduet`` library).

Why here, in the app class. MONAI Label 0.8.5's ``POST /infer/{model}`` calls ``MONAILabelApp.infer(request)``
with no exception handling of its own and the FastAPI app registers no exception handler, so *any* exception
from the task becomes starlette's bare ``500 Internal Server Error`` (the reason only in the server log), while a
``fastapi.HTTPException`` raised below the endpoint is answered by FastAPI with its status and
``{"detail": <text>}``. The task alone cannot do all of it: ``MONAILabelApp.infer`` replaces an unknown image id
by ``""`` before the task sees the request (our loader then reported the server's working directory as the
missing file). So :class:`MeduetHTTPErrors` overrides ``infer`` of the app (a mixin placed before the sample
app's class):

* an image id that is neither an existing path nor in the datastore: **404**, naming the id, before any work;
* a ``MeduetError`` anywhere in the exception's cause chain (unreadable, empty or non-NIfTI upload, a bad
  volume, the wrong modality, ...): **400** with ``"<ErrorClass>: <one line>"``; the temp path of an upload is
  replaced by "uploaded file" (the client never saw that path);
* MONAI Label's own ``INVALID_INPUT`` (e.g. an unknown model name): **400** with its message;
* anything else stays a 500 (a server-side failure, not a bad request).

Uploads: the endpoint copies the upload to ``<tempdir>/tmpXXXXXXXX<suffix>`` and deletes it in a background task
that only runs when a response is *returned*; after an exception the file stays. On any failure of a request
whose image is such an upload, this hook deletes it (only files directly in ``tempfile.gettempdir()`` named like
``NamedTemporaryFile``'s, the way that endpoint names them).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from meduet.errors import find_meduet_error

__all__ = ["MeduetHTTPErrors", "is_upload", "one_line"]

#: ``tempfile.NamedTemporaryFile(suffix=...)``'s names (``tempfile._RandomNameSequence``: 8 of a-z0-9_)
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9_.-]*)?")


def is_upload(path: Any) -> bool:
    """Whether ``path`` is where MONAI Label's infer endpoint put an uploaded file."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return False
    folder, name = os.path.split(os.path.abspath(path))
    return folder == os.path.abspath(tempfile.gettempdir()) and _UPLOAD_NAME.fullmatch(name) is not None


def one_line(err: BaseException, upload: str | None = None) -> str:
    """``"<ErrorClass>: <message>"`` on one line; an upload's temp path reads "uploaded file"."""
    msg = str(err)
    if upload:
        for p in {upload, os.path.abspath(upload), os.path.realpath(upload)}:
            msg = msg.replace(p, "uploaded file")
    return f"{type(err).__name__}: {' '.join(msg.split())}"


class MeduetHTTPErrors:
    """Mixin for a ``MONAILabelApp`` subclass (listed before it): ``infer`` answers bad requests with a 4xx."""

    def infer(self, request: dict, datastore: Any = None) -> dict:
        image = request.get("image")
        upload = image if is_upload(image) else None
        try:
            if isinstance(image, str) and image and not os.path.exists(image):
                store = datastore if datastore else self.datastore()  # type: ignore[attr-defined]
                if not store.get_image_uri(image):
                    raise HTTPException(status_code=404, detail=(
                        f"unknown image id '{image}': not in this server's datastore "
                        "(GET /datastore/?output=all lists the ids; or upload the file)"))
            return super().infer(request, datastore)  # type: ignore[misc]
        except HTTPException:
            _remove(upload)
            raise
        except Exception as e:
            _remove(upload)
            err = find_meduet_error(e)
            if err is not None:
                raise HTTPException(status_code=400, detail=one_line(err, upload)) from e
            if isinstance(e, MONAILabelException) and e.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=400, detail=" ".join(str(e.msg).split())) from e
            raise


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
