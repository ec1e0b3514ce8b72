#!/usr/bin/env python
"""Patch-wise VAE coding on CPU: windows one at a time (``sw_batch_size=1``) vs several per network call.

Why it matters: for a batch of one, PyTorch's CPU convolution picks its native ``slow_conv3d`` (im2col + GEMM)
instead of oneDNN (mkldnn) whenever the kernel is 3x3x3, ``groups == 1`` and ``N * C * D * H <= 20480`` (ATen's
``ConvParams::use_mkldnn``): every 3x3x3 convolution of a 32^3 window with <= 16 channels, and the whole decoder
input side at 8^3-16^3 latents. With two or more windows in the batch every convolution takes the oneDNN path.
This script measures what that costs for ``encode_patchwise`` / ``decode_patchwise`` of one volume.

What it measures (random weights seeded, eval mode, ``torch.no_grad``, fp32, ``--threads``):

* time of ``encode_patchwise`` (image windows ``--window``, overlap 0) and ``decode_patchwise`` (latent windows
  ``--window / 4``, overlap 0.25, Gaussian blending) of a ``--size``^3 volume for each ``sw_batch_size`` in
  ``--batches``; the calls are interleaved (order rotated every round) in one process and the speed-up is the
  median over rounds of time(sw_batch_size=1) / time(b) measured in the same round;
* the largest absolute difference of each output from the ``sw_batch_size=1`` output (same windows, same
  weights: only the convolution kernel differs);
* which convolution kernel ran (``aten::slow_conv3d_forward`` vs ``aten::mkldnn_convolution``) from the profiler;
* peak memory: every ``sw_batch_size`` runs once more in a fresh child process (this script with ``--worker``),
  reporting its peak RSS (``ru_maxrss``) and that minus its RSS right before the first call.

Examples::

    .venv/bin/python bench/sliding_batch.py                       # demo width, 64^3 volume, 32^3 windows
    .venv/bin/python bench/sliding_batch.py --size 96 --write-md  # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

from _common import REPO, replace_section, rss_kib, spawn

sys.path.insert(0, str(REPO / "common"))

SECTION_TITLE = "## meduet_vae: sliding windows one at a time vs batched (CPU)"
RESULT_TAG = "@@SLIDING_BATCH_RESULT "

#: VAE widths of meduet_vae's presets (bundles/meduet_vae/configs/presets/*.yaml); ``paper`` is MAISI's.
WIDTHS = {
    "demo": dict(num_channels=[16, 32, 64], num_res_blocks=[1, 1, 1], norm_num_groups=8),
    "paper": None,
}


def _setup(spec: dict):
    import torch

    from meduet.networks.vae import MAISI_CT_ARCHITECTURE, build_vae

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    arch = dict(MAISI_CT_ARCHITECTURE)
    if WIDTHS[spec["width"]]:
        arch.update(WIDTHS[spec["width"]])
    vae = build_vae(arch).eval()
    x = torch.rand(1, 1, *([spec["size"]] * 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode_mean(x)
    return torch, vae, x, z


def _call(vae, what: str, x, z, window: int, b: int):
    from meduet.networks.vae import decode_patchwise, encode_patchwise

    if what == "encode":
        return encode_patchwise(vae, x, patch_size=window, overlap=0.0, sw_batch_size=b)
    return decode_patchwise(vae, z, latent_patch_size=window // vae.downsample_factor, overlap=0.25, sw_batch_size=b)


def _memory_worker(spec: dict) -> dict:
    torch, vae, x, z = _setup(spec)
    rss_before = rss_kib()
    with torch.no_grad():
        _call(vae, spec["what"], x, z, spec["window"], spec["b"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_kib": peak, "delta_kib": peak - rss_before}


def _timing(spec: dict) -> dict:
    torch, vae, x, z = _setup(spec)
    from torch.profiler import ProfilerActivity, profile

    out: dict = {}
    for what in ("encode", "decode"):
        ref = None
        times: dict[int, list[float]] = {b: [] for b in spec["batches"]}
        ratios: dict[int, list[float]] = {b: [] for b in spec["batches"]}
        diffs: dict[int, float] = {}
        kernels: dict[int, list[str]] = {}
        with torch.no_grad():
            for b in spec["batches"]:  # warm-up, reference outputs, kernels
                y = _call(vae, what, x, z, spec["window"], b)
                ref = y if ref is None else ref
                diffs[b] = float((y - ref).abs().max())
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    _call(vae, what, x, z, spec["window"], b)
                names = {ev.key for ev in prof.key_averages()}
                kernels[b] = sorted(n for n in names if n in ("aten::slow_conv3d_forward", "aten::mkldnn_convolution"))
            for r in range(spec["repeats"]):
                order = spec["batches"][r % len(spec["batches"]):] + spec["batches"][: r % len(spec["batches"])]
                round_t = {}
                for b in order:
                    t0 = time.perf_counter()
                    _call(vae, what, x, z, spec["window"], b)
                    round_t[b] = time.perf_counter() - t0
                    times[b].append(round_t[b])
                for b in spec["batches"]:
                    ratios[b].append(round_t[spec["batches"][0]] / round_t[b])
        out[what] = {
            "median_s": {b: statistics.median(v) for b, v in times.items()},
            "speedup": {b: statistics.median(v) for b, v in ratios.items()},
            "max_abs_diff": diffs,
            "kernels": kernels,
        }
    return out


def _spawn(spec: dict, timeout: float = 1800.0) -> dict:
    return spawn(__file__, spec, RESULT_TAG, timeout)


def run(a: argparse.Namespace) -> str:
    if a.batches[0] != 1:
        raise SystemExit("--batches must start with 1 (the reference)")
    spec = {"width": a.width_preset, "size": a.size, "window": a.window, "threads": a.threads,
            "batches": a.batches, "repeats": a.repeats}
    timing = _spawn({**spec, "mode": "timing"})
    windows_enc = (-(-a.size // a.window)) ** 3
    rows = ["| pass | sw_batch_size | median s | speed-up vs 1 (median of paired rounds) | max abs diff vs 1 | "
            "conv kernel | peak RSS MiB | RSS increase MiB |", "|---|---|---|---|---|---|---|---|"]
    for what in ("encode", "decode"):
        t = timing[what]
        for b in a.batches:
            mem = _spawn({**spec, "mode": "memory", "what": what, "b": b})
            key = str(b)
            rows.append(
                f"| {what} | {b} | {t['median_s'][key]:.3f} | {t['speedup'][key]:.2f}x | {t['max_abs_diff'][key]:.1e} | "
                f"{', '.join(k.replace('aten::', '') for k in t['kernels'][key]) or '-'} | {mem['peak_kib'] / 1024:.0f} | "
                f"{mem['delta_kib'] / 1024:.0f} |")
    config = (f"VAE width `{a.width_preset}`, volume {a.size}^3, encode windows {a.window}^3 (overlap 0, "
              f"{windows_enc} windows), decode latent windows {a.window // 4}^3 (overlap 0.25), {a.repeats} rounds, "
              f"fp32, {a.threads} threads, torch {timing.get('torch', '')}")
    return config + "\n\n" + "\n".join(rows)


def write_md(path: Path, command: str, body: str) -> None:
    stamp = time.strftime("%Y-%m-%d")
    block = (f"{SECTION_TITLE}\n\nProduced by `bench/sliding_batch.py` (see its docstring). Command (run {stamp}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs):\n\n```bash\n{command}\n```\n\n{body}\n")
    replace_section(path, SECTION_TITLE, block)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width-preset", choices=sorted(WIDTHS), default="demo")
    p.add_argument("--size", type=int, default=64, help="cubic volume side")
    p.add_argument("--window", type=int, default=32, help="image-space window side (decode: window / 4 latent)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="sw_batch_size values, first = 1")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-md", action="store_true", help="write this benchmark's section of BENCHMARKS.md")
    p.add_argument("--md-path", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if spec["mode"] == "timing":
            import torch

            res = _timing(spec)
            res["torch"] = torch.__version__
        else:
            res = _memory_worker(spec)
        print(RESULT_TAG + json.dumps(res))
        return 0
    body = run(a)
    command = ".venv/bin/python bench/sliding_batch.py " + shlex.join(sys.argv[1:])
    print(body)
    if a.write_md:
        write_md(a.md_path, command.strip(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
