"""A fork server for the test suite's ``python -m monai.bundle run ...`` calls.

On a slow 2-core machine a fresh interpreter spends 10-15 s importing torch, MONAI, ignite and MLflow before a tiny
workflow does a second of work, and the suite starts ~45 of them. This server imports those libraries once; for
each request it forks a child that becomes what ``python -m monai.bundle <args>`` would be (its own working folder,
environment, ``sys.argv``, ``sys.path[0]``, stdout/stderr files, process group and exit status) and runs MONAI's
``monai.bundle`` entry point with ``runpy``, exactly as ``-m`` does. Nothing of the repository's own package is
imported here, so each run imports the bundle code it names, as a fresh process would.

Protocol: one JSON request per line on stdin ``{"args", "cwd", "env", "stdout", "stderr", "timeout"}``; one JSON
reply per line on stdout ``{"rc": int, "timed_out": bool}``. ``tests/conftest.py::bundle_run`` is the client;
``MEDUET_TEST_FRESH_PROCESS=1`` makes it start real subprocesses instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

PRELOAD = ("torch", "numpy", "scipy.ndimage", "nibabel", "monai", "monai.bundle", "monai.bundle.scripts",
           "monai.networks.nets", "monai.engines", "monai.handlers", "monai.inferers", "monai.losses",
           "monai.metrics", "monai.transforms", "matplotlib", "matplotlib.pyplot", "tqdm")


def _preload() -> None:
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional library missing: the run imports (or reports) it itself
            pass


def _child(req: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setsid()  # its own process group, so a timeout stops the run and everything it started
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        threads = req["env"].get("OMP_NUM_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        import runpy

        sys.argv = ["-m", *req["args"]]  # replaced by runpy with the module's path, as `python -m` does
        sys.path[0] = os.getcwd()
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the interpreter's own report: traceback, last line the error
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what interpreter shutdown would run (logging, MLflow, TensorBoard writers)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return -signal.SIGKILL, True
        time.sleep(0.05)


def main() -> None:
    _preload()
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        rc, timed_out = _wait(pid, float(req.get("timeout", 600)))
        print(json.dumps({"rc": rc, "timed_out": timed_out}), file=out, flush=True)


if __name__ == "__main__":
    main()
