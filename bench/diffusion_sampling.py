#!/usr/bin/env python
"""meduet_diffusion sampling cost and quality: SiT (objective rflow) with few Euler ODE steps vs DiT (objective
ddpm) with DDIM vs DiT with full DDPM (1000 steps), CPU.

    .venv/bin/python bench/diffusion_sampling.py                     # uses the convergence bench's factors runs
    .venv/bin/python bench/diffusion_sampling.py --rounds 2 --rflow-steps 5,10 --ddim-steps 25 --no-ddpm

Networks: ``<runs>/ddpm_<condition>/models/model.pt`` (DiT) and ``<runs>/rflow_<condition>/models/model.pt`` (SiT),
the EMA generators ``bench/diffusion_convergence.py`` leaves behind (default condition ``factors``); a missing one
is trained first with ``python -m monai.bundle run training`` (train.yaml + the preset, same overrides as the
convergence bench). Settings: SiT ``rflow`` with ``--rflow-steps`` (5, 10, 20), DiT ``ddim`` with ``--ddim-steps``
(25, 50; eta 0), DiT ``ddpm`` with all 1000 training timesteps; classifier-free guidance ``--guidance`` (1 = plain
conditional).

Timing (as ``bench/seg_step.py``): one process, ``--threads`` torch threads, every setting samples one batch of
``--batch`` latents per round, settings interleaved with the order rotated each round; round ``r`` uses the same
initial noise (seed ``seed + r``) and the same conditions (the factors of reference latents ``r*batch ...``;
computed once before timing, not timed) for every setting. Reported: median seconds per batch, and the ratio vs
DDPM-1000 as the median over rounds of (setting / DDPM-1000 in the same round). One warm-up call per network
(2 steps) before the first round.

Quality: the ``rounds x batch`` latents each setting generated in the timed rounds (24 by default) against the real
test latents of the sites seen in training (centre crops), both through meduet_pretrain's frozen encoder
(``EncoderFeatures``, pooled content + style; a *proxy*, see ``meduet.metrics.generation``), Frechet distance; the
real-vs-real floor (training vs those test crops) is reported too. NB with the factors condition the generator is
given the reference latents' own pooled factors, i.e. much of what the proxy measures.

Writes ``--out`` (JSON: every time, every number, the command) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "bench"))

DATALIST = "bundles/meduet_vae/latents/phantoms/datalist.json"
PRETRAIN = "bundles/meduet_pretrain/models/model.pt"


def ensure_model(root: Path, objective: str, condition: str, preset: str) -> Path:
    model = root / "models" / "model.pt"
    if model.is_file():
        return model
    cfg = ("['bundles/meduet_diffusion/configs/train.yaml',"
           f"'bundles/meduet_diffusion/configs/presets/{preset}.yaml']")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", cfg, "--bundle_root", str(root),
           "--objective_name", objective, "--condition", condition, "--resume", "False",
           "--siblings", str(REPO / "bundles")]
    print(f"training the missing {objective}/{condition} model: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, MEDUET_PROGRESS="0")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="bench/results/diffusion_convergence", help="bundle roots <objective>_<cond>")
    p.add_argument("--condition", default="factors", choices=["none", "metadata", "factors"])
    p.add_argument("--preset", default="demo", help="for training a missing model")
    p.add_argument("--rflow-steps", default="5,10,20")
    p.add_argument("--ddim-steps", default="25,50")
    p.add_argument("--no-ddpm", action="store_true", help="leave out DDPM-1000 (ratios are then vs the first row)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--real-split", default="test")
    p.add_argument("--real-sites", default="seen", choices=["seen", "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/diffusion_sampling.json")
    args = p.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("MEDUET_PROGRESS", "0")
    import torch

    from diffusion_convergence import FidProxy, conditions_for, crops, reference_items, single_thread
    from meduet.latent import LatentSpace
    from meduet.workflows.diffusion.common import conditioner_for, load_generator
    from meduet.engines.sampling import sample_latents
    from meduet.metrics.features import EncoderFeatures
    from meduet.metrics.generation import fid

    torch.set_num_threads(args.threads)
    command = ".venv/bin/python bench/diffusion_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    load_start = os.getloadavg()
    runs = Path(args.runs)
    nets = {}
    for obj in ("ddpm", "rflow"):
        path = ensure_model(runs / f"{obj}_{args.condition}", obj, args.condition, args.preset)
        nets[obj] = (path, *load_generator(str(path), "cpu"))
    rec = nets["rflow"][3]
    space, crop = LatentSpace.from_record(rec), [int(c) for c in rec["crop_size"]]
    for obj, (path, net, _, r) in nets.items():
        if r.get("condition") != args.condition or [int(c) for c in r["crop_size"]] != crop:
            raise SystemExit(f"{path}: condition {r.get('condition')} / crop {r['crop_size']} do not match")

    settings = [("SiT", "rflow", "rflow", int(s)) for s in args.rflow_steps.split(",") if s]
    settings += [("DiT", "ddpm", "ddim", int(s)) for s in args.ddim_steps.split(",") if s]
    if not args.no_ddpm:
        settings.append(("DiT", "ddpm", "ddpm", int(nets["ddpm"][2].num_train_timesteps)))
    names = [f"{m} {sm} {n}" for m, _, sm, n in settings]
    base = names[-1] if not args.no_ddpm else names[0]

    refs = reference_items(DATALIST, args.real_split, args.real_sites)
    n_total = args.rounds * args.batch
    conditioner = conditioner_for(rec, PRETRAIN, "cpu") if args.condition == "factors" else None
    cond_all = conditions_for(args.condition, conditioner, refs, n_total, crop, space)
    extractor = EncoderFeatures(PRETRAIN, latent_space=space, inputs="raw")
    proxy = {obj: FidProxy(extractor, crops(refs, crop), space, crop, nets[obj][2], "rflow", 1, args.guidance,
                           args.seed, feature_threads=args.feature_threads) for obj in nets}
    with single_thread(args.feature_threads):
        floor = fid(proxy["rflow"].real_feats, extractor(crops(reference_items(DATALIST, "training", "all"), crop)))

    def run(setting, r: int):
        _, obj, sampler, steps = setting
        _, net, objective, _ = nets[obj]
        c = None if cond_all is None else {k: v[r * args.batch:(r + 1) * args.batch] for k, v in cond_all.items()}
        gen = torch.Generator().manual_seed(args.seed + r)
        t0 = time.perf_counter()
        z = sample_latents(net, [args.batch, int(net.arch["in_channels"]), *crop], c, objective, sampler=sampler,
                           num_steps=steps, guidance_scale=args.guidance if c is not None else 1.0, generator=gen)
        return time.perf_counter() - t0, z

    for obj, sampler in (("rflow", "rflow"), ("ddpm", "ddim")):  # warm-up
        run(("", obj, sampler, 2), 0)
    times = {n: [] for n in names}
    samples = {n: [] for n in names}
    t_all = time.perf_counter()
    for r in range(args.rounds):
        order = list(range(len(settings)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            dt, z = run(settings[i], r)
            times[names[i]].append(dt)
            samples[names[i]].append(z)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    wall = time.perf_counter() - t_all

    rows = []
    for (model, obj, sampler, steps), n in zip(settings, names):
        q = proxy[obj].score(torch.cat(samples[n]))
        ratio = statistics.median(a / b for a, b in zip(times[n], times[base]))
        rows.append({"setting": n, "model": model, "objective": obj, "sampler": sampler, "steps": steps,
                     "times_s": times[n], "median_s_per_batch": statistics.median(times[n]),
                     "median_s_per_step": statistics.median(times[n]) / steps, "ratio_vs_base": ratio, **q})
    lines = [f"| setting | network evaluations | median s / batch of {args.batch} | time ratio vs {base} | "
             f"FID proxy ({n_total} generated vs {len(refs)} real) | generated latent std |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['steps']} | {row['median_s_per_batch']:.2f} | "
                     f"{row['ratio_vs_base']:.4f} | {row['fid_proxy']:.3f} | {row['gen_std']:.3f} |")
    real_std = float(crops(refs, crop).std())
    lines += ["", f"Real-vs-real floor of the proxy (training crops vs the reference test crops): {floor:.3f}; "
              f"real latent std {real_std:.3f}."]
    md = "\n".join(lines)
    result = {"command": command, "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
              "rounds": args.rounds, "condition": args.condition, "guidance": args.guidance, "baseline": base,
              "models": {obj: str(v[0]) for obj, v in nets.items()}, "num_references": len(refs),
              "real_vs_real_floor": floor, "real_latent_std": real_std, "timed_wall_s": wall,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows, "markdown": md}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + md + f"\n\nwrote {out}; timed rounds {wall / 60:.1f} min; load average {load_start} -> "
          f"{result['loadavg_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
