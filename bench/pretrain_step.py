#!/usr/bin/env python
"""meduet_pretrain benchmark: one full MeDUET training step vs one masked-autoencoder step (CPU).

Both models share the backbone (``LatentViT`` encoder + ``LatentDecoder``) at the same width and batch. A *step* is
what a trainer does per batch, timed end to end:

* MeDUET (``meduet``): ``meduet_step_losses`` with every term active (dual reconstruction, both domain terms,
  MFTD with ``step >= mftd_start_step``, SiQC), ``backward``, grad-norm clipping (1.0), AdamW step
  (lr 1e-4, betas (0.9, 0.95), wd 0.01) and the EMA teacher update;
* MAE (``mae``): ``mae_step_losses`` (random masking, ratio 0.5, the encoder sees the visible tokens only),
  ``backward``, clipping, AdamW step.

Optional ablation rows (``--models``): ``meduet_rec_dom`` (reconstruction + domain terms only: no teacher, no
re-encoding), ``meduet_no_siqc`` (+ MFTD), ``meduet_no_mftd`` (+ SiQC); ``meduet_pairs_half`` /
``meduet_pairs_quarter``: all four objectives with MFTD and SiQC on 1/2 or 1/4 of each batch's pairs
(``aux_pair_fraction``; the reconstruction, domain terms and teacher keys on all).

Timing: one child process (this script re-invoked with ``--worker``, ``torch.set_num_threads(--threads)``) builds
every requested model and runs their steps *interleaved* (one step of each model per round, order rotated every
round; ``--warmup`` untimed rounds, then ``--iters`` timed ones). The ratio vs MAE is the median over rounds of
(model step time / MAE step time in the same round), so load changes on a shared machine hit both sides alike.
Memory: every model also runs alone in a fresh child (warm-up + 2 steps), which reports its peak RSS
(``ru_maxrss``), that minus its RSS right before the first step, and the floating-point operations of one step
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention incl. the CPU
flash-attention kernels; forward + backward). ``--profile`` adds, for the full MeDUET step, the wall-clock split
forward / backward / optimiser / EMA and the forward time per phase (``torch.profiler`` record-function scopes
``meduet/*`` of ``meduet_step_losses`` and ``MeDUET.forward``).

Defaults are the issue's configuration: latent 4x24^3, batch 8, encoder dim 192, depth 6, 6 heads, latent patch 4,
decoder dim 96, depth 2, mlp ratio 4, 10 domains, fp32, 2 threads::

    .venv/bin/python bench/pretrain_step.py                       # the table
    .venv/bin/python bench/pretrain_step.py --profile --models mae meduet meduet_rec_dom meduet_no_siqc --write-md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from _common import replace_section, rss_kib, spawn

REPO = Path(__file__).resolve().parents[1]
SECTION_TITLE = "## meduet_pretrain: full MeDUET step vs masked-autoencoder step"
RESULT_TAG = "@@PRETRAIN_BENCH_RESULT "
MODELS = {
    "mae": "masked autoencoder (baseline)",
    "meduet": "MeDUET, all four objectives",
    "meduet_2x": "MeDUET, all four objectives, 2x batch (one-way pairing: as many mixed sequences as both-way)",
    "meduet_paper": "MeDUET, the public code's forms (paper preset: both-way pairing, swapped SiQC keys, ...)",
    "reference": "the public MeDUET code (--reference checkout)",
    "meduet_rec_dom": "MeDUET, rec + domain only",
    "meduet_no_siqc": "MeDUET, rec + domain + MFTD",
    "meduet_no_mftd": "MeDUET, rec + domain + SiQC",
    "meduet_pairs_half": "MeDUET, MFTD + SiQC on 1/2 of the pairs",
    "meduet_pairs_quarter": "MeDUET, MFTD + SiQC on 1/4 of the pairs",
}
ABLATIONS = {
    "meduet": {},
    "meduet_2x": {},
    "meduet_rec_dom": {"use_mftd": False, "use_siqc": False},
    "meduet_no_siqc": {"use_siqc": False},
    "meduet_no_mftd": {"use_mftd": False},
    "meduet_pairs_half": {"aux_pair_fraction": 0.5},
    "meduet_pairs_quarter": {"aux_pair_fraction": 0.25},
}
#: the paper preset's options (presets/paper.yaml): loss forms, whole-student EMA, no decay on biases and norms,
#: learnable SiQC temperature
PAPER_LOSS = {"pairing": "both_ways", "mftd_distance": "mse", "mftd_content_weight": 0.5, "mftd_reduction": "sum",
              "siqc_keys": "swapped", "siqc_queries": "mixed", "siqc_pool": "layer_norm_mean",
              "siqc_style_labels": "sample", "style_swap": "tokens"}
ABLATIONS["meduet_paper"] = PAPER_LOSS
#: mixed sequences per step as a multiple of the batch (one-way pairing: batch / 2)
SEQUENCES = {"meduet_paper": 1.0, "reference": 1.0}
#: (slower row, faster row, what the pair compares): reported when both rows ran
SPEEDUPS = [
    ("reference", "meduet_paper", "equal batch and equal work: the public code's semantics"),
    ("reference", "meduet", "equal batch (one-way pairing: half the mixed sequences)"),
    ("reference", "meduet_2x", "equal mixed sequences, this project's default forms"),
    ("meduet_paper", "meduet_2x", "equal mixed sequences: default forms vs the paper preset's"),
]
BATCH_SCALE = {"meduet_2x": 2}


# ----------------------------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------------------------


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels only; count the CPU flash-attention ops the same way."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    try:
        if fwd is not None:
            fc.register_flop_formula(fwd)(
                lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        if bwd is not None:
            fc.register_flop_formula(bwd)(
                lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    except (RuntimeError, ValueError):  # already registered (newer torch)
        pass


class _TimedStep:
    """What both runners share: a complete training step timed by phase (forward, backward, clip + optimiser with
    zero_grad, EMA teacher), its parameter count and its GFLOP. Subclasses set ``model``, ``opt`` and
    ``step_index`` and define ``losses()`` and ``update_teacher()``."""

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, split: dict | None = None) -> float:
        import torch

        t0 = time.perf_counter()
        out = self.losses()
        t1 = time.perf_counter()
        out["loss"].backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.update_teacher()
        t4 = time.perf_counter()
        self.step_index += 1
        if split is not None:
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("clip+optimizer", t3 - t2), ("ema", t4 - t3)):
                split.setdefault(key, []).append(dt)
        return t4 - t0

    def gflop(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        _register_cpu_sdpa_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            self.losses()["loss"].backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 1e9


class _Runner(_TimedStep):
    """One model with its optimiser (and EMA teacher) doing complete training steps on a fixed random batch."""

    def __init__(self, name: str, spec: dict) -> None:
        import torch

        from meduet.engines.ema import EMATeacher
        from meduet.networks.mae import MaskedAutoencoder
        from meduet.networks.meduet import MeDUET

        from meduet.engines.pretrain import optimizer_param_groups

        torch.manual_seed(0)
        arch = dict(in_channels=spec["channels"], input_size=spec["size"], patch_size=spec["patch"],
                    dim=spec["dim"], depth=spec["depth"], num_heads=spec["heads"], mlp_ratio=spec["mlp_ratio"],
                    dec_dim=spec["dec_dim"], dec_depth=spec["dec_depth"], dec_heads=spec["dec_heads"])
        b, s = spec["batch"] * BATCH_SCALE.get(name, 1), spec["size"]
        paper = name == "meduet_paper"
        self.name = name
        self.x = torch.randn(b, spec["channels"], s, s, s)
        self.dom = torch.arange(b) % spec["domains"]
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
        if name == "mae":
            self.model = MaskedAutoencoder(**arch, mask_ratio=spec["mask_ratio"])
            self.teacher = None
        else:
            self.model = MeDUET(**arch, num_domains=spec["domains"], learn_temperature=paper)
            self.teacher = EMATeacher(self.model, scope="student" if paper else "backbone")
        if spec.get("compile") in ("ours", "all"):
            _compile_blocks(self.model)
            if self.teacher is not None:
                _compile_blocks(self.teacher.module)
        # every objective active from step 0: MFTD's warm-up is over
        self.cfg = dict(ABLATIONS.get(name, {}), mix_ratio=spec["mix_ratio"], mftd_start_step=0)
        groups = optimizer_param_groups(self.model, 0.01, decay_bias_and_norm=not paper)
        self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.total_steps = 10_000
        self.step_index = 0

    def losses(self):
        import torch

        from meduet.losses.meduet_step import mae_step_losses, meduet_step_losses

        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            if self.name == "mae":
                return mae_step_losses(self.model, self.x)
            return meduet_step_losses(self.model, self.teacher, self.x, self.dom, self.step_index, self.cfg)

    def update_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.model, self.step_index, self.total_steps)


def _compile_blocks(model) -> None:
    """``torch.compile`` every transformer block in place (``--compile``; MONAI's ``TransformerBlock`` here, timm's
    ``Block`` in the reference): the same computation with fused elementwise kernels."""
    for module in model.modules():
        if type(module).__name__ in ("TransformerBlock", "Block"):
            module.compile()


def _torchvision_placeholder() -> None:
    """timm imports torchvision at import time for helpers the reference's ViT blocks never call (data transforms,
    FrozenBatchNorm2d); where torchvision cannot be imported (no build matches this CPU torch), register
    placeholder modules so that ``import timm`` succeeds. A placeholder that is *used* fails loudly."""
    import importlib.abc
    import importlib.machinery
    import types

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # not installed, or its compiled ops do not match this torch
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]

    class _Placeholder(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Placeholder(attr, (), {})

        def __call__(cls, *args, **kwargs):
            raise RuntimeError(f"torchvision placeholder {cls.__name__} called: install a torchvision that matches torch")

    class _Module(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Placeholder(attr, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _Module(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            return None

    sys.meta_path.insert(0, _Finder())


class _ReferenceRunner(_TimedStep):
    """The public MeDUET code's training step, imported from a local checkout (``--reference``; never vendored or
    downloaded here), at the bench's configuration: its ``MeDUET`` network (timm ViT blocks) with ``SiQC`` and
    ``MFTD`` modules, teacher = deep copy of the whole student, AdamW on timm's weight-decay groups, the loss
    ``rec + 0.2 (domain_c + domain_s) + 0.5 MFTD + 0.3 SiQC`` with MFTD active, backward, clip 1.0, optimiser step
    and its ``update_ema``: the body of its ``train_one_epoch`` for one batch, fp32, no AMP, one process."""

    def __init__(self, spec: dict) -> None:
        import argparse
        import copy
        from functools import partial

        import torch

        root = Path(spec["reference"]).resolve()
        code = root / "pretrain" if (root / "pretrain" / "models_MeDUET.py").exists() else root
        if not (code / "models_MeDUET.py").exists():
            raise SystemExit(f"--reference {root}: no models_MeDUET.py there or in pretrain/ (give a checkout of the "
                             "public MeDUET repository)")
        _torchvision_placeholder()
        sys.path.insert(0, str(code))
        import models_MeDUET
        from MFTD import MFTD
        from SiQC import SiQC
        from timm.optim import param_groups_weight_decay
        from util.utils import update_ema

        torch.manual_seed(0)
        self.name = "reference"
        b, s = spec["batch"], spec["size"]
        self.args = argparse.Namespace(s_ratio=0.25, num_domain=spec["domains"], distributed=False, lambda_c=0.5,
                                       tau_c=0.1, tau_s=0.1, lambda1=0.2, lambda2=0.5, lambda3=0.3)
        self.model = models_MeDUET.MeDUET(
            self.args, img_size=s, patch_size=spec["patch"], in_chans=spec["channels"], embed_dim=spec["dim"],
            depth=spec["depth"], num_heads=spec["heads"], decoder_embed_dim=spec["dec_dim"],
            decoder_depth=spec["dec_depth"], decoder_num_heads=spec["dec_heads"], mlp_ratio=spec["mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        self.teacher = copy.deepcopy(self.model)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.model.train()
        self.teacher.eval()
        if spec.get("compile") == "all":
            _compile_blocks(self.model)
            _compile_blocks(self.teacher)
        self.siqc, self.mftd = SiQC(self.args), MFTD(self.args)
        self.update_ema = update_ema
        self.opt = torch.optim.AdamW(param_groups_weight_decay(self.model, 0.01), lr=1e-4, betas=(0.9, 0.95))
        self.x = torch.randn(b, spec["channels"], s, s, s)
        dom = torch.arange(b) % spec["domains"]
        self.parameter = [dom, torch.zeros(b), torch.zeros(b)]
        self.mix_ratio = spec["mix_ratio"]
        self.step_index = 0

    def losses(self):
        _, status, z_s, mask = self.model(self.x, self.parameter, self.mix_ratio)
        sc = self.siqc(self.x, z_s, self.model, self.teacher, mask)
        fd = self.mftd(self.x, z_s, self.model, self.teacher, mask)
        a = self.args
        total = (status["rec_loss"] + a.lambda1 * (status["domain_loss_c"] + status["domain_loss_s"])
                 + a.lambda2 * fd + a.lambda3 * sc)
        return {"loss": total}

    def update_teacher(self) -> None:
        self.update_ema(self.teacher, self.model, 0.997)


def _runner(name: str, spec: dict):
    return _ReferenceRunner(spec) if name == "reference" else _Runner(name, spec)


def _memory_worker(spec: dict) -> dict:
    """Fresh process, one model: peak RSS over warm-up + 2 steps, parameter count, GFLOP of one step."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    runner = _runner(spec["model"], spec)
    rss_before = rss_kib()
    for _ in range(spec["warmup"] + 2):
        runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": spec["model"], "params": runner.params(), "peak_kib": peak, "rss_before_kib": rss_before,
            "gflop": runner.gflop()}


def _timing_worker(spec: dict) -> dict:
    """One process, all models, steps interleaved (model order rotated every round) so that load changes on a
    shared machine hit every model alike; then, optionally, the phase profile of the full MeDUET step."""
    import torch

    torch.set_num_threads(spec["threads"])
    runners = [_runner(name, spec) for name in spec["models"]]
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(spec["warmup"] + spec["iters"]):
        order = runners[i % len(runners):] + runners[: i % len(runners)]
        for r in order:
            dt = r.step()
            if i >= spec["warmup"]:
                times[r.name].append(dt)
    result: dict = {"times": times}
    full = next((r for r in runners if r.name == "meduet"), None)
    if spec.get("profile") and full is not None:
        from torch.profiler import ProfilerActivity, profile

        split: dict = {}
        for _ in range(3):
            full.step(split)
        result["split"] = {k: statistics.median(v) for k, v in split.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = full.losses()
        full.opt.zero_grad(set_to_none=True)
        result["phases"] = {ev.key: ev.cpu_time_total / 1e6 for ev in prof.key_averages() if ev.key.startswith("meduet/")}
        result["top_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        del out
    return result


# ----------------------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------------------
def _spawn(spec: dict, timeout: float) -> dict:
    return spawn(__file__, spec, RESULT_TAG, timeout)


def _spec(a: argparse.Namespace, mode: str, **extra) -> dict:
    return {
        "mode": mode, "channels": a.latent_channels, "size": a.latent_size, "batch": a.batch, "dim": a.dim,
        "depth": a.depth, "heads": a.heads, "patch": a.patch, "dec_dim": a.dec_dim, "dec_depth": a.dec_depth,
        "dec_heads": a.dec_heads, "mlp_ratio": a.mlp_ratio, "domains": a.domains, "dtype": a.dtype,
        "threads": a.threads, "iters": a.iters, "warmup": a.warmup, "mix_ratio": a.mix_ratio,
        "mask_ratio": a.mask_ratio, "profile": a.profile, "compile": a.compile,
        "reference": str(a.reference) if a.reference else None, **extra,
    }


def _config_line(a: argparse.Namespace) -> str:
    n = (a.latent_size // a.patch) ** 3
    return (f"latent {a.latent_channels}x{a.latent_size}^3 ({n} tokens), batch {a.batch}, encoder dim {a.dim} depth "
            f"{a.depth} heads {a.heads}, latent patch {a.patch}, decoder dim {a.dec_dim} depth {a.dec_depth}, mlp ratio "
            f"{a.mlp_ratio:g}, {a.domains} domains, {a.dtype}, {a.threads} threads; {a.iters} timed steps per model "
            f"after {a.warmup} warm-up, interleaved" + ("" if a.compile == "none" else
            f"; transformer blocks torch.compile'd ({a.compile}: "
            f"{'this project' if a.compile == 'ours' else 'every row'}; GFLOP and memory of the eager step)"))


def run(a: argparse.Namespace) -> tuple[str, str]:
    models = list(dict.fromkeys(a.models))
    mem = {}
    for m in models:
        print(f"[memory] {m} ...", file=sys.stderr, flush=True)
        # memory and GFLOP of the eager step (a compiled step does the same arithmetic)
        mem[m] = _spawn(_spec(a, "memory", model=m, compile="none"), a.max_seconds)
        print(f"  peak {mem[m]['peak_kib'] / 1024:.0f} MiB, {mem[m]['gflop']:.1f} GFLOP/step", file=sys.stderr)
    print(f"[timing] {' '.join(models)} interleaved ...", file=sys.stderr, flush=True)
    timing = _spawn(_spec(a, "timing", models=models), a.max_seconds)
    times = timing["times"]
    base = times["mae"]
    lines = [
        "| step | batch | mixed sequences | params (M) | median s/step | min s/step | ratio vs MAE (median of paired "
        "steps) | GFLOP/step (fwd+bwd) | FLOP ratio vs MAE | peak RSS (MiB) | RSS increase (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        t = times[m]
        ratio = statistics.median(x / y for x, y in zip(t, base))
        info = mem[m]
        batch = a.batch * BATCH_SCALE.get(m, 1)
        seqs = "-" if m == "mae" else str(int(batch * SEQUENCES.get(m, 0.5)))
        lines.append(
            f"| {MODELS[m]} (`{m}`) | {batch} | {seqs} | {info['params'] / 1e6:.2f} | {statistics.median(t):.3f} | "
            f"{min(t):.3f} | {ratio:.2f}x | {info['gflop']:.1f} | {info['gflop'] / mem['mae']['gflop']:.2f}x | "
            f"{info['peak_kib'] / 1024:.0f} | {(info['peak_kib'] - info['rss_before_kib']) / 1024:.0f} |")
    extra = []
    speed = []
    for slow, fast, what in SPEEDUPS:
        if slow in times and fast in times:
            r = [x / y for x, y in zip(times[slow], times[fast])]
            q = statistics.quantiles(r, n=4) if len(r) >= 4 else [min(r), 0, max(r)]
            speed.append(f"| {what} | `{fast}` vs `{slow}` | {statistics.median(r):.2f}x | "
                         f"[{q[0]:.2f}, {q[2]:.2f}] | {mem[slow]['gflop'] / mem[fast]['gflop']:.2f}x |")
    if speed:
        extra.append("| comparison | rows | speed-up (median over rounds of the paired step-time ratio) | "
                     "interquartile range | GFLOP ratio |\n|---|---|---|---|---|\n" + "\n".join(speed))
    if "split" in timing:
        sp = timing["split"]
        tot = sum(sp.values())
        extra.append("Full MeDUET step, wall-clock split (median of 3 steps): " + ", ".join(
            f"{k} {v:.3f} s ({100 * v / tot:.0f}%)" for k, v in sp.items()) + ".")
        ph = timing["phases"]
        fwd = sum(ph.values())
        extra.append("Its forward by phase (`torch.profiler` scopes of `meduet_step_losses` / `MeDUET.forward`): "
                     + ", ".join(f"`{k}` {v:.3f} s ({100 * v / fwd:.0f}%)"
                                 for k, v in sorted(ph.items(), key=lambda kv: -kv[1])) + ".")
        print("\nTop ops of one full MeDUET forward:\n" + timing["top_ops"], file=sys.stderr)
    body = "\n".join(lines) + ("\n\n" + "\n\n".join(extra) if extra else "")
    return _config_line(a), body


# ----------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md
# ----------------------------------------------------------------------------------------------------------------
SECTION_INTRO = """Produced by `bench/pretrain_step.py`. One *step* is what the trainer does per batch: the losses of
`meduet_step_losses` (dual reconstruction, content and style domain terms, MFTD past its start step, SiQC), backward,
grad-norm clipping, AdamW and the EMA-teacher update for MeDUET; `mae_step_losses` (mask ratio 0.5, encoder on the
visible tokens only), backward, clipping and AdamW for the masked-autoencoder baseline with the same encoder/decoder
at the same width and batch. Random weights and latents. Times: all models in one process, steps interleaved (order
rotated each round); the ratio is the median over rounds of the paired step-time ratio. Memory and GFLOP: each model
alone in a fresh child process; "peak RSS" is its `ru_maxrss`, "RSS increase" that minus its RSS before the first
step; GFLOP counted by `torch.utils.flop_counter.FlopCounterMode` (forward + backward of one step). The machine is
shared with other work, so absolute times are noisy; the ratios come from this one run. `meduet_paper` runs the
`paper` preset's forms (the public code's, where the paper's text is silent: both-way pairing, so a batch of B gives
B mixed sequences; MSE MFTD; SiQC keys from the teacher's own style swap; whole-student EMA; no decay on biases and
norms; learnable temperature); `meduet_2x` the default forms at twice the batch (one-way pairing: as many mixed
sequences as `meduet_paper`); `reference` the public MeDUET code's step (`--reference`, a local checkout) in the same
process. The speed-up table pairs rows at equal batch and at equal mixed sequences (median and interquartile range over
rounds of the paired step-time ratio).
"""


def write_md(path: Path, config: str, command: str, body: str, notes: str) -> None:
    """Replace (or append) this benchmark's section of ``path``; other sections are left as they are."""
    stamp = time.strftime("%Y-%m-%d")
    block = (f"{SECTION_TITLE}\n\n{SECTION_INTRO}\nCommand (run {stamp}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs):\n\n```bash\n{command}\n```\n\nConfiguration: {config}.\n\n{body}\n")
    if notes:
        block += f"\n{notes.strip()}\n"
    replace_section(path, SECTION_TITLE, block)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--latent-size", type=int, default=24, help="cubic latent crop side")
    p.add_argument("--batch", type=int, default=8, help="samples per step (MeDUET: batch/2 mixed pairs)")
    p.add_argument("--dim", type=int, default=192, help="encoder width")
    p.add_argument("--depth", type=int, default=6, help="encoder blocks")
    p.add_argument("--heads", type=int, default=6, help="encoder heads")
    p.add_argument("--patch", type=int, default=4, help="latent patch side")
    p.add_argument("--dec-dim", type=int, default=96, help="decoder width")
    p.add_argument("--dec-depth", type=int, default=2, help="decoder blocks")
    p.add_argument("--dec-heads", type=int, default=None, help="decoder heads (default: --heads if it divides --dec-dim)")
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--domains", type=int, default=10)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = CPU autocast")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the children")
    p.add_argument("--iters", type=int, default=10, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before")
    p.add_argument("--mix-ratio", type=float, default=0.5)
    p.add_argument("--mask-ratio", type=float, default=0.5, help="MAE mask ratio")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mae", "meduet"])
    p.add_argument("--profile", action="store_true", help="phase split of the full MeDUET step")
    p.add_argument("--compile", choices=("none", "ours", "all"), default="none",
                   help="torch.compile every transformer block: of no row, of this project's rows, or of all rows "
                        "(the reference too)")
    p.add_argument("--reference", type=Path, default=None,
                   help="a local checkout of the public MeDUET code (its pretrain/ folder is imported; needs timm "
                        "importable, e.g. PYTHONPATH with `pip install --no-deps --target DIR timm`): adds the "
                        "`reference` row, its step timed in the same process")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="timeout per child")
    p.add_argument("--write-md", action="store_true", help=f"write the table into BENCHMARKS.md ({SECTION_TITLE!r})")
    p.add_argument("--md-path", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--md-notes", type=Path, default=None, help="markdown file appended to the section (analysis)")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        worker = _memory_worker if spec["mode"] == "memory" else _timing_worker
        print(RESULT_TAG + json.dumps(worker(spec)), flush=True)
        return 0
    if "mae" not in a.models:
        a.models = ["mae", *a.models]
    if a.reference and "reference" not in a.models:
        a.models.append("reference")
    if "reference" in a.models and not a.reference:
        raise SystemExit("--models reference needs --reference PATH (a local checkout of the public MeDUET code)")
    if a.dec_heads is None:
        a.dec_heads = a.heads if a.dec_dim % a.heads == 0 else 1
    config, body = run(a)
    command = ".venv/bin/python bench/pretrain_step.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    print(f"\n{SECTION_TITLE}\n\n{config}\n\n{body}")
    if a.write_md:
        notes = a.md_notes.read_text() if a.md_notes else ""
        write_md(a.md_path, config, command.strip(), body, notes)  # re-reads the file right before writing
        print(f"\nwrote {a.md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
