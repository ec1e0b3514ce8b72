#!/usr/bin/env python
"""Why DiT (objective ddpm) samples at demo size are several times wider than real latents, and what fixes it.

    PYTHONPATH=common .venv/bin/python bench/diffusion_dit_spread.py                  # every variant, demo preset
    PYTHONPATH=common .venv/bin/python bench/diffusion_dit_spread.py --variants eps,v --epochs 40 --condition none

Every variant is one run of meduet_diffusion's own training workflow (train.yaml + the preset, parsed in this process
with MONAI's ``ConfigParser``; overrides: ``bundle_root`` = ``<out>/<variant>``, ``resume`` false, ``objective_name``
ddpm, ``condition`` (default none), ``max_epochs``, ``prediction_type``, ``zero_terminal_snr``; the factor prior is
not fitted). Variants (name: prediction, schedule, epochs multiplier):

* ``eps``: noise prediction, the preset's scaled-linear betas (the paper's DiT objective, without its learned sigma);
* ``eps_x4``: the same trained 4x as long (is it the budget?);
* ``v``: v-prediction (not in the paper);
* ``v_zsnr``: v-prediction with the betas rescaled to zero terminal SNR (not in the paper).

Measured for the EMA generator after training, all with fixed seeds:

* **x0 error per timestep**: RMSE of MONAI's DDIM ``pred_original_sample`` (the x0 the sampler builds from the
  network's output) against the clean validation + test latents (centre crops, scaled units) at t = 999, 900, 750,
  500, 250, 100, 10, noise seed 0; and the RMSE of the network output against its target there;
* **samples**: ``--samples`` latents from seed 0 (no condition) with DDIM (eta 0, ``--ddim-steps``) and, with
  ``--ddpm-samples`` > 0, ancestral DDPM through all 1000 steps; for ``eps`` also DDIM with the predicted x0 clipped to
  +-``--clip`` (MONAI's ``clip_sample``, scaled latent units) — a sampler-side fix that needs no retraining. Per
  setting: std of the generated latents (raw units) vs the real ones, and the FID proxy and RBF-MMD of their
  meduet_pretrain encoder features (``EncoderFeatures``, as evaluate.yaml without MedicalNet) against the real test
  latents; real-vs-real floor: training vs test crops.

Writes ``--out`` (JSON with every number and the command) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "bench"))

VARIANTS = {  # name: (prediction_type, zero_terminal_snr, epochs multiplier)
    "eps": ("epsilon", False, 1),
    "eps_x4": ("epsilon", False, 4),
    "v": ("v_prediction", False, 1),
    "v_zsnr": ("v_prediction", True, 1),
}
TIMESTEPS = (999, 900, 750, 500, 250, 100, 10)


def x0_errors(net, objective, x0, seed: int = 0) -> dict:
    """RMSE of the sampler's x0 estimate and of the raw prediction per timestep (scaled units)."""
    import torch

    from meduet.engines.sampling import predict

    sched = objective.make_scheduler("ddim")
    sched.set_timesteps(objective.num_train_timesteps)  # step t -> t-1; only pred_original_sample is used
    gen = torch.Generator().manual_seed(seed)
    out = {}
    net.eval()
    with torch.no_grad():
        for t in TIMESTEPS:
            noise = torch.randn(x0.shape, generator=gen)
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)
            xt = objective.add_noise(x0, noise, tt)
            pred = predict(net, xt, tt, None, 1.0)
            _, x0_hat = sched.step(pred, t, xt)
            target = objective.target(x0, noise, tt)
            out[str(t)] = {"x0_rmse": float((x0_hat - x0).pow(2).mean().sqrt()),
                           "pred_rmse": float((pred - target).pow(2).mean().sqrt()),
                           "sqrt_alpha_bar": float(sched.alphas_cumprod[t].sqrt())}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--condition", default="none")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's max_epochs")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-samples", type=int, default=0)
    p.add_argument("--clip", default="3,5", help="x0 clip bounds tried on the eps variant (scaled units)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default="bench/results/diffusion_dit_spread")
    p.add_argument("--out", default="bench/results/diffusion_dit_spread.json")
    p.add_argument("--reuse", action="store_true", help="skip training where <root>/<variant>/models/model.pt exists")
    p.add_argument("--mem-gb", type=float, default=8.0, help="address-space cap of this process (RLIMIT_AS)")
    args = p.parse_args()
    import resource

    cap = int(args.mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    import torch
    from monai.utils import set_determinism

    from diffusion_convergence import crops, make_parser, reference_items, single_thread
    from meduet import records
    from meduet.engines.sampling import sample_latents
    from meduet.losses.diffusion import DiffusionObjective
    from meduet.metrics.features import EncoderFeatures
    from meduet.metrics.generation import fid, mmd

    torch.set_num_threads(args.threads)
    results: dict = {"command": " ".join(sys.argv), "args": vars(args), "variants": {}}
    real_std = floor = None
    for name in args.variants.split(","):
        pred_type, zsnr, mult = VARIANTS[name]
        root = REPO / args.root / name
        over = {"bundle_root": str(root), "resume": False, "objective_name": "ddpm", "condition": args.condition,
                "prediction_type": pred_type, "zero_terminal_snr": zsnr}
        parser = make_parser(args.preset, over)
        epochs = (args.epochs or int(parser.get_parsed_content("max_epochs"))) * mult
        parser["max_epochs"] = epochs
        crop = [int(c) for c in parser.get_parsed_content("crop_size")]
        space = parser.get_parsed_content("latent_space")
        dl = parser.get_parsed_content("latent_datalist")
        model = root / "models" / "model.pt"
        t0 = time.perf_counter()
        if not (args.reuse and model.is_file()):
            set_determinism(seed=int(parser.get_parsed_content("seed")))
            trainer = parser.get_parsed_content("train#trainer")
            trainer.run()
            steps = int(trainer.state.iteration)
        else:
            steps = None
        train_s = time.perf_counter() - t0
        net = records.load(model, expect="dit").eval()
        objective = DiffusionObjective.from_config(net.meta["objective"])
        if real_std is None:  # the references, once
            test_raw = crops(reference_items(dl, "test", "seen"), crop)
            train_raw = crops(reference_items(dl, "training", "all"), crop)
            val_raw = crops(reference_items(dl, "validation", "all"), crop)
            extractor = EncoderFeatures(str(REPO / parser.get_parsed_content("pretrain_ckpt")), latent_space=space,
                                        inputs="raw")
            with single_thread(1):
                real_feats, train_feats = extractor(test_raw), extractor(train_raw)
            real_std = float(test_raw.std())
            floor = {"fid": fid(train_feats, real_feats), "mmd": mmd(train_feats, real_feats)}
            results.update(real_std=real_std, floor=floor, n_real=len(test_raw),
                           x0_latents=len(val_raw) + len(test_raw))
            x0_ref = space.scale(torch.cat([val_raw, test_raw]))
        row = {"prediction_type": pred_type, "zero_terminal_snr": zsnr, "epochs": epochs, "steps": steps,
               "train_wall_s": round(train_s, 1), "x0_error": x0_errors(net, objective, x0_ref), "samples": {}}
        settings = [("ddim", args.ddim_steps, None)]
        if name == "eps":
            settings += [("ddim", args.ddim_steps, float(c)) for c in args.clip.split(",") if c]
        if args.ddpm_samples > 0:
            settings.append(("ddpm", 1000, None))
        for sampler, n_steps, clip in settings:
            obj = objective if clip is None else DiffusionObjective.from_config(
                {**objective.config(), "clip_sample": True, "clip_sample_value": clip})
            n = args.ddpm_samples if sampler == "ddpm" else args.samples
            gen = torch.Generator().manual_seed(0)
            t1 = time.perf_counter()
            z = sample_latents(net, [n, int(net.arch["in_channels"]), *crop], None, obj, sampler=sampler,
                               num_steps=n_steps, generator=gen)
            raw = space.unscale(z)
            with single_thread(1):
                feats = extractor(raw)
            key = f"{sampler}{n_steps}" + (f"_clip{clip:g}" if clip is not None else "")
            row["samples"][key] = {"n": n, "std": float(raw.std()), "mean": float(raw.mean()),
                                   "fid_proxy": fid(real_feats, feats), "mmd": mmd(real_feats, feats),
                                   "sample_wall_s": round(time.perf_counter() - t1, 1)}
            print(f"[{name}] {key}: {row['samples'][key]}", flush=True)
        print(f"[{name}] x0 RMSE: " + ", ".join(f"t={t} {v['x0_rmse']:.3f}" for t, v in row["x0_error"].items()),
              flush=True)
        results["variants"][name] = row
        out = REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(tables(results))
    return 0


def tables(r: dict) -> str:
    lines = [f"Real test latents (seen sites, n={r['n_real']}): std {r['real_std']:.3f}; real-vs-real floor (training vs "
             f"test): FID proxy {r['floor']['fid']:.3f}, MMD {r['floor']['mmd']:.4f}.", "",
             "| variant | steps | sampler | generated std | FID proxy | MMD |", "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        for key, s in v["samples"].items():
            lines.append(f"| {name} | {v['steps']} | {key} (n={s['n']}) | {s['std']:.3f} | {s['fid_proxy']:.3f} | "
                         f"{s['mmd']:.4f} |")
    lines += ["", "x0 RMSE of the sampler's estimate (scaled units; the clean latents have std ~1) per timestep:", "",
              "| variant | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " |", "|---|" + "---|" * len(TIMESTEPS)]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['x0_error'][str(t)]['x0_rmse']:.3f}" for t in TIMESTEPS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
