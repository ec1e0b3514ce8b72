#!/usr/bin/env python
"""meduet_diffusion convergence study: DiT (objective ddpm) and SiT (objective rflow), each trained with no
condition, with metadata (the site) and with MeDUET factors, same preset, seed and number of steps (CPU).

    .venv/bin/python bench/diffusion_convergence.py                      # demo preset, all 6 runs
    .venv/bin/python bench/diffusion_convergence.py --epochs 20 --eval-every 5 --objectives rflow --conditions none,factors
    .venv/bin/python bench/diffusion_convergence.py --backbones dit,dualflow --objectives rflow --conditions factors

``--backbones`` (default ``dit``, so older commands reproduce): ``dualflow`` adds 3D MedDiffusion's dual-flow
denoiser (train.yaml ``backbone: dualflow``, ``meduet.networks.dualflow``; the preset's sizes, whose demo size has
about the demo DiT's parameter count) with the same objective, condition, seed, data and steps; its runs go to
``<out>/dualflow_<objective>_<condition>/`` and get their own tables, a backbone comparison table (parameter counts
of both) and ``<out>_backbones.png``.

Every run is meduet_diffusion's own training workflow (configs/train.yaml + configs/presets/<preset>.yaml, parsed
in this process with MONAI's ``ConfigParser``; overrides: ``bundle_root`` = ``<out>/<objective>_<condition>``,
``resume`` false, ``objective_name``, ``condition``, ``max_epochs``, ``val_interval`` = ``--eval-every``). The
factor prior is not fitted (not needed here). An extra ignite handler at EPOCH_COMPLETED records, for the EMA
generator:

* every ``--eval-every`` epochs, at step 0 and at the last epoch: the validation loss of the config's
  ``ValidationLoss`` handler (fixed validation crops, noise and timesteps; the same numbers it appends to
  ``runs/val_loss.jsonl``; step 0 computed by the same handler before training);
* every ``--fid-every`` epochs, at step 0 and at the last epoch: an FID proxy: ``--samples`` latents sampled with a fixed seed (``rflow`` Euler ``--rflow-steps`` / DDIM
  ``--ddim-steps``, guidance ``--guidance``) and the real test latents of the sites seen in training
  (``--real-sites seen``; centre crops of the training crop), both through meduet_pretrain's frozen encoder
  (``EncoderFeatures``: pooled content + style), Frechet distance (``meduet.metrics.generation.fid``). The
  conditions of the generated latents are those of the real reference latents, one per reference (cycled):
  nothing (none), the reference's site (metadata), the reference's own pooled factors (factors: the prior is only
  fitted after training). NB: the factors condition therefore hands the generator the very statistics the proxy
  measures; the script also reports, at the end of each factors run, the proxy with the factors of the
  *training* latents instead (``fid_proxy_train_factors``), and the real-vs-real floor (training vs test crops).

The evaluation runs under ``torch.random.fork_rng``, so training follows the same random trajectory whatever
``--eval-every`` is (the encoder features run with ``--feature-threads``, default 1). Then, per objective and metric, the first step at which each condition's curve reaches
(<=) the unconditional run's final value, linearly interpolated between evaluations (``None`` when never
reached), and the ratio to the unconditional run's own first step at that value (the same rule applied to its
own curve, which can be before its last step when the curve is not monotone).

Writes ``<out>.json`` (every number, the command), ``<out>.png`` (2x2: val loss and FID proxy vs step, one column
per objective, one line per condition) and prints markdown tables. ``--reuse`` loads runs whose
``<out>/<run>/curve.json`` matches the settings instead of training them again.
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

CONFIG = "bundles/meduet_diffusion/configs/train.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_convergence_report import (  # noqa: E402
    BACKBONES, backbone_table, plot, plot_backbones, summarise, tables)


# ------------------------------------------------------------------------------------------------------------------
# shared helpers (also used by bench/diffusion_sampling.py)
# ------------------------------------------------------------------------------------------------------------------
def make_parser(preset: str, overrides: dict):
    """meduet_diffusion's train.yaml + preset, with ``overrides`` (``#``-keys allowed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / CONFIG), str(REPO / f"bundles/meduet_diffusion/configs/presets/{preset}.yaml")])
    parser["siblings"] = str(REPO / "bundles")  # the chained bundles stay the repository's whatever bundle_root is
    for k, v in overrides.items():
        parser[k] = v
    return parser


def training_parts(preset: str, overrides: dict) -> dict:
    """The parsed training workflow's parts (``parser``, ``trainer``, ``ema``, ``objective``, ``conditioner``,
    ``crop``, ``space``, ``datalist``), with the bundle's determinism seed set before the network is built (as its
    ``training`` list does)."""
    from monai.utils import set_determinism

    parser = make_parser(preset, overrides)
    set_determinism(seed=int(parser.get_parsed_content("seed")))
    parts = {k: parser.get_parsed_content(k) for k in ("train#trainer", "ema", "objective", "conditioner",
                                                        "latent_space", "latent_datalist", "seed")}
    return {"parser": parser, "trainer": parts["train#trainer"], "ema": parts["ema"], "objective": parts["objective"],
            "conditioner": parts["conditioner"], "space": parts["latent_space"], "datalist": parts["latent_datalist"],
            "crop": [int(c) for c in parser.get_parsed_content("crop_size")], "seed": int(parts["seed"])}


def reference_items(latent_datalist: str, split: str, real_sites: str) -> list[dict]:
    """The real latents the FID proxy compares with: ``split``'s items, only the sites seen in training unless
    ``real_sites == "all"``."""
    from meduet.latent import LatentDatalist, read_items

    items = LatentDatalist(latent_datalist).items(split)  # whole items: the outline measure groups by subject
    if real_sites == "all":
        return items
    seen = {it["domain"] for it in read_items(latent_datalist, "training")}
    return [it for it in items if it["domain"] in seen]


def crops(items: list[dict], crop: list[int]):
    """Raw (unscaled) centre crops ``(N, C, *crop)`` of the items' latents."""
    import torch

    from meduet.engines.diffusion import center_crop_or_pad
    from meduet.latent import load_latent

    return torch.stack([center_crop_or_pad(load_latent(it["latent"]), crop) for it in items]).float()


def conditions_for(condition: str, conditioner, items: list[dict], n: int, crop: list[int], space):
    """The ``cond`` dict for ``n`` generated latents, one per reference item (cycled): None / sites / factors."""
    import torch

    refs = [items[i % len(items)] for i in range(n)]
    if condition == "none":
        return None
    if condition == "metadata":
        return {"domain": torch.tensor([int(it["domain_index"]) for it in refs], dtype=torch.long)}
    with torch.no_grad():
        return {k: v.detach().cpu() for k, v in conditioner.factors(space.scale(crops(refs, crop))).items()}


class FidProxy:
    """FID proxy of a generator against fixed real features (see the module docstring)."""

    def __init__(self, extractor, real_raw, space, crop: list[int], objective, sampler: str, steps: int,
                 guidance: float, seed: int, batch: int = 24, feature_threads: int = 1) -> None:
        self.extractor, self.space, self.crop = extractor, space, list(crop)
        self.feature_threads = int(feature_threads)
        self.objective, self.sampler, self.steps = objective, sampler, int(steps)
        self.guidance, self.seed, self.batch = float(guidance), int(seed), int(batch)
        with single_thread(self.feature_threads):
            self.real_feats = extractor(real_raw)

    def generate(self, net, cond, n: int):
        import torch

        from meduet.engines.sampling import sample_latents

        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for s in range(0, n, self.batch):
            m = min(self.batch, n - s)
            c = None if cond is None else {k: v[s:s + m] for k, v in cond.items()}
            out.append(sample_latents(net, [m, int(net.arch["in_channels"]), *self.crop], c, self.objective,
                                      sampler=self.sampler, num_steps=self.steps,
                                      guidance_scale=self.guidance if c is not None else 1.0, generator=gen))
        return torch.cat(out)

    def score(self, fake_scaled) -> dict:
        from meduet.metrics.generation import fid

        raw = self.space.unscale(fake_scaled.detach().cpu().float())
        with single_thread(self.feature_threads):
            feats = self.extractor(raw)
        return {"fid_proxy": fid(self.real_feats, feats), "gen_std": float(raw.std()), "gen_mean": float(raw.mean())}


class single_thread:
    """Run a block with ``torch.set_num_threads(n)`` (the encoder's many tiny window passes are several times faster
    single-threaded on the shared machine: measured 0.07 vs 0.3-2.2 s per latent under load), then restore."""

    def __init__(self, n: int = 1) -> None:
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


# ------------------------------------------------------------------------------------------------------------------
# one training run
# ------------------------------------------------------------------------------------------------------------------
def train_run(objective_name: str, condition: str, args, root: Path, settings: dict, backbone: str = "dit") -> dict:
    import torch
    from ignite.engine import Events

    from meduet.engines.diffusion import ValidationLoss
    from meduet.metrics.features import EncoderFeatures

    overrides = {"bundle_root": str(root), "resume": False, "objective_name": objective_name,
                 "condition": condition, "val_interval": args.eval_every, "max_epochs": settings["epochs"],
                 "seed": args.seed}
    if backbone != "dit":  # the dit runs keep the old overrides (train.yaml's default backbone is dit)
        overrides["backbone"] = backbone
    run = training_parts(args.preset, overrides)
    parser, seed, trainer, ema, objective = run["parser"], run["seed"], run["trainer"], run["ema"], run["objective"]
    conditioner, crop, space, dl = run["conditioner"], run["crop"], run["space"], run["datalist"]
    val = next(h for h in parser.get_parsed_content("train#handlers") if isinstance(h, ValidationLoss))

    refs = reference_items(dl, args.real_split, args.real_sites)
    n = args.samples
    extractor = EncoderFeatures(str(REPO / parser.get_parsed_content("pretrain_ckpt")), latent_space=space,
                                inputs="raw")
    sampler = "rflow" if objective_name == "rflow" else "ddim"
    steps = args.rflow_steps if objective_name == "rflow" else args.ddim_steps
    proxy = FidProxy(extractor, crops(refs, crop), space, crop, objective, sampler, steps, args.guidance, seed,
                     feature_threads=args.feature_threads)
    cond = conditions_for(condition, conditioner, refs, n, crop, space)

    rows: list[dict] = []
    t_eval = [0.0]

    def evaluate(step: int, epoch: int, val_loss: float | None, with_fid: bool) -> None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            if val_loss is None:
                val_loss = val.compute()
            row = {"step": step, "epoch": epoch, "val_loss": float(val_loss), "fid_proxy": None}
            if with_fid:
                row.update(proxy.score(proxy.generate(ema.module, cond, n)))
        rows.append(row)
        t_eval[0] += time.perf_counter() - t0
        if with_fid:
            print(f"  [{objective_name}/{condition}] step {step:4d} epoch {epoch:3d} val_loss {row['val_loss']:.4f} "
                  f"fid_proxy {row['fid_proxy']:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    def on_epoch(engine) -> None:
        e, last = int(engine.state.epoch), int(engine.state.epoch) == int(engine.state.max_epochs)
        if e % args.eval_every and not last:
            return
        evaluate(int(engine.state.iteration), e, engine.state.metrics.get("val_loss"),
                 with_fid=last or e % args.fid_every == 0)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
    evaluate(0, 0, None, with_fid=True)
    t_eval[0] = 0.0  # only evaluations during trainer.run() are taken off its wall time
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    total_steps = int(trainer.state.iteration)
    extra: dict = {}
    if condition == "factors":
        train_items = reference_items(dl, "training", "all")
        with torch.random.fork_rng(devices=[]):
            c2 = conditions_for(condition, conditioner, train_items, n, crop, space)
            extra["fid_proxy_train_factors"] = proxy.score(proxy.generate(ema.module, c2, n))["fid_proxy"]
    return {"objective": objective_name, "condition": condition, "settings": settings, "rows": rows,
            "backbone": backbone, "num_parameters": sum(p.numel() for p in ema.module.parameters()),
            "total_steps": total_steps, "steps_per_epoch": total_steps // max(1, settings["epochs"]),
            "train_wall_s": wall - t_eval[0], "eval_wall_s": t_eval[0],
            "train_s_per_step": (wall - t_eval[0]) / max(1, total_steps), "num_references": len(refs),
            "sampler": sampler, "sampler_steps": steps, **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"])
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's max_epochs")
    p.add_argument("--eval-every", type=int, default=5,
                   help="epochs between validation-loss evaluations (the config's val_interval)")
    p.add_argument("--fid-every", type=int, default=10,
                   help="epochs between FID-proxy evaluations (a multiple of --eval-every; also step 0 and the end)")
    p.add_argument("--feature-threads", type=int, default=1, help="torch threads for the encoder features")
    p.add_argument("--objectives", default="ddpm,rflow")
    p.add_argument("--conditions", default="none,metadata,factors")
    p.add_argument("--backbones", default="dit", help="dit and/or dualflow (3D MedDiffusion's dual-flow denoiser)")
    p.add_argument("--samples", type=int, default=24, help="generated latents per FID-proxy evaluation")
    p.add_argument("--rflow-steps", type=int, default=20)
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance for conditional runs")
    p.add_argument("--real-split", default="test")
    p.add_argument("--real-sites", default="seen", choices=["seen", "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="load finished runs with the same settings")
    p.add_argument("--out", default="bench/results/diffusion_convergence")
    args = p.parse_args(argv)
    if args.fid_every % args.eval_every:
        p.error("--fid-every must be a multiple of --eval-every")
    backbones = args.backbones.split(",")
    if not backbones or any(b not in BACKBONES for b in backbones):
        p.error(f"--backbones takes a comma-separated subset of {','.join(BACKBONES)}")
    os.chdir(REPO)
    os.environ.setdefault("MEDUET_PROGRESS", "0")
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    preset = yaml.safe_load((REPO / f"bundles/meduet_diffusion/configs/presets/{args.preset}.yaml").read_text())
    epochs = args.epochs or int(preset["max_epochs"])
    out = Path(args.out)
    settings = {"preset": args.preset, "epochs": epochs, "eval_every": args.eval_every, "fid_every": args.fid_every,
                "samples": args.samples,
                "rflow_steps": args.rflow_steps, "ddim_steps": args.ddim_steps, "guidance": args.guidance,
                "real_split": args.real_split, "real_sites": args.real_sites, "seed": args.seed}
    command = ".venv/bin/python bench/diffusion_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}\nsettings: {settings}", flush=True)
    t_all = time.perf_counter()
    every: dict = {}  # (backbone, objective, condition) -> run
    for bb in backbones:
        # the dit runs keep the old folders and settings (their --reuse caches stay valid)
        bb_settings = settings if bb == "dit" else {**settings, "backbone": bb}
        for obj in args.objectives.split(","):
            for cond in args.conditions.split(","):
                root = out / (f"{obj}_{cond}" if bb == "dit" else f"{bb}_{obj}_{cond}")
                cache = root / "curve.json"
                if args.reuse and cache.is_file():
                    r = json.loads(cache.read_text())
                    if r.get("settings") == bb_settings:
                        print(f"== {bb} {obj} / {cond}: reusing {cache}", flush=True)
                        every[(bb, obj, cond)] = r
                        continue
                print(f"== {bb} {obj} / {cond}", flush=True)
                r = train_run(obj, cond, args, root, bb_settings, bb)
                root.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(r, indent=1) + "\n")
                every[(bb, obj, cond)] = r
                print(f"   {r['total_steps']} steps, {r['num_parameters']} parameters, train {r['train_wall_s']:.0f} "
                      f"s, eval {r['eval_wall_s']:.0f} s", flush=True)
    runs = {(o, c): r for (b, o, c), r in every.items() if b == "dit"}

    # real-vs-real floor of the proxy: training crops vs the reference crops
    from meduet.latent import LatentDatalist
    from meduet.metrics.features import EncoderFeatures
    from meduet.metrics.generation import fid

    dl = "bundles/meduet_vae/latents/phantoms/datalist.json"
    crop = [int(c) for c in preset.get("crop_size", [24, 24, 24])]
    ext = EncoderFeatures("bundles/meduet_pretrain/models/model.pt", latent_space=LatentDatalist(dl).space,
                          inputs="raw")
    refs = reference_items(dl, args.real_split, args.real_sites)
    with single_thread(args.feature_threads):
        floor = fid(ext(crops(refs, crop)), ext(crops(reference_items(dl, "training", "all"), crop)))

    real_std = float(crops(refs, crop).std())
    title = (f"meduet_diffusion {args.preset}: {epochs} epochs, seed {args.seed}; FID proxy = meduet_pretrain encoder "
             f"features, {args.samples} generated vs {len(refs)} real test latents")
    summary, md, pngs = {}, "", []
    if runs:  # the dit runs: the tables and plot as before
        summary = summarise(runs)
        pngs.append(out.with_suffix(".png"))
        plot(runs, summary, pngs[-1], title)
        md = tables(runs, summary, floor, real_std)
    result = {"command": command, "settings": settings, "torch": torch.__version__, "threads": args.threads,
              "wall_s": None, "real_vs_real_floor": floor, "real_latent_std": real_std,
              "num_references": len(refs),
              "summary": summary, "runs": {f"{o}_{c}": r for (o, c), r in runs.items()}, "markdown": md}
    for bb in backbones:
        if bb == "dit":
            continue
        sub = {(o, c): r for (b, o, c), r in every.items() if b == bb}
        result["runs"].update({f"{bb}_{o}_{c}": r for (o, c), r in sub.items()})
        result[f"summary_{bb}"] = summarise(sub)
        part = f"Backbone {bb}:\n\n" + tables(sub, result[f"summary_{bb}"], floor if not md else None,
                                                 real_std if not md else None)
        md = f"{md}\n\n{part}" if md else part
    if backbones != ["dit"]:
        result["backbone_markdown"] = backbone_table(every)
        md += "\n\nBackbones side by side (same objective, condition, seed, data and steps):\n\n" + \
            result["backbone_markdown"]
        pngs.append(Path(f"{out}_backbones.png"))
        plot_backbones(every, pngs[-1], title)
        result["markdown"] = md
    result["wall_s"] = time.perf_counter() - t_all
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + md)
    print(f"\nwrote {out.with_suffix('.json')} and {', '.join(map(str, pngs))}; total {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
