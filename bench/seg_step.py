#!/usr/bin/env python
"""meduet_seg benchmark: one training step of MeduetSegNet vs MONAI's UNETR and UNet (CPU).

A step = forward, Dice+CE loss, backward, AdamW step, on random images ``(batch, 1, size^3)`` and labels.

* ``meduet_seg``: frozen VAE encoder (MAISI architecture at ``--vae-width``) + latent ViT (``--preset``) + UNETR-style
  decoder (``--feature-size``); the VAE runs without gradients, as in training.
* ``unetr``: MONAI ``UNETR`` with the same ViT width/depth/heads and ``feature_size`` (image-space patch 16).
* ``unet``: MONAI ``UNet`` with channels ``feature_size * (1, 2, 4, 8, 16)``, two residual units.

Timing: all models are built in one process and stepped *interleaved* (one step of each per round, order rotated);
the ratio vs ``unetr`` is the median over rounds of (model step / UNETR step in the same round), so load changes
on a shared machine hit both sides alike. Memory: each model also runs alone in a fresh child process, which
reports its peak RSS (``ru_maxrss``) after warm-up + 2 steps.

    .venv/bin/python bench/seg_step.py                     # paper ViT (dim 768, depth 12) at 64^3, batch 1
    .venv/bin/python bench/seg_step.py --preset demo --size 32 --batch 2 --vae-width 16,32,64
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
TAG = "@@SEG_BENCH "


def build(name: str, args):
    import torch
    from monai.networks.nets import UNETR, UNet

    from meduet.networks.meduet import MEDUET_PRESETS
    from meduet.networks.seg import MeduetSegNet
    from meduet.networks.vae import MAISI_CT_ARCHITECTURE

    vit = MEDUET_PRESETS[args.preset]
    f = args.feature_size
    if name == "meduet_seg":
        widths = [int(w) for w in args.vae_width.split(",")]
        vae = dict(MAISI_CT_ARCHITECTURE, num_channels=widths, norm_num_groups=min(32, widths[0] // 2))
        if widths != [64, 128, 256]:
            vae["num_res_blocks"] = [1, 1, 1]
        net = MeduetSegNet(vae, vit, args.classes, feature_size=f)
    elif name == "unetr":
        net = UNETR(1, args.classes, img_size=(args.size,) * 3, feature_size=f, hidden_size=vit["dim"],
                    mlp_dim=int(vit["dim"] * vit["mlp_ratio"]), num_heads=vit["num_heads"], proj_type="conv",
                    norm_name="instance", res_block=True)
    elif name == "unet":
        net = UNet(3, 1, args.classes, channels=(f, 2 * f, 4 * f, 8 * f, 16 * f), strides=(2, 2, 2, 2),
                   num_res_units=2, norm="instance")
    else:
        raise ValueError(name)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net.train(), opt


def step(net, opt, x, y, loss_fn) -> None:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()


def worker(args) -> None:
    import torch
    from monai.losses import DiceCELoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch, 1, args.size, args.size, args.size))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    models = {m: build(m, args) for m in args.models}
    if args.memory_of:
        net, opt = models[args.memory_of]
        for _ in range(3):
            step(net, opt, x, y, loss_fn)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(TAG + json.dumps({"model": args.memory_of, "peak_gib": peak, "trainable_params": params}))
        return
    names = list(models)
    for _ in range(args.warmup):
        for m in names:
            step(*models[m], x, y, loss_fn)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(args.iters):
        order = names[r % len(names):] + names[: r % len(names)]
        for m in order:
            t0 = time.perf_counter()
            step(*models[m], x, y, loss_fn)
            times[m].append(time.perf_counter() - t0)
    print(TAG + json.dumps({"times": times}))


def child(args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--size", str(args.size), "--batch",
           str(args.batch), "--feature-size", str(args.feature_size), "--vae-width", args.vae_width, "--threads",
           str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup), "--classes",
           str(args.classes), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(TAG))[len(TAG):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--feature-size", type=int, default=16)
    p.add_argument("--vae-width", default="64,128,256", help="VAE channels (MAISI: 64,128,256)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["unetr", "meduet_seg", "unet"])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--memory-of", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    res = child(args, ["--models", *args.models])["times"]
    mem = {m: child(args, ["--models", m, "--memory-of", m]) for m in args.models}
    base = args.models[0]
    print(f"command: .venv/bin/python bench/seg_step.py {' '.join(sys.argv[1:])}")
    print(f"\n| model | median s/step | ratio vs {base} (median of per-round ratios) | peak RSS GiB | trainable params |")
    print("|---|---|---|---|---|")
    for m in args.models:
        ratio = statistics.median(a / b for a, b in zip(res[m], res[base]))
        print(f"| {m} | {statistics.median(res[m]):.2f} | {ratio:.2f} | {mem[m]['peak_gib']:.2f} | "
              f"{mem[m]['trainable_params'] / 1e6:.1f} M |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
