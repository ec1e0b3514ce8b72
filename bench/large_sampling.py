#!/usr/bin/env python
"""meduet_diffusion: sampling a paper-sized volume (a 4x64^3 latent -> a 256^3 image) and decoding it through
meduet_vae's bounded-memory path (sample.yaml ``latent_size: 64``, ``decode_window: 40``): peak memory per phase.

Each row is a fresh child process (``--worker``), fp32 on CPU; "RSS increase" is the peak RSS (``getrusage``)
after the phase minus the RSS right before it (weights and inputs already loaded), so it is the phase's working
memory; "peak RSS" is the whole process's peak.

* ``sample``: latents of ``--size``^3 from a generator (``--steps`` sampler steps, batch 1, time per step):
  ``demo`` = the quick start's trained generator (``bundles/meduet_diffusion/models/model.pt``, its own sampler and
  condition: factors from its prior; random weights of the demo preset if it has not been trained), ``paper-depth1``
  = DiT-B/2's width (dim 768, 12 heads) with ONE block and random weights, unconditional: without gradients the
  blocks run one after another, so the working memory of the 12-block network is the same and its time per step is
  about 12 times the one block's (the rest of the weights, 11 blocks = ~0.3 GiB fp32, come on top of the peak).
* ``decode``: a random scaled latent of ``--size``^3 decoded by a VAE through ``PatchEncoding.decode`` with
  ``decode_window`` (latent windows no larger than it, overlap 2, Gaussian blending, one window at a time) or whole
  (one decoder call): ``demo`` = the quick start's trained VAE (width 16/32/64), ``paper`` = MAISI's CT
  architecture (64/128/256) with random weights (memory and time do not depend on the weights).

    .venv/bin/python bench/large_sampling.py --write-md
    .venv/bin/python bench/large_sampling.py --rows sample:demo:64 decode:demo:64:40      # a subset
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, replace_section, rss_kib, spawn  # noqa: E402

sys.path.insert(0, str(REPO / "common"))

SECTION_TITLE = "## meduet_diffusion: sampling a paper-sized volume (4x64^3 latent -> 256^3) in bounded memory"
RESULT_TAG = "@@LARGE_SAMPLING "
GENERATOR = REPO / "bundles/meduet_diffusion/models/model.pt"
PRIOR = REPO / "bundles/meduet_diffusion/models/factor_prior.pt"
VAE = REPO / "bundles/meduet_vae/models/model.pt"
# phase:network:latent size[:decode window]
DEFAULT_ROWS = ("sample:demo:16", "sample:demo:64", "sample:paper-depth1:64", "decode:demo:32:whole",
                "decode:demo:64:40", "decode:paper:64:40")


def _sample(spec: dict) -> dict:
    import torch

    from meduet.engines.sampling import sample_latents
    from meduet.losses.diffusion import DiffusionObjective
    from meduet.networks.dit import build_dit
    from meduet.workflows.diffusion.common import generate, load_generator, load_prior

    size, steps = int(spec["size"]), int(spec["steps"])
    gen = torch.Generator().manual_seed(0)
    if spec["net"] == "demo" and GENERATOR.exists():
        net, objective, rec = load_generator(str(GENERATOR), "cpu")
        prior = load_prior(str(PRIOR), "cpu") if rec.get("condition") == "factors" else None
        site = (rec.get("domains") or ["all"])[0] if rec.get("condition") != "none" else "all"
        params = sum(p.numel() for p in net.parameters())
        before = rss_kib()
        t0 = time.perf_counter()
        z = generate(net, objective, rec, site, 1, None, prior, None, None, steps, 1.5, gen, 1, "cpu",
                     latent_size=size)
        source = "trained " + str(GENERATOR.relative_to(REPO))
    else:
        kw = dict(depth=1) if spec["net"] == "paper-depth1" else {}
        net = build_dit("paper" if spec["net"] == "paper-depth1" else "demo", input_size=size, condition="none",
                        **kw).eval()
        for p in net.parameters():  # adaLN-zero networks output zeros at init: give the blocks work to do
            torch.nn.init.normal_(p, std=0.02)
        objective = DiffusionObjective("rflow")
        params = sum(p.numel() for p in net.parameters())
        before = rss_kib()
        t0 = time.perf_counter()
        z = sample_latents(net, [1, 4, size, size, size], None, objective, sampler="rflow", num_steps=steps,
                           guidance_scale=1.0, generator=gen)
        source = f"random weights, {spec['net']}"
    seconds = time.perf_counter() - t0
    return {"seconds_per_step": seconds / steps, "params": params, "source": source, "before_kib": before,
            "finite": bool(torch.isfinite(z).all()), "shape": list(z.shape)}


def _decode(spec: dict) -> dict:
    import torch

    from meduet import records
    from meduet.networks.patchwise import PatchEncoding
    from meduet.networks.vae import MAISI_CT_ARCHITECTURE, build_vae

    size, window = int(spec["size"]), spec["window"]
    if spec["net"] == "demo":
        vae = records.load(str(VAE), "cpu", expect="vae").eval()
        source = "trained " + str(VAE.relative_to(REPO))
    else:
        torch.manual_seed(0)
        vae = build_vae(dict(MAISI_CT_ARCHITECTURE)).eval()
        source = "MAISI CT architecture, random weights"
    scheme = PatchEncoding.of(vae, decode_window=None if window == "whole" else int(window))
    if window == "whole":
        scheme = PatchEncoding(**{**scheme.record(), "decode_window": None})
    z = torch.randn(1, 4, size, size, size, generator=torch.Generator().manual_seed(0))
    before = rss_kib()
    t0 = time.perf_counter()
    with torch.no_grad():
        img = scheme.decode(vae, z)
    seconds = time.perf_counter() - t0
    tiles = scheme.decode_tiling([size] * 3)
    return {"seconds": seconds, "before_kib": before, "source": source, "shape": list(img.shape),
            "windows": None if tiles is None else tiles[0], "finite": bool(torch.isfinite(img).all()),
            "params": sum(p.numel() for p in vae.decoder.parameters())}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    out = _sample(spec) if spec["phase"] == "sample" else _decode(spec)
    out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["increase_kib"] = out["peak_kib"] - out["before_kib"]
    return out


def _parse_row(row: str) -> dict:
    parts = row.split(":")
    spec = {"phase": parts[0], "net": parts[1], "size": int(parts[2])}
    if spec["phase"] == "decode":
        spec["window"] = parts[3] if len(parts) > 3 else "whole"
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                   help="phase:network:latent size[:decode window|whole]")
    p.add_argument("--steps", type=int, default=2, help="sampler steps of the sample rows (time is per step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-md", action="store_true")
    p.add_argument("--worker")
    args = p.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    results = []
    for row in args.rows:
        spec = {**_parse_row(row), "steps": args.steps, "threads": args.threads}
        r = {**spec, **spawn(__file__, spec, RESULT_TAG, timeout=7200)}
        results.append(r)
        what = (f"{r['seconds_per_step']:.1f} s/step" if spec["phase"] == "sample"
                else f"{r['seconds']:.1f} s, windows {r['windows']}")
        print(f"{row:28s} image {4 * spec['size']}^3  RSS increase {r['increase_kib'] / 2**20:6.2f} GiB  "
              f"peak {r['peak_kib'] / 2**20:6.2f} GiB  {what}  ({r['source']})", flush=True)
    if args.write_md:
        cmd = "python bench/large_sampling.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        lines = [SECTION_TITLE, "", f"Produced by `bench/large_sampling.py` (its docstring): `{cmd}` (fp32, CPU, "
                 f"{args.threads} threads, each row a fresh process, batch 1).", "",
                 "| phase | network | latent | image | decode windows | RSS increase (GiB) | peak RSS (GiB) | time | "
                 "weights |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            s = r["size"]
            time_s = (f"{r['seconds_per_step']:.1f} s/step" if r["phase"] == "sample" else f"{r['seconds']:.1f} s")
            windows = ("-" if r["phase"] == "sample" else "whole" if r["windows"] is None
                       else "x".join(str(w) for w in r["windows"]) + " (latent)")
            lines.append(f"| {r['phase']} | {r['net']} ({r['params'] / 1e6:.1f} M) | 4x{s}^3 | {4 * s}^3 | {windows} | "
                         f"{r['increase_kib'] / 2**20:.2f} | {r['peak_kib'] / 2**20:.2f} | {time_s} | {r['source']} |")
        replace_section(REPO / "BENCHMARKS.md", SECTION_TITLE, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
