#!/usr/bin/env python
"""meduet_vae at demo size: validation PSNR along training for a few recipes, and the phantoms' noise ceiling.

    PYTHONPATH=common .venv/bin/python bench/vae_demo_curve.py --steps 1200 --lr 5e-4 --every 150 --tag X_const
    PYTHONPATH=common .venv/bin/python bench/vae_demo_curve.py --steps 1200 --lr 1e-3 --sched warmcos --vols 2 \
        --crops 1 --every 150 --tag Y_cos2v

A plain loop (not the bundle's trainer, so that a recipe is one command-line flag): the demo preset's VAE
(``MeduetVAE``, channels 16/32/64, 1 res block, 8 groups), L1 + ``--kl`` x KL on sampled latents (``--det 1``: decode
the latent mean), Adam, gradient clipping 1.0, optional patch discriminator (``--adv``, from ``--adv_from``) as in
train.yaml, random ``--roi``^3 crops with random flips from the sample data's training split (``--vols`` volumes x
``--crops`` crops per step), learning rate constant or 20-step warm-up + cosine to 0 (``--sched warmcos``).
Every ``--every`` steps: PSNR of whole-volume reconstructions (latent mean) of the 4 validation volumes against the
input, and (``patch32``) through 32^3 encoding windows. At start it prints the validation volumes' noise ceiling:
the PSNR of the noise-free render against the noisy input (``meduet.workflows.vae.evaluate.noise_free_on_grid``),
i.e. what a reconstruction that keeps all the anatomy and none of the noise scores.
Needs the sample data (``make demo`` or ``python -m meduet.data.sample --out data/sample``). Numbers: BENCHMARKS.md.
"""
import argparse, json, math, time, sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))
from meduet.data import get_split, get_load_transforms  # noqa: E402
from meduet.networks.vae import build_vae  # noqa: E402
from meduet.engines.vae import kl_divergence  # noqa: E402
from monai.networks.nets import PatchDiscriminator  # noqa: E402
from monai.losses import PatchAdversarialLoss  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
p.add_argument("--steps", type=int, default=420)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--sched", default="const")  # const | cos | warmcos
p.add_argument("--roi", type=int, default=32)
p.add_argument("--crops", type=int, default=2)
p.add_argument("--kl", type=float, default=1e-6)
p.add_argument("--ch", default="16,32,64")
p.add_argument("--res", type=int, default=1)
p.add_argument("--groups", type=int, default=8)
p.add_argument("--loss", default="l1")
p.add_argument("--ema", type=float, default=0.0)
p.add_argument("--adv", type=float, default=0.0)
p.add_argument("--adv_from", type=int, default=100)
p.add_argument("--split", default="training")
p.add_argument("--every", type=int, default=70)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tag", default="")
p.add_argument("--vols", type=int, default=1)
p.add_argument("--det", type=int, default=0)
p.add_argument("--logvar_bias", type=float, default=0.0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dl = str(REPO / "data/sample/phantoms/datalist.json")
prep = dict(modality="CT", spacing=[1.5] * 3, ct_window=[-175.0, 250.0], mr_percentiles=[0.5, 99.5], crop_foreground=True, pad_multiple=4)
t = get_load_transforms(**prep)
def load(split):
    return [t(it)["image"].as_tensor().float() for it in get_split(dl, split)]
train = []
for s in a.split.split(","):
    train += load(s)
val = load("validation")
from meduet.workflows.vae.evaluate import noise_free_on_grid  # noqa: E402
ceilings = []
for it in get_split(dl, "validation"):
    d = t(it)
    x0 = d["image"].as_tensor().float()[0].numpy()
    nf = noise_free_on_grid(dl, it, prep, d["image"].affine.numpy(), x0.shape)
    ceilings.append(10 * math.log10(1.0 / float(((nf - x0) ** 2).mean())))
print("noise ceiling (validation, dB):", [round(c, 1) for c in ceilings], "mean", round(sum(ceilings) / len(ceilings), 2),
      flush=True)
ch = [int(c) for c in a.ch.split(",")]
vae = build_vae(dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=ch,
                     num_res_blocks=[a.res] * 3, norm_num_groups=a.groups, norm_eps=1e-6,
                     attention_levels=[False] * 3, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
                     use_convtranspose=False))
if a.logvar_bias:
    with torch.no_grad():
        c = vae.quant_conv_log_sigma
        c = getattr(c, "conv", c)
        c.bias.fill_(a.logvar_bias)
opt = torch.optim.Adam(vae.parameters(), lr=a.lr)
ema = None
if a.ema:
    import copy
    ema = copy.deepcopy(vae).eval()
disc = dopt = None
if a.adv:
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=16, in_channels=1, out_channels=1, norm="INSTANCE")
    dopt = torch.optim.Adam(disc.parameters(), lr=2e-4)
    advl = PatchAdversarialLoss(criterion="least_squares")
def lr_at(s):
    if a.sched == "const": return a.lr
    w = 20 if a.sched == "warmcos" else 0
    if s < w: return a.lr * (s + 1) / w
    return a.lr * 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, a.steps - w)))
g = torch.Generator().manual_seed(0)
def crop(v):
    r = a.roi
    shp = v.shape[1:]
    pads = [max(0, r - s) for s in shp]
    if any(pads):
        v = torch.nn.functional.pad(v, (0, pads[2], 0, pads[1], 0, pads[0]))
        shp = v.shape[1:]
    o = [int(torch.randint(0, s - r + 1, (1,), generator=g)) for s in shp]
    c = v[:, o[0]:o[0] + r, o[1]:o[1] + r, o[2]:o[2] + r]
    for ax in (1, 2, 3):
        if torch.rand(1, generator=g) < 0.5:
            c = c.flip(ax)
    return c
@torch.no_grad()
def evaluate(net):
    net.eval()
    ps = []; ps2 = []
    for v in val:
        x = v[None]
        z = net.encode(x)[0] if isinstance(net.encode(x), tuple) else net.encode(x)
        y = net.decode(z)[..., :x.shape[2], :x.shape[3], :x.shape[4]].clamp(0, 1)
        mse = float(((y - x) ** 2).mean())
        ps.append(10 * math.log10(1.0 / mse))
        from meduet.networks.patchwise import reconstruct_patchwise
        y2 = reconstruct_patchwise(net, x, patch_size=[32,32,32], overlap=0.0).clamp(0,1)
        ps2.append(10 * math.log10(1.0 / float(((y2 - x) ** 2).mean())))
    net.train()
    print('patch32', round(sum(ps2)/len(ps2),2), flush=True)
    return sum(ps) / len(ps), ps
hist = []
t0 = time.time()
order = torch.randperm(len(train), generator=g).tolist()
k = 0
for s in range(a.steps):
    for gr in opt.param_groups: gr["lr"] = lr_at(s)
    if k >= len(order):
        order = torch.randperm(len(train), generator=g).tolist(); k = 0
    xs = []
    for _ in range(a.vols):
        if k >= len(order):
            order = torch.randperm(len(train), generator=g).tolist(); k = 0
        v = train[order[k]]; k += 1
        xs += [crop(v) for _ in range(a.crops)]
    x = torch.stack(xs)
    if a.det:
        mu, sig = vae.encode(x); recon = vae.decode(mu)
    else:
        recon, mu, sig = vae(x)
    rec = (recon - x).abs().mean() if a.loss == "l1" else ((recon - x) ** 2).mean()
    kl = kl_divergence(mu, sig)
    loss = rec + a.kl * kl
    if disc is not None and s >= a.adv_from:
        loss = loss + a.adv * advl(disc(recon.contiguous())[-1], target_is_real=True, for_discriminator=False)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step()
    if disc is not None and s >= a.adv_from:
        dopt.zero_grad(set_to_none=True)
        lf, lr_ = disc(torch.cat([recon.detach(), x])).__getitem__(-1).chunk(2)
        ld = a.adv * 0.5 * (advl(lf, target_is_real=False, for_discriminator=True) + advl(lr_, target_is_real=True, for_discriminator=True))
        ld.backward(); dopt.step()
    if ema is not None:
        with torch.no_grad():
            for pe, pv in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(pv, 1 - a.ema)
    if (s + 1) % a.every == 0 or s + 1 == a.steps:
        m, ps = evaluate(vae)
        row = dict(step=s + 1, psnr=round(m, 2), per=[round(q, 1) for q in ps], rec=round(float(rec), 4), kl=round(float(kl), 1), t=round(time.time() - t0))
        if ema is not None:
            row["ema_psnr"] = round(evaluate(ema)[0], 2)
        hist.append(row)
        print(a.tag, json.dumps(row), flush=True)
