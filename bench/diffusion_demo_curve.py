#!/usr/bin/env python
"""meduet_diffusion at demo size: do the samples get a body outline with more training, and how much training?

    .venv/bin/python bench/diffusion_demo_curve.py --epochs 320 --every 40                 # the demo's SiT, longer
    .venv/bin/python bench/diffusion_demo_curve.py --epochs 60 --every 10 --extra-splits pretraining --tag pool
    .venv/bin/python bench/diffusion_demo_curve.py --epochs 160 --every 40 --model-overrides '{"dim": 256}' --tag wide

One run of meduet_diffusion's own training workflow (train.yaml + the demo preset, parsed in this process with
MONAI's ``ConfigParser``, as bench/diffusion_convergence.py; overrides: ``bundle_root`` = ``<out>/<tag>``,
``resume`` false, ``objective_name`` (default rflow, the demo's SiT), ``condition`` (default factors),
``max_epochs`` = ``--epochs``, ``model_overrides`` = ``--model-overrides`` (a wider or deeper DiT than the demo's) (the warm-up + cosine schedule spans the whole run, as a preset with that many epochs
would), the factor prior off). ``--extra-splits`` adds latent-datalist splits to the training data (e.g. the
unlabelled ``pretraining`` pool: 72 more latents besides the 14 of ``training``).

Every ``--every`` epochs (and at step 0 and the end), for the EMA generator: ``--samples`` latents sampled with a
fixed seed (Euler ``--rflow-steps`` / DDIM ``--ddim-steps``, guidance ``--guidance``), each conditioned on the
factors of one real test latent of the sites seen in training (cycled), then

* the FID proxy against those real test latents (meduet_pretrain's encoder features; bench/diffusion_convergence.py);
* the outline agreement (``meduet.metrics.generation.outline_agreement``): the samples and the real latents decoded
  by the demo VAE, each sample's Otsu foreground (the body, or the bright organs at sites that show the body near
  black) scored by its IoU with the closest real one; the real latents' own score against other subjects' is
  what samples shaped like scans reach;
* the middle axial slice of the first 6 decoded samples, for the picture.

Writes ``<out>/<tag>.json`` (every number, the command), ``<out>/<tag>_curve.png`` (FID proxy and outline IoU vs step)
and ``<out>/<tag>_samples.png`` (one row per evaluation, real test scans in the last row); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
sys.path.insert(0, str(REPO / "bench"))

from diffusion_convergence import (  # noqa: E402
    FidProxy, conditions_for, crops, reference_items, single_thread, training_parts,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=320)
    p.add_argument("--every", type=int, default=40, help="epochs between evaluations")
    p.add_argument("--objective", default="rflow", choices=["rflow", "ddpm"])
    p.add_argument("--condition", default="factors", choices=["none", "metadata", "factors"])
    p.add_argument("--model-overrides", default="{}",
                   help='JSON dict merged over the demo DiT preset, e.g. \'{"dim": 256, "num_heads": 8}\'')
    p.add_argument("--extra-splits", default="", help="comma-separated latent splits added to the training data")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--rflow-steps", type=int, default=30, help="sample.yaml's default for SiT")
    p.add_argument("--ddim-steps", type=int, default=50, help="sample.yaml's default for DiT")
    p.add_argument("--guidance", type=float, default=1.5, help="sample.yaml's default")
    p.add_argument("--vae", default="bundles/meduet_vae/models/model.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="sit_factors")
    p.add_argument("--out", default="bench/results/diffusion_demo_curve")
    args = p.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("MEDUET_PROGRESS", "0")
    import numpy as np
    import torch
    from ignite.engine import Events
    from meduet import records
    from meduet.metrics.features import EncoderFeatures
    from meduet.metrics.generation import outline_agreement

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    root = out / args.tag
    overrides = {"bundle_root": str(root), "resume": False, "objective_name": args.objective,
                 "condition": args.condition, "val_interval": args.every, "max_epochs": args.epochs,
                 "seed": args.seed, "prior#enabled": False}
    model_overrides = json.loads(args.model_overrides)
    if model_overrides:
        overrides["model_overrides"] = model_overrides
    extra = [s for s in args.extra_splits.split(",") if s]
    if extra:
        overrides["train#dataset#data"] = ("$meduet.engines.diffusion.diffusion_items(@latent_datalist, @train_split)"
                                           + "".join(f" + meduet.engines.diffusion.diffusion_items(@latent_datalist,"
                                                     f" '{s}')" for s in extra))
    run = training_parts("demo", overrides)
    parser, seed, trainer, ema, objective = run["parser"], run["seed"], run["trainer"], run["ema"], run["objective"]
    conditioner, crop, space, dl = run["conditioner"], run["crop"], run["space"], run["datalist"]
    n_train = len(parser.get_parsed_content("train#dataset#data"))

    refs = reference_items(dl, "test", "seen")
    real_raw = crops(refs, crop)
    extractor = EncoderFeatures(str(REPO / parser.get_parsed_content("pretrain_ckpt")), latent_space=space,
                                inputs="raw")
    sampler = "rflow" if args.objective == "rflow" else "ddim"
    steps = args.rflow_steps if args.objective == "rflow" else args.ddim_steps
    proxy = FidProxy(extractor, real_raw, space, crop, objective, sampler, steps, args.guidance, seed)
    cond = conditions_for(args.condition, conditioner, refs, args.samples, crop, space)
    vae = records.load(args.vae, "cpu", expect="vae")
    groups = [it.get("subject", i) for i, it in enumerate(refs)]

    def decode(raw):
        with torch.no_grad():
            return torch.cat([vae.decode(raw[i:i + 8]).clamp(0, 1) for i in range(0, len(raw), 8)])

    real_img = decode(real_raw)
    rows: list[dict] = []
    pictures: list[tuple[int, list]] = []
    t_eval = [0.0]

    def evaluate(step: int, epoch: int) -> None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            fake = proxy.generate(ema.module, cond, args.samples)
            row = {"step": step, "epoch": epoch, **proxy.score(fake)}
            img = decode(space.unscale(fake.detach().cpu().float()))
            agree = outline_agreement(img, real_img, groups)
            row.update({k: v for k, v in agree.items() if k != "outline_iou_fake_each"})
        z = img.shape[-1] // 2
        pictures.append((step, [img[i, 0, :, :, z].numpy() for i in range(min(6, len(img)))]))
        rows.append(row)
        t_eval[0] += time.perf_counter() - t0
        print(f"  step {step:5d} epoch {epoch:4d} fid_proxy {row['fid_proxy']:.3f} outline_iou {row['outline_iou_fake']:.3f} "
              f"(real {row['outline_iou_real']:.3f}) gen_std {row['gen_std']:.2f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)

    def on_epoch(engine) -> None:
        e = int(engine.state.epoch)
        if e % args.every == 0 or e == int(engine.state.max_epochs):
            evaluate(int(engine.state.iteration), e)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
    command = ".venv/bin/python bench/diffusion_demo_curve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}\ntraining latents: {n_train}; references: {len(refs)}", flush=True)
    evaluate(0, 0)
    t_eval[0] = 0.0
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    total = int(trainer.state.iteration)
    from meduet.metrics.generation import fid

    with single_thread(1):  # real-vs-real floor of the proxy: the training crops vs the reference test crops
        floor = fid(proxy.real_feats, extractor(crops(reference_items(dl, "training", "all"), crop)))
    result = {"command": command, "torch": torch.__version__, "threads": args.threads, "tag": args.tag,
              "objective": args.objective, "condition": args.condition, "extra_splits": extra,
              "model_overrides": model_overrides, "architecture": dict(ema.module.arch),
              "parameters": sum(p.numel() for p in ema.module.parameters()),
              "training_latents": n_train, "epochs": args.epochs, "total_steps": total,
              "steps_per_epoch": total // max(1, args.epochs), "train_wall_s": wall - t_eval[0],
              "eval_wall_s": t_eval[0], "train_s_per_step": (wall - t_eval[0]) / max(1, total),
              "sampler": sampler, "sampler_steps": steps, "guidance": args.guidance, "samples": args.samples,
              "num_references": len(refs), "real_latent_std": float(real_raw.std()), "rows": rows,
              "floor_fid_proxy": floor}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    st = [r["step"] for r in rows]
    axes[0].plot(st, [r["fid_proxy"] for r in rows], "o-")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FID proxy (encoder features)")
    axes[1].plot(st, [r["outline_iou_fake"] for r in rows], "o-", label="samples vs closest real scan")
    axes[1].axhline(rows[-1]["outline_iou_real"], ls="--", color="k", label="real test scans vs other subjects")
    axes[1].set_ylabel("Otsu foreground IoU")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"meduet_diffusion demo ({args.objective}, {args.condition}, {n_train} training latents): "
                 f"{args.epochs} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{args.tag}_curve.png", dpi=100)
    plt.close(fig)

    z = real_img.shape[-1] // 2
    grid = pictures + [(-1, [real_img[i, 0, :, :, z].numpy() for i in range(0, len(real_img), max(1, len(real_img) // 6))][:6])]
    fig, axes = plt.subplots(len(grid), 6, figsize=(9, 1.55 * len(grid)), squeeze=False)
    for r, (step, sl) in enumerate(grid):
        for c in range(6):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(sl):
                ax.imshow(np.rot90(sl[c]), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title("real test scans" if step < 0 else f"step {step}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out / f"{args.tag}_samples.png", dpi=90)
    plt.close(fig)

    print("\n| step | epoch | FID proxy | outline IoU, samples | outline IoU, real scans | sample latent std |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['epoch']} | {r['fid_proxy']:.2f} | {r['outline_iou_fake']:.3f} | "
              f"{r['outline_iou_real']:.3f} | {r['gen_std']:.2f} |")
    print(f"\nFID proxy real-vs-real floor (training vs test crops): {floor:.3f}")
    print(f"{total} steps, train {result['train_s_per_step']:.2f} s/step ({result['train_wall_s'] / 60:.1f} min), "
          f"evaluations {t_eval[0] / 60:.1f} min; wrote {out / args.tag}.json, _curve.png, _samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
