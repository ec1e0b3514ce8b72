#!/usr/bin/env python
"""LDAE throughput: diffusion autoencoding of one volume in the VAE's latent space vs in image space, CPU.

    .venv/bin/python bench/ldae_throughput.py --sizes 32 64 --steps 10 1 --reps 7 3      # the recorded run, 23 min
    .venv/bin/python bench/ldae_throughput.py --sizes 32 --steps 2 --reps 2              # smoke, ~2 min

Diffusion autoencoding of one volume (``meduet.workflows.diffusion.autoencode``'s path, without the scoring) =
semantic encode (``net.encode_semantic``) + deterministic inversion (``invert_latents``, ``n`` steps: DDIM inversion
for objective ``ddpm``, LDAE's, or Euler for ``rflow``) + sampling back from the inverted noise (``sample_latents``,
``n`` steps), for three sides per volume size ``S`` (``--sizes``):

* ``latent``: the LDAE: VAE encode (``encode_mean`` of meduet_vae's demo checkpoint, ``--vae``) of the ``1xS^3``
  image, x latent scale factor, then the DiT (``build_dit("demo", condition="semantic")``: dim 128, depth 4,
  4 heads, patch 2; its semantic encoder: demo preset, patch 4) on the ``4x(S/4)^3`` latent, then VAE decode;
* ``image p2``: the same DiT width/depth/heads and the same patch sizes (DiT 2, encoder 4) on the ``1xS^3`` image
  itself, no VAE: an image-space diffusion autoencoder of equal generator width at full resolution, with 64x the
  tokens (the fair comparison: what LDAE's ~20x compares against is image-space diffusion autoencoders at full
  resolution, i.e. the same denoiser run on the image grid);
* ``image p8``: the same on the image with patch sizes x4 (DiT 8, encoder 16), i.e. as many tokens as the latent
  side (not the fair comparison: an 8^3 linear patch is a coarser model than a 2^3 patch of a learned latent; it
  shows what is left of the gap once the token count is equal).

Weights are untrained (random, seeded; the zero-initialised adaLN-Zero and final layers are re-drawn from N(0, 0.02)
so that no branch is a multiplication by zero); timing does not depend on the values. fp32, eval mode,
``torch.no_grad``, batch 1, input a seeded uniform random volume.

Threads: ``--threads`` defaults to 1. On a 2-core machine shared with other jobs, 2 OpenMP threads make every
parallel operator wait for whichever worker the OS has descheduled: measured 2026-12-07 at load average ~6, one
evaluation of the latent-side DiT (64 tokens) took 465 ms with 2 threads and 17 ms with 1, while the large
image-side operators lose little. That would inflate the latent side, i.e. shrink the ratio, by an artefact of the
load; one thread per process keeps both sides on the same footing. On an idle machine, ``--threads 2`` is fine.

Timing (the project's rule: ratios in one process): all sides of a size are built in this process and run
interleaved, one autoencoding of each side per repetition, the order rotated every repetition, after a warm-up
(each side's networks run once on its shapes). Every component is timed (VAE encode, semantic encode, inversion, sampling, VAE
decode). Reported per side: median seconds per volume at the measured ``--steps``, median seconds per network
evaluation (inversion + sampling time / 2n), and the ratio side / latent as the median and the interquartile range
of the per-repetition ratios (same repetition, so load on the machine hits both sides). When the measured steps are
fewer than ``--report-steps`` (default 10: 10 inversion + 10 sampling steps), the per-volume time at
``--report-steps`` is also given, *extrapolated* per repetition as (VAE + semantic encode) + (report_steps / steps)
x (inversion + sampling); the table marks it.

Memory: each side runs once more (``--mem-steps`` inversion + sampling steps; each step allocates the same, so the
peak does not grow with steps) in a fresh child process (this script with ``--worker``); reported are its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``: interpreter, torch, weights, input and the autoencoding's peak) and that
minus its RSS right before the autoencoding (weights and input already resident): the working memory of the
autoencoding. Children run one at a time, before the timing. ``--max-seconds`` is each child's timeout.

Writes ``--out`` (JSON: every time, the command, load averages) and prints a markdown table.
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

from _common import REPO, rss_kib, spawn

sys.path.insert(0, str(REPO / "common"))

RESULT_TAG = "@@LDAE_THROUGHPUT_RESULT "
VAE = "bundles/meduet_vae/models/model.pt"

#: the sides: DiT patch and semantic-encoder patch as multiples of (1, 1) on the latent or (f, f) on the image
SIDES = {
    "latent": dict(space="latent", patch=2, enc_patch=4),
    "image p2": dict(space="image", patch=2, enc_patch=4),
    "image p8": dict(space="image", patch=8, enc_patch=16),
}


# ----------------------------------------------------------------------------------------------------------------
# one side
# ----------------------------------------------------------------------------------------------------------------
class Side:
    """One diffusion autoencoder: the DiT (+ its semantic encoder), the VAE on the latent side, the input volume."""

    def __init__(self, name: str, size: int, vae_path: str, objective: str, seed: int) -> None:
        import torch

        from meduet import records
        from meduet.losses.diffusion import DiffusionObjective
        from meduet.networks.dit import build_dit

        self.name, self.size = name, size
        spec = SIDES[name]
        self.vae = None
        if spec["space"] == "latent":
            self.vae = records.load(vae_path, "cpu", expect="vae").eval()
            f = int(self.vae.downsample_factor)
            if size % (f * spec["enc_patch"]):
                raise SystemExit(f"--sizes: {size} must be divisible by {f * spec['enc_patch']}")
            self.scale = float(self.vae.meta.get("latent_scale_factor", 1.0))
            channels, grid = int(self.vae.arch["latent_channels"]), size // f
        else:
            channels, grid = 1, size
            if size % spec["enc_patch"]:
                raise SystemExit(f"--sizes: {size} must be divisible by {spec['enc_patch']} ({name})")
        torch.manual_seed(seed)
        self.net = build_dit("demo", condition="semantic", in_channels=channels, input_size=grid,
                             patch_size=spec["patch"], semantic_encoder={"patch_size": spec["enc_patch"]}).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        zeroed = [blk.adaLN_modulation[-1] for blk in self.net.blocks]
        zeroed += [self.net.final_layer.adaLN_modulation[-1], self.net.final_layer.linear]
        with torch.no_grad():
            for layer in zeroed:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
        self.objective = DiffusionObjective(objective)
        self.sampler = "rflow" if objective == "rflow" else "ddim"
        self.image = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(seed + 2))
        self.grid, self.channels = grid, channels
        self.tokens = (grid // spec["patch"]) ** 3
        self.enc_tokens = (grid // spec["enc_patch"]) ** 3
        self.params = sum(p.numel() for p in self.net.parameters())
        self.vae_params = sum(p.numel() for p in self.vae.parameters()) if self.vae is not None else 0

    def warm_up(self) -> None:
        """Each network once on this side's shapes (VAE encode/decode, semantic encoder, one DiT evaluation)."""
        import torch

        with torch.no_grad():
            x = self.image
            if self.vae is not None:
                x = self.vae.encode_mean(x)
                self.vae.decode(x)
            self.net(x, torch.full((1,), 500), {"semantic": self.net.encode_semantic(x)})

    def autoencode(self, steps: int) -> dict:
        """One volume -> code + inverted noise -> reconstruction; seconds per component and the output's finiteness."""
        import torch

        from meduet.engines.sampling import invert_latents, sample_latents

        t: dict = {"vae_encode": 0.0, "vae_decode": 0.0}
        with torch.no_grad():
            t0 = time.perf_counter()
            x = self.image
            if self.vae is not None:
                x = self.vae.encode_mean(x) * self.scale
            t1 = time.perf_counter()
            cond = {"semantic": self.net.encode_semantic(x)}
            t2 = time.perf_counter()
            noise = invert_latents(self.net, x, cond, self.objective, num_steps=steps)
            t3 = time.perf_counter()
            x_rec = sample_latents(self.net, list(x.shape), cond, self.objective, self.sampler, steps, noise=noise)
            t4 = time.perf_counter()
            out = x_rec
            if self.vae is not None:
                out = self.vae.decode(x_rec / self.scale)
            t5 = time.perf_counter()
        if self.vae is not None:
            t["vae_encode"], t["vae_decode"] = t1 - t0, t5 - t4
        t.update(semantic_encode=t2 - t1, invert=t3 - t2, sample=t4 - t3, total=t5 - t0,
                 finite=bool(torch.isfinite(out).all()), out_shape=list(out.shape))
        return t


def _memory_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    side = Side(spec["side"], spec["size"], spec["vae"], spec["objective"], spec["seed"])
    rss_before = rss_kib()
    t = side.autoencode(spec["steps"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_kib": peak, "delta_kib": peak - rss_before, "rss_before_kib": rss_before, "seconds": t["total"]}


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def _quartiles(v: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentile, linear interpolation (``statistics.quantiles(method="inclusive")``)."""
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def _fmt_ratio(v: list[float]) -> str:
    q1, q2, q3 = _quartiles(v)
    return f"{q2:.1f}x [{q1:.1f}, {q3:.1f}]" if q2 >= 10 else f"{q2:.2f}x [{q1:.2f}, {q3:.2f}]"


def run_size(size: int, steps: int, reps: int, a: argparse.Namespace) -> dict:
    names = [n for n in SIDES if n in a.sides]
    if "latent" not in names:
        raise SystemExit("--sides must include 'latent' (the ratios' denominator)")
    memory = {}
    if not a.no_memory:
        for n in names:
            spec = {"mode": "memory", "side": n, "size": size, "vae": a.vae, "objective": a.objective,
                    "seed": a.seed, "steps": a.mem_steps, "threads": a.threads}
            try:
                memory[n] = spawn(__file__, spec, RESULT_TAG, a.max_seconds)
            except Exception as e:  # noqa: BLE001 - a failed child is a row, not a crash
                memory[n] = {"error": str(e).splitlines()[0][:200]}
            print(f"{size}^3 {n}: memory {memory[n]}", flush=True)
    sides = {n: Side(n, size, a.vae, a.objective, a.seed) for n in names}
    for n, s in sides.items():  # warm-up: every network once on its input shape (kernel choice, caches)
        s.warm_up()
        print(f"{size}^3 {n}: warmed up ({s.tokens} DiT tokens)", flush=True)
    times: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(sides[n].autoencode(steps))
        print(f"{size}^3 rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]['total']:.2f} s" for n in names),
              flush=True)

    def at_report(t: dict) -> float:  # per-volume seconds at --report-steps (exact when steps == report_steps)
        fixed = t["vae_encode"] + t["semantic_encode"] + t["vae_decode"]
        return fixed + (t["invert"] + t["sample"]) * a.report_steps / steps

    rows = {}
    for n in names:
        s, tt, base = sides[n], times[n], times["latent"]
        per_eval = [(t["invert"] + t["sample"]) / (2 * steps) for t in tt]
        rows[n] = {
            "space": SIDES[n]["space"], "dit_patch": SIDES[n]["patch"], "encoder_patch": SIDES[n]["enc_patch"],
            "input": [s.channels] + [s.grid] * 3, "dit_tokens": s.tokens, "encoder_tokens": s.enc_tokens,
            "dit_params": s.params, "vae_params": s.vae_params, "times": tt,
            "median_s_per_volume": statistics.median(t["total"] for t in tt),
            "median_s_vae": statistics.median(t["vae_encode"] + t["vae_decode"] for t in tt),
            "median_s_semantic_encode": statistics.median(t["semantic_encode"] for t in tt),
            "median_s_per_network_eval": statistics.median(per_eval),
            "median_s_per_volume_at_report_steps": statistics.median(at_report(t) for t in tt),
            "ratio_per_volume": [t["total"] / b["total"] for t, b in zip(tt, base)],
            "ratio_per_volume_at_report_steps": [at_report(t) / at_report(b) for t, b in zip(tt, base)],
            "ratio_per_volume_vs_latent_without_vae": [
                t["total"] / (b["total"] - b["vae_encode"] - b["vae_decode"]) for t, b in zip(tt, base)],
            "ratio_per_network_eval": [p / ((b["invert"] + b["sample"]) / (2 * steps)) for p, b in zip(per_eval, base)],
            "all_finite": all(t["finite"] for t in tt),
            "memory": memory.get(n),
        }
    return {"size": size, "steps": steps, "reps": reps, "latent_size": sides["latent"].grid, "rows": rows}


def markdown(results: list[dict], a: argparse.Namespace) -> str:
    rs = a.report_steps
    lines = [f"| volume | side | DiT input / tokens (encoder tokens) | steps measured (inv + sample) | "
             f"median s / volume | of which VAE enc + dec | median s / network eval | "
             f"ratio side / latent per volume, median [IQR] | per network eval | "
             f"per volume at {rs} + {rs} steps | vs latent without VAE (cached latents), {rs} + {rs} | "
             "peak RSS MiB | RSS increase MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        steps = res["steps"]
        extrap = steps != rs
        for n, row in res["rows"].items():
            mem = row["memory"] or {}
            peak = f"{mem['peak_kib'] / 1024:.0f}" if "peak_kib" in mem else mem.get("error", "-")
            delta = f"{mem['delta_kib'] / 1024:.0f}" if "delta_kib" in mem else "-"
            shape = "x".join(str(v) for v in row["input"][:1]) + f"x{row['input'][1]}^3"
            base = n == "latent"
            star = " (extrapolated)" if extrap else ""
            at_rs = "1" if base else _fmt_ratio(row["ratio_per_volume_at_report_steps"]) + star
            wo = []  # per repetition, at --report-steps, against the latent side's diffusion part only
            for t, b in zip(row["times"], res["rows"]["latent"]["times"]):
                side_t = t["vae_encode"] + t["semantic_encode"] + t["vae_decode"] + \
                    (t["invert"] + t["sample"]) * rs / steps
                wo.append(side_t / (b["semantic_encode"] + (b["invert"] + b["sample"]) * rs / steps))
            lines.append(
                f"| {res['size']}^3 | {n} | {shape} / {row['dit_tokens']} ({row['encoder_tokens']}) | "
                f"{steps} + {steps} | {row['median_s_per_volume']:.2f} | "
                f"{row['median_s_vae']:.2f} | {row['median_s_per_network_eval']:.3f} | "
                f"{'1' if base else _fmt_ratio(row['ratio_per_volume'])} | "
                f"{'1' if base else _fmt_ratio(row['ratio_per_network_eval'])} | {at_rs} | "
                f"{_fmt_ratio(wo) + (star if not base else '')} | {peak} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image volume sides S (S^3)")
    p.add_argument("--steps", type=int, nargs="+", default=[10],
                   help="inversion steps = sampling steps, one value or one per size")
    p.add_argument("--reps", type=int, nargs="+", default=[5], help="timed repetitions, one value or one per size")
    p.add_argument("--report-steps", type=int, default=10, help="steps the per-volume ratio is also given at")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "rflow"], help="ddpm = LDAE's (DDIM)")
    p.add_argument("--vae", default=VAE, help="meduet_vae checkpoint (its demo-size trained model)")
    p.add_argument("--mem-steps", type=int, default=1, help="steps of the memory children")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="timeout of one memory child")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see the docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/ldae_throughput.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("MEDUET_PROGRESS", "0")
    if a.worker:
        print(RESULT_TAG + json.dumps(_memory_worker(json.loads(a.worker))), flush=True)
        return 0
    import torch

    torch.set_num_threads(a.threads)

    def per_size(v: list[int], what: str) -> list[int]:
        if len(v) == 1:
            return v * len(a.sizes)
        if len(v) != len(a.sizes):
            raise SystemExit(f"--{what}: give one value or one per size ({len(a.sizes)})")
        return v

    steps, reps = per_size(a.steps, "steps"), per_size(a.reps, "reps")
    command = ".venv/bin/python bench/ldae_throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    load_start, t_all = os.getloadavg(), time.perf_counter()
    results = [run_size(s, n, r, a) for s, n, r in zip(a.sizes, steps, reps)]
    md = markdown(results, a)
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "threads": a.threads, "objective": a.objective,
              "report_steps": a.report_steps, "vae": a.vae, "wall_s": time.perf_counter() - t_all,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "sizes": results, "markdown": md}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + md + f"\n\nwrote {out}; {result['wall_s'] / 60:.1f} min; load average {load_start} -> "
          f"{result['loadavg_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
