#!/usr/bin/env python
"""meduet_vae benchmark: patch-wise (sliding-window) vs whole-volume encoding/decoding on CPU.

What it measures (random weights, eval mode, ``torch.no_grad``, fp32, ``torch.set_num_threads(--threads)``):

* encode/decode time (median of ``--repeats`` after ``--warmup`` runs) and throughput (image voxels/s) of
  (a) the patch-wise path: ``encode_patchwise`` (image patches, default 64^3, overlap 0) and ``decode_patchwise``
  (latent windows, default 16^3, overlap 0.25, Gaussian blending) and (b) a whole-volume pass
  (``vae.encode_mean(x)`` / ``vae.decode(z)``) of the same ``MeduetVAE`` (``AutoencoderKlMaisi``);
  reported side by side with patch-wise / whole ratios, since only ratios are meaningful on a shared machine;
* peak memory: every (model, path, size, encode|decode) runs in a fresh child process (this script re-invoked
  with ``--worker``); the child reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and that minus its
  RSS right before the first encode/decode call. The child's address space is capped with
  ``setrlimit(RLIMIT_AS, --mem-cap-gb)`` (the whole child: interpreter, torch, weights, inputs, activations), so
  an over-budget configuration fails inside the child with torch's "can't allocate memory" RuntimeError and is
  reported as "> cap" instead of taking the machine down;
* a baseline: ``monai.networks.nets.AutoencoderKL`` at the same width (channels, res blocks, groups, no
  attention) doing the same whole-volume encode + decode, as a MAISI / AutoencoderKL time ratio;
* ``--profile``: where the time of a whole-volume encode + decode goes (group norm, convolutions, rest), for both;
* ``--find-max``: the largest cubic side (multiple of 32, up to ``--find-max-limit``) that encodes AND decodes
  under the cap, for each path (binary search, each probe a capped child, ``--max-seconds`` per child).

Budget controls (say so when you use them; the markdown output records them):

* ``--max-windows K``: in the patch-wise path run the network on the first K windows only and reuse that output
  for the remaining windows (stitching still runs for all of them). Peak memory is unaffected (every window has
  the same shape and its activations are freed before the next); the time is reported as an estimate:
  measured time + (windows not run) x (mean time of a window that ran).
* memory pre-flight (on by default, ``--no-preflight``): a configuration is skipped as "> cap (predicted)" when a
  linear fit of the RSS increase vs voxels, from smaller sizes of the same configuration measured earlier in the
  same run, predicts more than ``cap * (1 + --preflight-margin)``; and as "too slow (est.)" when the time scaled
  from the largest smaller size exceeds ``--max-seconds``.

Examples::

    .venv/bin/python bench/vae_patchwise.py --sizes 64 --repeats 1                 # smoke
    .venv/bin/python bench/vae_patchwise.py --sizes 128 256 --write-md             # paper width
    .venv/bin/python bench/vae_patchwise.py --find-max --write-md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION_TITLE = "## meduet_vae: patch-wise vs whole-volume coding"
RESULT_TAG = "@@VAE_BENCH_RESULT "
GIB = 2**30
KIB_PER_GIB = 2**20

BENCH_HEADER = """# Benchmarks

All numbers are ratios measured in one run (one invocation of the benchmark, whose measurements run back to back)
on a shared 2-core CPU machine unless noted: absolute times and throughputs depend on whatever else the machine
was doing and are only meaningful relative to other rows of the same table. Each table states the exact command
that produced it.
"""

SECTION_INTRO = """Produced by `bench/vae_patchwise.py` (see `bench/README.md`). Random weights, eval mode, `torch.no_grad`,
fp32, 2 threads. *Patch-wise* is `encode_patchwise` (image patches, overlap 0) + `decode_patchwise` (latent
windows, overlap 0.25, Gaussian blending); *whole* is one `vae.encode_mean(x)` / `vae.decode(z)` call on the
whole volume. Each cell runs in a fresh child process whose address space is capped with
`setrlimit(RLIMIT_AS)`; "peak" is the child's `ru_maxrss`, "delta" is that minus the child's RSS right before
its first encode/decode call. Decode inputs are random latents of the matching shape.
"""


# ----------------------------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _architecture(width: str) -> dict:
    from meduet.networks.vae import MAISI_CT_ARCHITECTURE

    arch = dict(MAISI_CT_ARCHITECTURE)
    if width == "demo":
        arch.update(num_channels=[32, 64, 64], num_res_blocks=[1, 1, 1], norm_num_groups=16)
    elif width != "paper":
        raise ValueError(f"unknown width preset {width!r}")
    return arch


def _build(model: str, width: str):
    import torch.nn as nn

    arch = _architecture(width)
    if model in ("maisi", "maisi-loopnorm"):
        from meduet.networks.vae import build_vae

        # "maisi": build_vae as the bundles use it; "maisi-loopnorm": MAISI's own per-group norm (fast_norm=False)
        net = build_vae(arch) if model == "maisi" else build_vae(arch, fast_norm=False)
        enc, dec = net.encode_mean, net.decode
    elif model == "aekl":
        from monai.networks.nets import AutoencoderKL

        net = AutoencoderKL(
            spatial_dims=arch["spatial_dims"],
            in_channels=arch["in_channels"],
            out_channels=arch["out_channels"],
            channels=arch["num_channels"],
            num_res_blocks=arch["num_res_blocks"],
            attention_levels=[False] * len(arch["num_channels"]),
            latent_channels=arch["latent_channels"],
            norm_num_groups=arch["norm_num_groups"],
            norm_eps=arch["norm_eps"],
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
            include_fc=False,
        )
        enc, dec = (lambda x: net.encode(x)[0]), net.decode
    else:
        raise ValueError(f"unknown model {model!r}")
    assert isinstance(net, nn.Module)
    net.eval()
    factor = 2 ** (len(arch["num_channels"]) - 1)
    return net, enc, dec, arch["latent_channels"], factor


class _WindowCounter:
    """Stands in for the VAE in ``encode_patchwise``/``decode_patchwise``: counts the windows, times each network
    call and, with ``max_windows > 0``, runs the network on the first ``max_windows`` windows only and returns a
    copy of the last computed output for the others (same shape; the stitching still runs for every window)."""

    def __init__(self, enc, dec, downsample_factor: int, max_windows: int) -> None:
        self._enc, self._dec = enc, dec
        self.downsample_factor = downsample_factor
        self.max_windows = max_windows
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.window_times: list[float] = []
        self._last = None

    def _run(self, fn, x):
        self.calls += 1
        if self.max_windows > 0 and self.calls > self.max_windows:
            return self._last.clone()
        t0 = time.perf_counter()
        y = fn(x)
        self.window_times.append(time.perf_counter() - t0)
        self._last = y
        return y

    def encode_mean(self, x):
        return self._run(self._enc, x)

    def decode(self, z):
        return self._run(self._dec, z)


def _is_memory_error(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return any(s in msg for s in ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc"))


def _run_worker(spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cap = int(spec["cap_gb"] * GIB)
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out: dict = {"spec": spec, "vmsize_start_kib": _proc_status_kib("VmSize")}
    try:
        net, enc, dec, latent_c, f = _build(spec["model"], spec["width"])
        norms: dict[str, int] = {}
        for m in net.modules():
            if isinstance(m, torch.nn.GroupNorm):
                norms[type(m).__name__] = norms.get(type(m).__name__, 0) + 1
        out["norm_modules"] = norms
        s = spec["size"]
        if s % f:
            raise ValueError(f"size {s} is not divisible by the downsampling factor {f}")
        if spec["op"] == "roundtrip":
            out.update(_roundtrip(net, enc, dec, s, spec))
            out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if "rss_before_kib" in out:
                out["delta_kib"] = out["peak_kib"] - out["rss_before_kib"]
            return out
        if spec["op"] == "profile":
            out.update(_profile(net, enc, dec, s, spec))
            out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return out
        if spec["op"] == "encode":
            inp = torch.randn(1, 1, s, s, s)
        else:
            inp = torch.randn(1, latent_c, s // f, s // f, s // f)
        counter = None
        if spec["method"] == "whole":
            call = enc if spec["op"] == "encode" else dec
        else:
            from meduet.networks.vae import decode_patchwise, encode_patchwise

            counter = _WindowCounter(enc, dec, f, spec["max_windows"])
            if spec["op"] == "encode":

                def call(x):
                    # one window per network call, as the window counter and the recorded tables assume
                    return encode_patchwise(counter, x, patch_size=spec["patch_size"], overlap=spec["enc_overlap"],
                                            sw_batch_size=1)

            else:

                def call(z):
                    return decode_patchwise(
                        counter, z, latent_patch_size=spec["latent_patch_size"], overlap=spec["dec_overlap"],
                        sw_batch_size=1,
                    )

        import gc

        gc.collect()
        out["rss_before_kib"] = _proc_status_kib("VmRSS")
        out["hwm_before_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times, estimates = [], []
        with torch.no_grad():
            for i in range(spec["warmup"] + spec["repeats"]):
                if counter is not None:
                    counter.reset()
                t0 = time.perf_counter()
                y = call(inp)
                dt = time.perf_counter() - t0
                del y
                if i < spec["warmup"]:
                    continue
                times.append(dt)
                est = dt
                if counter is not None:
                    out["windows_total"] = counter.calls
                    out["windows_run"] = len(counter.window_times)
                    out["window_mean_s"] = statistics.fmean(counter.window_times)
                    est = dt + (counter.calls - len(counter.window_times)) * out["window_mean_s"]
                estimates.append(est)
        out.update(status="ok", times_s=times, time_s=statistics.median(estimates), measured_s=statistics.median(times))
        out["estimated"] = counter is not None and out["windows_run"] < out["windows_total"]
    except BaseException as e:  # noqa: BLE001 - the parent gets a one-line reason
        out["status"] = "oom" if _is_memory_error(e) else "error"
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if "rss_before_kib" in out:
        out["delta_kib"] = out["peak_kib"] - out["rss_before_kib"]
    return out


def _roundtrip(net, enc, dec, s: int, spec: dict) -> dict:
    """One image -> latent -> image round trip of an ``s``^3 volume: ``method`` "whole" (one encoder and one decoder
    call) or "tiled" (``PatchEncoding`` from ``spec["scheme"]``: its encoding windows, then its decoding windows or
    one decoder call). Times encode and decode separately; counts the network calls of each."""
    import gc
    import resource

    import torch

    from meduet.networks.vae import PatchEncoding

    calls = {"encode": 0, "decode": 0}  # windows
    n_calls = {"encode": 0, "decode": 0}  # network calls (batches of windows)
    runs: dict[str, list[float]] = {"encode": [], "decode": []}
    last: dict = {}
    cap = int(spec.get("max_windows") or 0)

    def counted(op, fn, t):
        # with --max-windows K: the network runs on the first K calls of each op; later calls reuse the last output
        # (same shape: all windows of a fitted tiling have one shape) and are timed as the mean of the calls run
        calls[op] += t.shape[0]
        n_calls[op] += 1
        if cap and len(runs[op]) >= cap and last.get(op) is not None and last[op].shape[0] == t.shape[0]:
            return last[op].clone()
        t0 = time.perf_counter()
        y = fn(t)
        runs[op].append(time.perf_counter() - t0)
        last[op] = y
        return y

    class Net:  # what PatchEncoding calls: counted passes of the real network
        downsample_factor = net.downsample_factor

        @staticmethod
        def encode_mean(x):
            return counted("encode", enc, x)

        @staticmethod
        def decode(z):
            return counted("decode", dec, z)

    x = torch.rand(1, 1, s, s, s)
    gc.collect()
    res = {"rss_before_kib": _proc_status_kib("VmRSS"), "hwm_before_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    scheme = PatchEncoding(**spec["scheme"]) if spec["method"] == "tiled" else None
    with torch.no_grad():
        t0 = time.perf_counter()
        z = Net.encode_mean(x) if scheme is None else scheme.encode(Net, x)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = Net.decode(z) if scheme is None else scheme.decode(Net, z)
        t_dec = time.perf_counter() - t0
    assert y.shape == x.shape, (y.shape, x.shape)
    est = {op: dt + (n_calls[op] - len(runs[op])) * (sum(runs[op]) / max(len(runs[op]), 1))
           for op, dt in (("encode", t_enc), ("decode", t_dec))}
    res.update(status="ok", encode_s=est["encode"], decode_s=est["decode"], time_s=est["encode"] + est["decode"],
               measured_s=t_enc + t_dec, encode_windows=calls["encode"], decode_windows=calls["decode"],
               encode_calls=n_calls["encode"], decode_calls=n_calls["decode"], encode_calls_run=len(runs["encode"]),
               decode_calls_run=len(runs["decode"]),
               estimated=any(n_calls[op] > len(runs[op]) for op in runs))
    if scheme is not None:
        res["encode_roi"] = scheme.encode_tiling((s, s, s), net.downsample_factor)[0]
        tiles = scheme.decode_tiling((s // net.downsample_factor,) * 3)
        res["decode_roi"] = None if tiles is None else tiles[0]
    return res


def _profile(net, enc, dec, s: int, spec: dict) -> dict:
    """Wall time of a whole-volume encode + decode split into GroupNorm modules, Conv3d modules and the rest
    (SiLU, residual adds, upsampling interpolation, padding, Python overhead), via forward hooks on leaf modules."""
    import torch
    import torch.nn as nn

    acc = {"groupnorm": 0.0, "conv": 0.0}
    starts: dict[int, float] = {}

    def pre(m, _inp):
        starts[id(m)] = time.perf_counter()

    def post_for(key):
        def post(m, _inp, _out):
            acc[key] += time.perf_counter() - starts.pop(id(m))

        return post

    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post_for("groupnorm"))
        elif isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post_for("conv"))
    x = torch.randn(1, 1, s, s, s)
    res = {}
    with torch.no_grad():
        for i in range(spec["warmup"] + 1):
            for k in acc:
                acc[k] = 0.0
            t0 = time.perf_counter()
            z = enc(x)
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            y = dec(z)
            t_dec = time.perf_counter() - t0
            del y
        total = t_enc + t_dec
        res = {
            "status": "ok",
            "time_s": total,
            "encode_s": t_enc,
            "decode_s": t_dec,
            "groupnorm_s": acc["groupnorm"],
            "conv_s": acc["conv"],
            "other_s": total - acc["groupnorm"] - acc["conv"],
        }
    return res


# ----------------------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict] = []
        self.started = time.time()

    def spec(self, model: str, method: str, op: str, size: int, **over) -> dict:
        a = self.args
        spec = {
            "model": model,
            "width": a.width_preset,
            "method": method,
            "op": op,
            "size": size,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "patch_size": a.patch_size,
            "latent_patch_size": a.latent_patch_size,
            "enc_overlap": a.encode_overlap,
            "dec_overlap": a.decode_overlap,
            "max_windows": a.max_windows,
            "cap_gb": a.mem_cap_gb,
            "threads": a.threads,
        }
        spec.update(over)
        return spec

    # -- pre-flight ----------------------------------------------------------------------------------------------
    def _same(self, spec: dict) -> list[dict]:
        keys = ("model", "width", "method", "op", "patch_size", "latent_patch_size", "max_windows")
        return [
            r
            for r in self.results
            if r.get("status") == "ok"
            and all(r["spec"].get(k) == spec.get(k) for k in keys)
            and r["spec"]["size"] < spec["size"]
        ]

    def predict_peak_kib(self, spec: dict) -> float | None:
        """Peak RSS predicted from smaller sizes of the same configuration: delta linear in voxels (not for tiled
        round trips, whose memory is bounded by one window)."""
        if spec["method"] == "tiled":
            return None
        prev = sorted(self._same(spec), key=lambda r: r["spec"]["size"])
        if not prev:
            return None
        v = spec["size"] ** 3
        if len(prev) == 1:
            r = prev[0]
            delta = r["delta_kib"] * v / r["spec"]["size"] ** 3
        else:
            (r1, r2) = prev[-2], prev[-1]
            v1, v2 = r1["spec"]["size"] ** 3, r2["spec"]["size"] ** 3
            slope = (r2["delta_kib"] - r1["delta_kib"]) / (v2 - v1)
            delta = r2["delta_kib"] + slope * (v - v2)
        return prev[-1]["rss_before_kib"] + delta

    def predict_wall_s(self, spec: dict) -> float | None:
        if spec["method"] == "patch" and spec["max_windows"] > 0:
            return None  # bounded by the window cap
        prev = self._same(spec)
        if not prev:
            return None
        r = max(prev, key=lambda r: r["spec"]["size"])
        return r["wall_s"] * (spec["size"] / r["spec"]["size"]) ** 3

    # -- child ---------------------------------------------------------------------------------------------------
    def run(self, spec: dict, label: str = "") -> dict:
        a = self.args
        desc = f"{spec['model']} {spec['method']} {spec['op']} {spec['size']}^3 {label}".strip()
        if a.preflight and spec["op"] != "profile":
            peak = self.predict_peak_kib(spec)
            cap_kib = a.mem_cap_gb * KIB_PER_GIB
            if peak is not None and peak > cap_kib * (1 + a.preflight_margin):
                r = {"spec": spec, "status": "skip-mem", "predicted_peak_kib": peak}
                _log(f"{desc}: skipped, predicted peak {peak / KIB_PER_GIB:.1f} GiB > cap")
                self.results.append(r)
                return r
            wall = self.predict_wall_s(spec)
            if wall is not None and wall > a.max_seconds:
                r = {"spec": spec, "status": "skip-slow", "predicted_wall_s": wall}
                if peak is not None:
                    r["predicted_peak_kib"] = peak
                _log(f"{desc}: skipped, estimated {wall:.0f} s > --max-seconds {a.max_seconds:.0f}")
                self.results.append(r)
                return r
        _log(f"{desc}: running (elapsed {time.time() - self.started:.0f} s)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "common"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(a.threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.max_seconds, env=env, cwd=REPO)
        except subprocess.TimeoutExpired:
            r = {"spec": spec, "status": "timeout", "wall_s": time.time() - t0}
        else:
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
            if lines:
                r = json.loads(lines[-1][len(RESULT_TAG) :])
            else:
                tail = " | ".join(p.stderr.strip().splitlines()[-3:])
                # killed by a signal: SIGKILL is most likely the kernel's OOM killer
                status = "killed" if p.returncode < 0 else "error"
                r = {"spec": spec, "status": status, "error": f"exit code {p.returncode}: {tail[:300]}"}
            r["wall_s"] = time.time() - t0
        pk = r.get("peak_kib")
        _log(
            f"{desc}: {r['status']}"
            + (f" {r['time_s']:.2f} s" if "time_s" in r else "")
            + (f", peak {pk / KIB_PER_GIB:.2f} GiB" if pk else "")
            + (f" ({r['error']})" if r.get("error") else "")
            + f" [child {r['wall_s']:.0f} s]"
        )
        self.results.append(r)
        return r

    def get(self, model: str, method: str, op: str, size: int) -> dict | None:
        for r in reversed(self.results):
            s = r["spec"]
            if (s["model"], s["method"], s["op"], s["size"]) == (model, method, op, size):
                return r
        return None


# -- formatting ---------------------------------------------------------------------------------------------------


MODEL_NAMES = {
    "maisi": "MeduetVAE (`build_vae` default)",
    "maisi-loopnorm": "MeduetVAE `fast_norm=False` (MAISI's per-group norm)",
    "aekl": "AutoencoderKL",
}


def _model_name(runner: "Runner", model: str) -> str:
    """The label plus the group-norm class the child actually found in the built network."""
    name = MODEL_NAMES[model]
    for r in runner.results:
        if r["spec"]["model"] == model and r.get("norm_modules"):
            return f"{name} [{', '.join(sorted(r['norm_modules']))}]"
    return name


def _gib(kib) -> str:
    return "–" if kib is None else f"{kib / KIB_PER_GIB:.2f}"


def _status_cell(r: dict | None, cap_gb: float) -> str:
    if r is None:
        return "not run"
    st = r["status"]
    if st == "ok":
        return "ok"
    if st == "oom":
        return f"**> cap** ({cap_gb:g} GiB; failed at {_gib(r.get('peak_kib'))} GiB RSS)"
    if st == "skip-mem":
        return f"**> cap** (predicted {_gib(r['predicted_peak_kib'])} GiB; not run)"
    if st == "skip-slow":
        extra = f", predicted peak {_gib(r['predicted_peak_kib'])} GiB" if "predicted_peak_kib" in r else ""
        return f"too slow (est. {r['predicted_wall_s']:.0f} s{extra}; not run)"
    if st == "timeout":
        return f"timeout ({r['wall_s']:.0f} s)"
    if st == "killed":
        return f"killed ({r.get('error', '')})"
    return f"error ({r.get('error', '')})"


def _time_cell(r: dict | None) -> str:
    if not r or r.get("status") != "ok":
        return "–"
    s = f"{r['time_s']:.1f}"
    if r.get("estimated"):
        s += f" (est.; {r['windows_run']}/{r['windows_total']} windows run)"
    return s


def _ratio(a, b, fmt="{:.2f}") -> str:
    if a is None or b is None or b == 0:
        return "–"
    return fmt.format(a / b)


def _val(r, key):
    return r.get(key) if r and r.get("status") == "ok" else None


def main_tables(runner: Runner, sizes: list[int], base_sizes: list[int]) -> str:
    a = runner.args
    out = []
    if a.patchwise:
        _patch_tables(runner, sizes, out)
    _baseline_tables(runner, base_sizes, out)
    return "\n".join(out)


def _patch_tables(runner: Runner, sizes: list[int], out: list[str]) -> None:
    a = runner.args
    out.append(f"Network: {_model_name(runner, 'maisi')} (group-norm class as found in the built network).\n")
    out.append(
        "| size | op | path | status | time s (median) | Mvoxel/s | peak RSS GiB | delta RSS GiB | windows |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for s in sizes:
        for op in ("encode", "decode"):
            for method in ("patch", "whole"):
                r = runner.get("maisi", method, op, s)
                t = _val(r, "time_s")
                thr = f"{s**3 / t / 1e6:.3f}" if t else "–"
                win = f"{r.get('windows_total')}" if r and r.get("windows_total") else ("1 (whole)" if method == "whole" else "–")
                pk = r.get("peak_kib") if r and r["status"] == "ok" else None
                dl = r.get("delta_kib") if r and r["status"] == "ok" else None
                out.append(
                    f"| {s}^3 | {op} | {'patch-wise' if method == 'patch' else 'whole'} | {_status_cell(r, a.mem_cap_gb)} "
                    f"| {_time_cell(r)} | {thr} | {_gib(pk)} | {_gib(dl)} | {win} |"
                )
    out.append("")
    out.append("Ratios patch-wise / whole (same run; < 1 means the patch-wise path is faster or smaller):\n")
    out.append("| size | op | time ratio | peak RSS ratio | delta RSS ratio |\n|---|---|---|---|---|")
    for s in sizes:
        for op in ("encode", "decode"):
            p, w = runner.get("maisi", "patch", op, s), runner.get("maisi", "whole", op, s)
            if _val(w, "time_s") is None and _val(p, "time_s") is not None:
                why = _status_cell(w, a.mem_cap_gb)
                out.append(f"| {s}^3 | {op} | – (whole: {why}) | – | – |")
                continue
            out.append(
                f"| {s}^3 | {op} | {_ratio(_val(p, 'time_s'), _val(w, 'time_s'))} "
                f"| {_ratio(_val(p, 'peak_kib'), _val(w, 'peak_kib'))} | {_ratio(_val(p, 'delta_kib'), _val(w, 'delta_kib'))} |"
            )


def _baseline_tables(runner: Runner, base_sizes: list[int], out: list[str]) -> None:
    a = runner.args
    if base_sizes and a.baseline_models:
        out.append("")
        out.append(
            "Baselines: the same whole-volume passes, same width (no attention); ratio = MeduetVAE (`build_vae` "
            "default) time / this model's time, so > 1 means the MeduetVAE default is slower:\n"
        )
        out.append(
            "| size | op | model | time s | MeduetVAE default / model | peak RSS GiB | delta RSS GiB |\n"
            "|---|---|---|---|---|---|---|"
        )
        for s in base_sizes:
            sums: dict[str, float | None] = {}
            for op in ("encode", "decode", "encode + decode"):
                ref = None
                for model in ["maisi", *a.baseline_models]:
                    if op == "encode + decode":
                        t = sums.get(model)
                        r = None
                    else:
                        r = runner.get(model, "whole", op, s)
                        t = _val(r, "time_s")
                        sums[model] = None if (t is None or sums.get(model, 0.0) is None) else sums.get(model, 0.0) + t
                    if model == "maisi":
                        ref = t
                    cell = (f"{t:.1f}" if t else "–") if op == "encode + decode" else (_time_cell(r) if t else _status_cell(r, a.mem_cap_gb))
                    bold = "**" if op == "encode + decode" else ""
                    out.append(
                        f"| {s}^3 | {bold}{op}{bold} | {_model_name(runner, model)} | {cell} "
                        f"| {bold}{_ratio(ref, t) if model != 'maisi' else '1'}{bold} "
                        f"| {_gib(_val(r, 'peak_kib'))} | {_gib(_val(r, 'delta_kib'))} |"
                    )
    profs = [r for r in runner.results if r["spec"]["op"] == "profile"]
    if profs:
        out.append("")
        out.append(
            f"Where the time of one whole-volume encode + decode goes (`--profile`, forward hooks on leaf modules, "
            f"{profs[0]['spec']['size']}^3, one measured pass after {profs[0]['spec']['warmup']} warm-up):\n"
        )
        out.append("| model | encode + decode s | GroupNorm | Conv3d | rest (SiLU, adds, upsampling, Python) |\n|---|---|---|---|---|")
        for r in profs:
            name = _model_name(runner, r["spec"]["model"])
            if r["status"] != "ok":
                out.append(f"| {name} | {_status_cell(r, a.mem_cap_gb)} | | | |")
                continue
            tot = r["time_s"]
            out.append(
                f"| {name} | {tot:.1f} | {r['groupnorm_s']:.1f} s ({100 * r['groupnorm_s'] / tot:.0f}%) "
                f"| {r['conv_s']:.1f} s ({100 * r['conv_s'] / tot:.0f}%) | {r['other_s']:.1f} s ({100 * r['other_s'] / tot:.0f}%) |"
            )


def _config_lines(args: argparse.Namespace, runner: Runner) -> str:
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "?"

    arch = {
        "paper": "channels 64/128/256, 2 res blocks/level, 32 groups, 4 latent channels, 4x downsampling",
        "demo": "channels 32/64/64, 1 res block/level, 16 groups, 4 latent channels, 4x downsampling",
    }[args.width_preset]
    lines = [
        f"- width `{args.width_preset}`: {arch}; torch {ver('torch')}, monai {ver('monai')}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs visible, {platform.machine()}",
        f"- patch-wise: image patch {args.patch_size}^3 overlap {args.encode_overlap:g}; latent window "
        f"{args.latent_patch_size}^3 overlap {args.decode_overlap:g} (Gaussian)",
        f"- {args.repeats} timed repeat(s) after {args.warmup} warm-up; memory cap (RLIMIT_AS) {args.mem_cap_gb:g} GiB "
        f"per child; --max-seconds {args.max_seconds:g}",
    ]
    if args.max_windows > 0:
        lines.append(
            f"- `--max-windows {args.max_windows}`: patch-wise times marked *est.* ran the network on "
            f"{args.max_windows} windows and added (windows not run) x (mean window time); peak memory is as measured"
        )
    lines.append(
        f"- total wall time of this run {(time.time() - runner.started) / 60:.1f} min, "
        f"finished {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    )
    return "\n".join(lines)


def run_main(args: argparse.Namespace) -> tuple[Runner, str, str]:
    runner = Runner(args)
    sizes = sorted(set(args.sizes))
    if args.baseline_sizes is None:
        base_sizes = [s for s in (64, 128) if s <= max(sizes)]
    else:
        base_sizes = sorted(set(args.baseline_sizes))
    all_sizes = sorted(set(sizes) | set(base_sizes))
    for s in all_sizes:
        for op in ("encode", "decode"):
            # adjacent in time so that each ratio compares runs under similar machine load
            runner.run(runner.spec("maisi", "whole", op, s))
            if s in base_sizes:
                for model in args.baseline_models:
                    runner.run(runner.spec(model, "whole", op, s))
            if s in sizes and args.patchwise:
                runner.run(runner.spec("maisi", "patch", op, s))
    if args.profile:
        ps = min(base_sizes or sizes)
        for model in ["maisi", *args.baseline_models]:
            runner.run(runner.spec(model, "whole", "profile", ps, warmup=1))
    body = main_tables(runner, sizes, base_sizes)
    notes = _config_lines(args, runner)
    what = "Throughput and memory" if args.patchwise else "Whole-volume baselines"
    title = f"### {what}, width `{args.width_preset}`, sizes {', '.join(f'{s}^3' for s in all_sizes)}"
    return runner, title, f"{notes}\n\n{body}"


def _scheme_of(args: argparse.Namespace) -> dict:
    return {"patch_size": args.patch_size, "overlap": args.encode_overlap, "mode": "constant",
            "tiling": args.encode_tiling, "min_overlap": args.encode_min_overlap,
            "decode_window": args.decode_window, "decode_overlap": args.decode_min_overlap,
            "sw_batch_size": args.encode_batch, "decode_batch_size": args.decode_batch}


def run_roundtrip(args: argparse.Namespace) -> tuple[Runner, str, str]:
    """``--roundtrip``: image -> latent -> image of one volume per child, whole (``--whole-sizes``) or through a
    ``PatchEncoding`` (``--tiled-sizes``), the whole pass right before the tiled one of the same size; per-voxel
    time ratios tiled / whole against the same size, or the largest whole size that ran when the whole pass of
    that size is not run (does not fit)."""
    runner = Runner(args)
    scheme = _scheme_of(args)
    tiled, whole = sorted(set(args.tiled_sizes)), sorted(set(args.whole_sizes))
    for s in sorted(set(tiled) | set(whole)):
        if s in whole:
            runner.run(runner.spec("maisi", "whole", "roundtrip", s))
        if s in tiled:
            runner.run(runner.spec("maisi", "tiled", "roundtrip", s, scheme=scheme))
    a = args
    out = [_config_lines(args, runner).split("\n")[0],
           f"- tiled: `PatchEncoding({', '.join(f'{k}={v!r}' for k, v in scheme.items())})`; whole: one "
           f"`encode_mean` and one `decode` call; one round trip per child (no warm-up, one sample), memory cap "
           f"(RLIMIT_AS) {a.mem_cap_gb:g} GiB per child",
           f"- total wall time of this run {(time.time() - runner.started) / 60:.1f} min, finished "
           f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", "",
           "| size | path | status | encode s | decode s | total s | total s per Mvoxel | encoder windows (roi) "
           "| decoder windows (latent roi) | peak RSS GiB | delta RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(set(tiled) | set(whole)):
        for method in ("whole", "tiled"):
            if s not in (whole if method == "whole" else tiled):
                continue
            r = runner.get("maisi", method, "roundtrip", s)
            ok = r is not None and r.get("status") == "ok"
            enc_roi = f" ({'x'.join(map(str, r['encode_roi']))})" if ok and r.get("encode_roi") else ""
            dec_roi = (f" ({'x'.join(map(str, r['decode_roi']))})" if ok and r.get("decode_roi") else
                       (" (whole latent)" if ok else ""))
            est = ""
            if ok and r.get("estimated"):
                est = (f" (est.: network run on {r['encode_calls_run']}/{r['encode_calls']} encoder and "
                       f"{r['decode_calls_run']}/{r['decode_calls']} decoder calls)")
            out.append(
                f"| {s}^3 | {method} | {_status_cell(r, a.mem_cap_gb)}{est} | {_fmt(r, 'encode_s')} | {_fmt(r, 'decode_s')} "
                f"| {_fmt(r, 'time_s')} | {_fmt(r, 'time_s', 1e6 / s**3, '{:.2f}')} "
                f"| {r.get('encode_windows', '–') if ok else '–'}{enc_roi} "
                f"| {r.get('decode_windows', '–') if ok else '–'}{dec_roi} | {_gib(_val(r, 'peak_kib'))} "
                f"| {_gib(_val(r, 'delta_kib'))} |")
    out += ["", "Per-voxel time ratios tiled / whole (same run; the whole pass of the same size, or of the largest "
            "size whose whole pass ran when that one was not run):", "",
            "| tiled size | compared with whole | encode | decode | encode + decode | peak RSS tiled / whole |",
            "|---|---|---|---|---|---|"]
    for s in tiled:
        t = runner.get("maisi", "tiled", "roundtrip", s)
        if _val(t, "time_s") is None:
            continue
        ran = [w for w in whole if _val(runner.get("maisi", "whole", "roundtrip", w), "time_s") is not None]
        ref = s if s in ran else max([w for w in ran if w < s], default=None)
        if ref is None:
            continue
        w = runner.get("maisi", "whole", "roundtrip", ref)
        cells = [f"{(t[k] / s**3) / (w[k] / ref**3):.2f}" for k in ("encode_s", "decode_s", "time_s")]
        out.append(f"| {s}^3 | {ref}^3 | {' | '.join(cells)} | {_ratio(t['peak_kib'], w['peak_kib'])} |")
    title = (f"### Round trip through a fitted tiling vs whole volume, width `{args.width_preset}`, tiled "
             f"{', '.join(f'{s}^3' for s in tiled)}, whole {', '.join(f'{s}^3' for s in whole)}")
    return runner, title, "\n".join(out)


def run_seams(args: argparse.Namespace) -> tuple[None, str, str]:
    """``--seams``: seam error of a trained VAE (``--vae-ckpt``) on real volumes (``--datalist``, ``--split``): the
    mean absolute error within ``--seam-width`` voxels of the decoding windows' borders of a fitted latent tiling
    (``--decode-window`` / each of ``--decode-overlaps``), against the whole-volume decode's error at the same voxels;
    and the same at the encoding windows' borders for the VAE's own patch-wise encoding (``PatchEncoding.of``)."""
    import numpy as np
    import torch

    from meduet import records
    from meduet.data import get_load_transforms, load_datalist
    from meduet.metrics.reconstruction import patch_border_mask, window_borders
    from meduet.networks.vae import PatchEncoding
    from meduet.workflows.vae.common import load_case, preprocessing_for

    torch.set_num_threads(args.threads)
    started = time.time()
    vae = records.load(args.vae_ckpt, expect="vae").eval()
    f = vae.downsample_factor
    enc_scheme = PatchEncoding.of(vae, args.seam_patch_size, 0.0 if args.seam_patch_size else None,
                                  default=PatchEncoding(32))
    dl = load_datalist(args.datalist, split=args.split)
    items = dl[args.split][: args.seam_cases]
    transform = get_load_transforms(**preprocessing_for(vae, dl), keys=("image",))
    configs = [(w, o, m) for w in (args.seam_decode_windows or [args.decode_window]) for o in args.decode_overlaps
               for m in args.decode_modes]
    rows: dict[str, list[float]] = {}
    shapes = []

    def add(key, v):
        rows.setdefault(key, []).append(float(v))

    def border_mae(err, borders):
        mask = patch_border_mask(err.shape, borders=borders, width=args.seam_width)
        return float(err[mask].mean()) if mask.any() else float("nan")

    with torch.no_grad():
        for item in items:
            x, _, _ = load_case(transform, item, torch.device("cpu"))
            shapes.append(tuple(x.shape[2:]))
            z_whole = vae.encode_mean(x)
            z_patch = enc_scheme.encode(vae, x)
            err = {"whole": (vae.decode(z_whole).clamp(0, 1) - x).abs()[0, 0],
                   "paper": (vae.decode(z_patch).clamp(0, 1) - x).abs()[0, 0]}
            enc_borders = PatchEncoding(enc_scheme.patch_size, enc_scheme.overlap).borders(x.shape[2:], f)
            add("enc/whole", border_mae(err["whole"], enc_borders))
            add("enc/paper", border_mae(err["paper"], enc_borders))
            add("all/whole", err["whole"].mean())
            add("all/paper", err["paper"].mean())
            for w, o, m in configs:
                dec = PatchEncoding(decode_window=w, decode_overlap=o, decode_mode=m)
                roi, ov = dec.decode_tiling(z_whole.shape[2:])
                borders = [[b * f for b in window_borders(n, r, v)] for n, r, v in zip(z_whole.shape[2:], roi, ov)]
                o = f"{w}/{o}"
                e_t = (dec.decode(vae, z_whole).clamp(0, 1) - x).abs()[0, 0]
                e_pt = (dec.decode(vae, z_patch).clamp(0, 1) - x).abs()[0, 0]
                add(f"dec{o}{m}/whole", border_mae(err["whole"], borders))
                add(f"dec{o}{m}/tiled", border_mae(e_t, borders))
                add(f"dec{o}{m}/paper", border_mae(err["paper"], borders))
                add(f"dec{o}{m}/paper+tiled", border_mae(e_pt, borders))
                add(f"dec{o}{m}/all_tiled", e_t.mean())
                add(f"dec{o}{m}/all_paper+tiled", e_pt.mean())
                add(f"dec{o}{m}/windows", float(np.prod([len(window_borders(n, r, v)) // 2 + 1 for n, r, v in
                                                         zip(z_whole.shape[2:], roi, ov)])))
                add(f"dec{o}{m}/border_fraction", float(patch_border_mask(err["whole"].shape, borders=borders,
                                                                          width=args.seam_width).float().mean()))

    def ci(values):
        v = np.asarray(values, dtype=float)
        half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return f"{v.mean():.3f} ± {half:.3f}"

    def ratio(a, b):
        return ci(np.asarray(rows[a]) / np.asarray(rows[b]))

    latent = sorted({tuple(s // f for s in sh) for sh in shapes})
    out = [f"- VAE `{args.vae_ckpt}` (architecture {vae.architecture['num_channels']}, "
           f"{vae.architecture['num_res_blocks']} res blocks; decoder fine-tuned: "
           f"{bool(vae.meta.get('decoder_finetuned'))}); {len(items)} cases of `{args.datalist}` split `{args.split}`, "
           f"image shapes {sorted(set(shapes))}, latent shapes {latent}",
           f"- its patch-wise encoding: `{enc_scheme.record()}`; decoding windows: fitted (`PatchEncoding."
           f"decode_window` / `decode_overlap` latent voxels); border band: {args.seam_width} voxel(s) each side of a border; values: mean over cases "
           f"± 1.96 standard errors; errors are |reconstruction clamped to [0, 1] - input|",
           f"- total wall time {(time.time() - started) / 60:.1f} min, finished "
           f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", "",
           "At the decoding windows' borders (the fitted latent tiling), whole-volume encoding:", "",
           "| latent window max / overlap | blending | border voxels (fraction) | border MAE whole decode "
           "| border MAE tiled decode | tiled / whole (per case) | MAE of the whole volume, tiled / whole |",
           "|---|---|---|---|---|---|---|"]
    for w, o, m in configs:
        k = f"dec{w}/{o}{m}"
        out.append(f"| {w} / {o} | {m} | {np.mean(rows[k + '/border_fraction']):.2f} | {ci(rows[k + '/whole'])} | {ci(rows[k + '/tiled'])} | {ratio(k + '/tiled', k + '/whole')} "
                   f"| {ci(np.asarray(rows[k + '/all_tiled']) / np.asarray(rows['all/whole']))} |")
    out += ["", "The VAE's own patch-wise encoding followed by the fitted decoding (the round trip of the bench above), "
            "at the decoding windows' borders, against patch-wise encoding + whole decode (3D MedDiffusion) at "
            "the same voxels:", "",
            "| latent window max / overlap | blending | border MAE patch enc + whole dec "
            "| border MAE patch enc + tiled dec | ratio (per case) | MAE of the whole volume, ratio |",
            "|---|---|---|---|---|---|"]
    for w, o, m in configs:
        k = f"dec{w}/{o}{m}"
        out.append(f"| {w} / {o} | {m} | {ci(rows[k + '/paper'])} | {ci(rows[k + '/paper+tiled'])} "
                   f"| {ratio(k + '/paper+tiled', k + '/paper')} "
                   f"| {ci(np.asarray(rows[k + '/all_paper+tiled']) / np.asarray(rows['all/paper']))} |")
    out += ["", "At the encoding windows' borders: patch-wise encoding + whole decode (3D MedDiffusion) vs whole "
            "encode + whole decode:", "",
            "| border MAE whole | border MAE patch-wise encoding | ratio (per case) | MAE of the whole volume, ratio |",
            "|---|---|---|---|",
            f"| {ci(rows['enc/whole'])} | {ci(rows['enc/paper'])} | {ratio('enc/paper', 'enc/whole')} "
            f"| {ratio('all/paper', 'all/whole')} |"]
    title = "### Seam error of the fitted decoding tiling, trained VAE"
    return None, title, "\n".join(out)


def _fmt(r, key, scale=1.0, fmt="{:.1f}") -> str:
    v = _val(r, key)
    return "–" if v is None else fmt.format(v * scale)


def run_find_max(args: argparse.Namespace) -> tuple[Runner, str, str]:
    runner = Runner(args)
    cands = list(range(32, args.find_max_limit + 1, 32))
    rows = []
    for method in ("patch", "whole"):
        over = {"max_windows": args.find_max_windows} if method == "patch" else {}
        probes: list[str] = []
        verdict: dict[int, str] = {}
        how: dict[int, str] = {}

        def probe(size: int) -> str:
            """'ok', 'fail' (memory) or 'unknown' (timeout / too slow / error)."""
            worst = "ok"
            for op in ("encode", "decode"):
                r = runner.run(runner.spec("maisi", method, op, size, **over), label="(find-max)")
                st = r["status"]
                tag = {"ok": "ok", "oom": "> cap", "skip-mem": "> cap (predicted)", "killed": "killed"}.get(st, st)
                if st == "ok":
                    tag += f" peak {_gib(r['peak_kib'])} GiB, {r['time_s']:.0f} s{' (est.)' if r.get('estimated') else ''}"
                elif st == "oom":
                    tag += f" (at {_gib(r.get('peak_kib'))} GiB)"
                probes.append(f"{size}^3 {op}: {tag}")
                if st == "ok":
                    continue
                worst = "fail" if st in ("oom", "skip-mem", "killed") else "unknown"
                how[size] = f"{op} {'predicted > cap, not run' if st == 'skip-mem' else tag}"
                break
            verdict[size] = worst
            return worst

        lo, hi = -1, len(cands)  # indices: cands[lo] known ok, cands[hi] known fail
        unknown: list[int] = []
        top = len(cands) - 1  # the upper limit first: if it fits, no search is needed
        v = probe(cands[top])
        if v == "ok":
            lo = top
        elif v == "fail":
            hi = top
        else:
            unknown.append(top)
        L, R = lo + 1, top - 1
        while L <= R:
            if time.time() - runner.started > args.find_max_budget_s:
                probes.append(f"(stopped: --find-max-budget-s {args.find_max_budget_s:g} reached)")
                break
            mid = (L + R) // 2
            v = probe(cands[mid])
            if v == "ok":
                lo, L = mid, mid + 1
            elif v == "fail":
                hi, R = mid, mid - 1
            else:  # unknown: cannot say; keep searching below it
                unknown.append(mid)
                R = mid - 1
        best = cands[lo] if lo >= 0 else None
        first_fail = cands[hi] if hi < len(cands) else None
        unk = sorted(cands[i] for i in unknown if i > lo and (hi >= len(cands) or i < hi))
        fail_cell = f"{first_fail}^3 ({how[first_fail]})" if first_fail else "–"
        rows.append((method, best, fail_cell, unk, probes))
    out = [
        "| path | largest side that encoded AND decoded under the cap | smallest side that failed (> cap) | undecided (timeout / too slow) | probes, in order |",
        "|---|---|---|---|---|",
    ]
    for method, best, fail, unk, probes in rows:
        name = "patch-wise" + (f" ({args.find_max_windows} network windows per pass)" if args.find_max_windows else "")
        if method == "whole":
            name = "whole-volume"
        lim = "" if fail != "–" else f" (search limit {args.find_max_limit})"
        out.append(
            f"| {name} | {f'{best}^3' if best else 'none'}{lim if best == args.find_max_limit else ''} "
            f"| {fail} | {', '.join(f'{u}^3' for u in unk) or '–'} | {'; '.join(probes)} |"
        )
    a = args
    notes = _config_lines(args, runner)
    notes += (
        f"\n- search: sides {cands[0]}..{cands[-1]} in steps of 32, the limit first, then binary search; a probe is "
        f"an encode child and, if that fits, a decode child; budget {a.find_max_budget_s:g} s"
    )
    if a.find_max_windows:
        notes += (
            f"\n- patch-wise probes run the network on {a.find_max_windows} windows per pass (`--find-max-windows`; "
            "memory as measured: all windows have the same shape, the stitching buffers are real)"
        )
    title = f"### Largest volume within {a.mem_cap_gb:g} GiB (`--find-max`), width `{a.width_preset}`"
    return runner, title, f"{notes}\n\n" + "\n".join(out)


# -- BENCHMARKS.md -----------------------------------------------------------------------------------------------


def write_md(path: Path, key: str, title: str, command: str, body: str) -> None:
    begin, end = f"<!-- vae_patchwise:{key} BEGIN -->", f"<!-- vae_patchwise:{key} END -->"
    block = f"{begin}\n{title}\n\nCommand: `{command}`\n\n{body}\n{end}\n"
    text = path.read_text() if path.exists() else BENCH_HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION_TITLE), None)
    if start is None:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"\n{SECTION_TITLE}\n\n{SECTION_INTRO}\n{block}"
        path.write_text(text)
        return
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "".join(lines[start:stop])
    if begin in section and end in section:
        pre, rest = section.split(begin, 1)
        _, post = rest.split(end, 1)
        section = pre + block.rstrip("\n") + post
    else:
        section = section.rstrip("\n") + "\n\n" + block + ("\n" if stop < len(lines) else "")
    path.write_text("".join(lines[:start]) + section + "".join(lines[stop:]))


# -- CLI ------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="MeduetVAE patch-wise (sliding-window) vs whole-volume encode/decode: time, throughput and peak "
        "memory per configuration in capped child processes, an AutoencoderKL baseline, and the largest volume "
        "that fits a memory cap (--find-max).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="cubic volume sides to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--width-preset", choices=("paper", "demo"), default="paper",
                   help="paper: MAISI_CT_ARCHITECTURE (64/128/256, 2 res blocks, 32 groups); demo: 32/64/64, 1, 16")
    p.add_argument("--patch-size", type=int, default=64, help="encode_patchwise image patch side")
    p.add_argument("--latent-patch-size", type=int, default=16, help="decode_patchwise latent window side")
    p.add_argument("--encode-overlap", type=float, default=0.0, help="encode_patchwise overlap")
    p.add_argument("--decode-overlap", type=float, default=0.25, help="decode_patchwise overlap")
    p.add_argument("--max-windows", type=int, default=0,
                   help="patch-wise: run the network on this many windows per pass and extrapolate the time (0: all)")
    p.add_argument("--baseline-sizes", type=int, nargs="*", default=None,
                   help="sizes for the AutoencoderKL baseline (default: 64 and 128, those <= max(--sizes)); "
                   "pass no value to skip it")
    p.add_argument("--baseline-models", nargs="*", choices=("aekl", "maisi-loopnorm"), default=["aekl"],
                   help="whole-volume baselines next to MeduetVAE as build_vae makes it: aekl = MONAI AutoencoderKL, "
                   "maisi-loopnorm = MeduetVAE with fast_norm=False (MAISI's per-group group norm)")
    p.add_argument("--no-patchwise", dest="patchwise", action="store_false",
                   help="only the whole-volume passes and baselines (no patch-wise rows)")
    p.add_argument("--profile", action="store_true",
                   help="also split a whole-volume encode+decode (smallest baseline size) into GroupNorm/Conv3d/rest")
    p.add_argument("--mem-cap-gb", type=float, default=16.0, help="RLIMIT_AS of every child, GiB (0: no cap)")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="timeout of every child process")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="run every configuration even when predicted to exceed the cap or --max-seconds")
    p.add_argument("--preflight-margin", type=float, default=0.15,
                   help="skip as '> cap (predicted)' only above cap * (1 + margin)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the children")
    p.add_argument("--find-max", action="store_true",
                   help="instead of the throughput tables: search the largest side that encodes and decodes under the cap")
    p.add_argument("--find-max-limit", type=int, default=512, help="largest side tried by --find-max")
    p.add_argument("--find-max-windows", type=int, default=2,
                   help="--find-max patch-wise probes: network windows run per pass (0: all)")
    p.add_argument("--find-max-budget-s", type=float, default=1800.0, help="stop the search after this many seconds")
    p.add_argument("--roundtrip", action="store_true",
                   help="instead of the throughput tables: whole-volume vs PatchEncoding round trips per voxel")
    p.add_argument("--tiled-sizes", type=int, nargs="*", default=[128, 256], help="--roundtrip: tiled sides")
    p.add_argument("--whole-sizes", type=int, nargs="*", default=[128, 192], help="--roundtrip: whole sides")
    p.add_argument("--encode-tiling", choices=("fixed", "fit"), default="fixed",
                   help="--roundtrip: PatchEncoding.tiling (fixed: --patch-size windows at --encode-overlap)")
    p.add_argument("--encode-min-overlap", type=int, default=0, help="--roundtrip: PatchEncoding.min_overlap")
    p.add_argument("--decode-window", type=int, default=40,
                   help="--roundtrip: PatchEncoding.decode_window (largest latent window side; 0: whole latent)")
    p.add_argument("--decode-min-overlap", type=int, default=2, help="--roundtrip: PatchEncoding.decode_overlap")
    p.add_argument("--encode-batch", type=int, default=4, help="--roundtrip: PatchEncoding.sw_batch_size")
    p.add_argument("--decode-batch", type=int, default=1, help="--roundtrip: PatchEncoding.decode_batch_size")
    p.add_argument("--seams", action="store_true",
                   help="instead of timing: seam error of a trained VAE (--vae-ckpt) for --decode-window tilings")
    p.add_argument("--vae-ckpt", default="bundles/meduet_vae/models/model.pt", help="--seams: trained VAE")
    p.add_argument("--datalist", default="data/sample/phantoms/datalist.json", help="--seams: volumes")
    p.add_argument("--split", default="test", help="--seams: datalist split")
    p.add_argument("--seam-cases", type=int, default=12, help="--seams: first N cases of the split")
    p.add_argument("--seam-width", type=int, default=2, help="--seams: voxels each side of a border")
    p.add_argument("--seam-patch-size", type=int, default=None,
                   help="--seams: encoding window (default: the VAE's PatchEncoding)")
    p.add_argument("--seam-decode-windows", type=int, nargs="*", default=None,
                   help="--seams: largest latent windows to compare (default: --decode-window)")
    p.add_argument("--decode-overlaps", type=int, nargs="+", default=[1, 2, 4], help="--seams: latent overlaps")
    p.add_argument("--decode-modes", nargs="+", default=["gaussian"], choices=("gaussian", "constant"),
                   help="--seams: blending of the decoding windows")
    p.add_argument("--write-md", action="store_true", help=f"write the tables into BENCHMARKS.md ({SECTION_TITLE!r})")
    p.add_argument("--md-path", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--md-key", default=None,
                   help="which block of the section to replace (default: 'find-max' or 'main-<width>')")
    p.add_argument("--json-out", type=Path, default=None, help="also dump every child result as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        res = _run_worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    for s in args.sizes:
        if s % 4:
            raise SystemExit(f"--sizes: {s} is not divisible by 4 (the VAE downsampling factor)")
    if args.seams:
        runner, title, body = run_seams(args)
        key = args.md_key or "seams"
    elif args.roundtrip:
        if args.decode_window == 0:
            args.decode_window = None
        runner, title, body = run_roundtrip(args)
        key = args.md_key or f"roundtrip-{args.width_preset}"
    elif args.find_max:
        runner, title, body = run_find_max(args)
        key = args.md_key or "find-max"
    else:
        runner, title, body = run_main(args)
        key = args.md_key or f"main-{args.width_preset}"
    argv_shown = sys.argv[1:] if argv is None else argv
    command = ".venv/bin/python bench/vae_patchwise.py " + " ".join(shlex.quote(x) for x in argv_shown)
    print(f"{title}\n\nCommand: `{command.strip()}`\n\n{body}\n")
    if args.json_out and runner is not None:
        args.json_out.write_text(json.dumps(runner.results, indent=1))
    if args.write_md:
        write_md(args.md_path, key, title, command.strip(), body)
        _log(f"wrote {args.md_path} (block {key!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
