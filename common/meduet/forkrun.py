"""Run ``python -m <module> <args>`` many times without paying the interpreter's start-up each time.

On a 2-core CPU machine a fresh interpreter spends 10-15 s importing torch, MONAI, ignite and MLflow before a small
bundle workflow does its work; the quick start (``tools/demo.py``) and the test suite start dozens of such runs.
``ForkRunner`` starts one helper process (``python -m meduet.forkrun --serve``) that imports those libraries once and
then, for each run, forks a child that becomes what ``python -m <module> <args>`` would be: its working folder,
environment, ``sys.argv``, ``sys.path[0]`` (the working folder, as ``-m`` sets it), stdout/stderr (inherited, or
files), optionally its own process group, and its exit status; the module is executed with ``runpy`` exactly as
``-m`` does. The helper imports third-party libraries only (and this module), so every run imports the bundle
code it names, as a fresh process would.

Differences from a fresh interpreter, and so when not to use it: ``PYTHONPATH`` and other start-up variables are
read once, by the helper (runs that change them need a real subprocess); libraries already imported by the
helper keep import-time settings. On platforms without ``os.fork`` ``ForkRunner.available()`` is false and callers
start subprocesses. ``MEDUET_FRESH_PROCESS=1`` makes the callers in this repository do so everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

PRELOAD = ("torch", "numpy", "scipy.ndimage", "nibabel", "monai", "monai.bundle", "monai.bundle.scripts",
           "monai.networks.nets", "monai.engines", "monai.handlers", "monai.inferers", "monai.losses",
           "monai.metrics", "monai.transforms", "matplotlib", "matplotlib.pyplot", "tqdm")

__all__ = ["ForkRunner", "fresh_process_requested"]


def fresh_process_requested() -> bool:
    """True when ``MEDUET_FRESH_PROCESS=1`` asks for a real subprocess per run (or ``os.fork`` is missing)."""
    return os.environ.get("MEDUET_FRESH_PROCESS", "0") == "1" or not hasattr(os, "fork")


class ForkRunner:
    """Client of the fork helper; started on first use, stopped by ``stop()`` or at interpreter exit.

    ``run(["-m", module, *args], cwd, env, stdout=None, stderr=None, timeout=None, new_session=False)`` returns
    ``(returncode, timed_out)``. ``stdout``/``stderr``: a file path, or ``None`` to write where this process writes.
    ``new_session=True`` (always with a ``timeout``) puts the run in its own process group, so a timeout stops it
    and everything it started (then Ctrl-C in a terminal does not reach it). Runs are serialised (one at a time).
    """

    def __init__(self, log: str | os.PathLike | None = None) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._log = log
        self._to_server = self._from_server = None

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        log = open(self._log, "ab") if self._log else None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meduet.forkrun", "--serve", str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stderr=log)
        finally:
            os.close(req_r)
            os.close(rep_w)
            if log is not None:
                log.close()
        self._to_server = os.fdopen(req_w, "w", buffering=1)
        self._from_server = os.fdopen(rep_r, "r")
        if not self._from_server.readline():
            raise RuntimeError("the meduet.forkrun helper did not start" + (f"; see {self._log}" if self._log else ""))
        import atexit

        atexit.register(self.stop)

    def stop(self) -> None:
        if self._proc is not None:
            try:
                self._to_server.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._from_server.close()
        self._proc = None

    def run(self, argv: list[str], cwd: str | os.PathLike, env: dict[str, str], stdout: str | None = None,
            stderr: str | None = None, timeout: float | None = None, new_session: bool = False) -> tuple[int, bool]:
        if len(argv) < 2 or argv[0] != "-m":
            raise ValueError(f"ForkRunner runs `-m <module> ...` only, got {argv}")
        req = {"argv": list(argv[1:]), "cwd": str(cwd), "env": dict(env), "stdout": stdout, "stderr": stderr,
               "timeout": timeout, "new_session": bool(new_session or timeout is not None)}
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            self._to_server.write(json.dumps(req) + "\n")
            self._to_server.flush()
            line = self._from_server.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"the meduet.forkrun helper stopped during `{' '.join(argv)}`"
                               + (f"; see {self._log}" if self._log else ""))
        reply = json.loads(line)
        return reply["rc"], reply["timed_out"]


# ------------------------------------------------------------------------------------------------ helper side
def _child(req: dict) -> None:
    """The forked run; never returns."""
    code = 1
    try:
        if req["new_session"]:
            os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            if path:
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
        import runpy

        sys.argv = [req["argv"][0], *req["argv"][1:]]  # argv[0] becomes the module's path, as with `python -m`
        sys.path[0] = os.getcwd()
        try:
            runpy.run_module(req["argv"][0], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())  # as the interpreter reports an uncaught error (meduet's one-line hook)
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what interpreter shutdown runs (logging, MLflow, TensorBoard writers)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float | None, group: bool) -> tuple[int, bool]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 1, False
        if done:
            return os.waitstatus_to_exitcode(status), False
        if deadline is not None and time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return -signal.SIGKILL, True
        time.sleep(0.05)


def _serve(req_fd: int, rep_fd: int) -> None:
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run (same process group) and the client
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional library missing: a run imports (or reports) it itself
            pass
    requests = os.fdopen(req_fd, "r")
    replies = os.fdopen(rep_fd, "w", buffering=1)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _child(req)
        rc, timed_out = _wait(pid, req.get("timeout"), req["new_session"])
        replies.write(json.dumps({"rc": rc, "timed_out": timed_out}) + "\n")
        replies.flush()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit("usage: python -m meduet.forkrun --serve <request fd> <reply fd> (started by ForkRunner)")
