"""Helpers shared by the benchmark scripts: child processes, their memory, and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_kib() -> int:
    """This process's resident set size now, KiB (``VmRSS``), or -1 if unknown."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def spawn(script: str | Path, spec: dict, result_tag: str, timeout: float) -> dict:
    """Run ``script --worker <spec as JSON>`` in a fresh interpreter with ``spec["threads"]`` OpenMP/MKL threads and
    return the JSON it printed after ``result_tag``; a worker that printed none is an error with its output."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(result_tag):
            return json.loads(line[len(result_tag):])
    raise RuntimeError(f"worker {spec.get('mode', '')} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")


def replace_section(path: Path, title: str, block: str) -> None:
    """Replace the section of ``path`` that starts with the line ``title`` (up to the next ``## `` heading) by
    ``block``, or append ``block`` if there is no such section; the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == title), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[stop:])
    path.write_text("".join(lines[:start]) + block + ("\n" + tail if tail else ""))
