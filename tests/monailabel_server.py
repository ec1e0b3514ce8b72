"""What the MONAI Label tests share: MONAI Label 0.8.5's own virtualenv (``make monailabel-setup``), its sample
``monaibundle`` app, and a real ``monailabel start_server`` on 127.0.0.1 that every wait bounds and that is stopped
(its whole process group) when the test module is done."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO
from meduet.deploy.monailabel import site_path

__all__ = ["ml_python", "ml_env", "free_port", "http", "download_app", "serve"]


def ml_python() -> str:
    """MONAI Label's interpreter (``.venv-monailabel`` or ``MEDUET_MONAILABEL_PYTHON``). Skipped only where that
    virtualenv was never built and ``make test`` did not ask for it; an interpreter that was asked for but does not
    run or cannot import monailabel is a broken install: a failure, never a skip."""
    venv = REPO / ".venv-monailabel"
    override = os.environ.get("MEDUET_MONAILABEL_PYTHON")
    py = override or str(venv / "bin" / "python")
    if not override and not venv.exists():  # pytest run by hand without `make test`, which builds it (CI always does)
        if os.environ.get("MEDUET_REQUIRE_MONAILABEL") == "1":  # set by `make test`: a missing venv is a failure
            pytest.fail(f"MONAI Label's virtualenv is missing ({venv}) although `make test` builds it")
        pytest.skip(f"MONAI Label's virtualenv is not installed ({venv}); `make monailabel-setup` builds it")
    try:
        probe = subprocess.run([py, "-c", "import monailabel"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        pytest.fail(f"{py} does not run ({e}); rebuild it with `make monailabel-setup`")
    assert probe.returncode == 0, f"{py} cannot import monailabel: {probe.stderr.strip().splitlines()[-1:]}"
    return py


def ml_env(**extra: str) -> dict[str, str]:
    """The environment MONAI Label runs in: our library on its path (``site_path``), no telemetry, no progress bars."""
    return dict(os.environ, PYTHONPATH=site_path(), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                MEDUET_PROGRESS="0", PYTHONUNBUFFERED="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, content_type: str | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    """``(status, body)`` of a GET (``data`` None) or POST; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, method="POST" if data is not None else "GET", data=data,
                                 headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def download_app(py: str, root: Path) -> Path:
    """MONAI Label's ``monaibundle`` sample app copied from the monailabel wheel into ``root`` (no network)."""
    proc = subprocess.run([py, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output",
                           str(root)], capture_output=True, text=True, timeout=300, env=ml_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "monaibundle"


@contextmanager
def serve(py: str, app: Path, store: Path, root: Path, model: str, conf: Sequence[str] = (), wait: float = 300,
          env: dict[str, str] | None = None) -> Iterator[dict]:
    """``monailabel start_server`` of ``app`` on ``store``, serving ``model``, on a free 127.0.0.1 port, with
    ``TMPDIR`` = ``root/tmp`` (so the temp files it leaves are visible) and its log in ``root/server.log``; yields
    ``{"base", "info", "tmpdir", "log"}`` once ``/info/`` answers (within ``wait`` seconds), and kills the server's
    process group on exit."""
    tmpdir = root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    cmd = [py, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(store), "--conf",
           "models", model, "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--conf", "preload",
           "false", *conf, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                                  env={**(env or ml_env()), "TMPDIR": str(tmpdir)})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline, info = time.time() + wait, None
            while time.time() < deadline:
                assert server.poll() is None, log_path.read_text()[-4000:]
                try:
                    status, body = http(f"{base}/info/", timeout=5)
                    if status == 200:
                        info = json.loads(body)
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(2)
            assert info is not None, (f"MONAI Label did not answer /info/ in {wait:g} s:\n"
                                      + log_path.read_text()[-4000:])
            yield {"base": base, "info": info, "tmpdir": tmpdir, "log": log_path}
        finally:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
    assert server.poll() is not None
