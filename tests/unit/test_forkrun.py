"""meduet.forkrun: a forked run looks like `python -m <module>` in a fresh interpreter to the module and the caller."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from meduet.forkrun import ForkRunner

PROBE = '''
import json, os, sys, time
print(json.dumps({"argv": sys.argv[1:], "argv0": os.path.basename(sys.argv[0]), "cwd": os.getcwd(),
                  "path0": sys.path[0], "var": os.environ.get("PROBE_VAR"), "name": __name__}))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "fail":
    raise ValueError("boom in " + sys.argv[2])
if sys.argv[1] == "sleep":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(sys.argv[2], "w").write(str(child.pid))
    time.sleep(60)
raise SystemExit(int(sys.argv[2]))
'''


@pytest.fixture(scope="module")
def runner():
    r = ForkRunner()
    yield r
    r.stop()


def _both(runner, tmp_path, *args, timeout=60):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = dict(os.environ, PROBE_VAR="x y", PYTHONDONTWRITEBYTECODE="1")
    fresh = subprocess.run([sys.executable, "-m", "probe_mod", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=timeout)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    rc, timed_out = runner.run(["-m", "probe_mod", *args], cwd=tmp_path, env=env, stdout=str(out), stderr=str(err),
                               timeout=timeout)
    assert not timed_out
    return fresh, rc, out.read_text(), err.read_text()


def test_exit_status_output_argv_cwd_and_environment_match_a_fresh_interpreter(runner, tmp_path):
    fresh, rc, out, err = _both(runner, tmp_path, "exit", "3")
    assert fresh.returncode == rc == 3
    assert out == fresh.stdout and '"name": "__main__"' in out and '"var": "x y"' in out
    assert f'"cwd": "{tmp_path}"' in out and f'"path0": "{tmp_path}"' in out and '"argv0": "probe_mod.py"' in out
    assert err == fresh.stderr == "to stderr\n"
    fresh, rc, out, _ = _both(runner, tmp_path, "exit", "0")
    assert fresh.returncode == rc == 0 and out == fresh.stdout


def test_uncaught_error_is_reported_as_the_interpreter_does(runner, tmp_path):
    fresh, rc, _, err = _both(runner, tmp_path, "fail", "probe")
    assert fresh.returncode == rc == 1
    assert err.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1] == "ValueError: boom in probe"
    assert "Traceback" in err


def test_timeout_stops_the_run_and_what_it_started(runner, tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    pid_file = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    rc, timed_out = runner.run(["-m", "probe_mod", "sleep", str(pid_file)], cwd=tmp_path, env=dict(os.environ),
                               stdout=str(tmp_path / "o"), stderr=str(tmp_path / "e"), timeout=8)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 40
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # killed with its process group; gone once its parent (init) reaps it
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} started by the timed-out run is still alive")
    # the helper serves the next run as before
    _, rc, _, _ = _both(runner, tmp_path, "exit", "0")
    assert rc == 0


def test_only_module_runs_are_accepted(runner, tmp_path):
    with pytest.raises(ValueError, match="-m <module>"):
        runner.run(["script.py"], cwd=tmp_path, env=dict(os.environ))
