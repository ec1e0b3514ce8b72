#!/usr/bin/env python
"""meduet_vae train_decoder.yaml: peak memory of one decoder fine-tuning step per image voxel, with and without the
memory options (``vae_runtime``), so that a GPU user knows which whole volumes fit.

One step as ``DecoderFinetuneTrainer`` runs it: the frozen encoder encodes the whole volume patch-wise under
``torch.no_grad`` (3D MedDiffusion: 64^3 windows, no overlap), the decoder decodes the whole latent with gradients
(one call), L1 to the input, backward. Each (runtime, size) runs in a fresh child process (``--worker``) at the
paper width (MAISI's CT autoencoder, 64/128/256 channels), fp32 on CPU, and reports, per image voxel:

* the activations alive at the backward's peak, the device-independent number: the distinct tensors autograd keeps
  through the forward (saved-tensor hooks), plus what a checkpointed piece recomputes at once in the backward (MAISI's
  ``use_checkpointing``: the whole decoder; ``checkpoint_blocks``: the largest single block). Gradient buffers and
  convolution workspace come on top;
* the CPU step's RSS increase: peak RSS (``getrusage``) after the backward minus RSS right before the decoder call.
  On CPU this includes PyTorch's 3D-convolution workspace (an im2col buffer of 27 x input channels per output
  voxel at full resolution), which a GPU's cuDNN does not allocate. The weights are the same
in every row, so the rows compare like with like; the baseline row is the step with no memory option (what
train_decoder.yaml did before it applied ``vae_runtime``).

On a GPU the activations are the same tensors: with bf16 autocast (``amp: true``) they take about half of these
fp32 bytes. The gradients of the decoder's parameters (~tens of MB) do not grow with the volume.

    .venv/bin/python bench/decoder_memory.py --sizes 64 96 --write-md
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

SECTION_TITLE = "## meduet_vae: decoder fine-tuning memory per voxel (train_decoder.yaml)"
RESULT_TAG = "@@DECODER_MEMORY "
RUNTIMES = {
    "none (baseline)": {"num_splits": 1, "dim_split": 1, "use_checkpointing": False},
    "splits 4": {"num_splits": 4, "dim_split": 1, "use_checkpointing": False},
    "checkpointing": {"num_splits": 1, "dim_split": 1, "use_checkpointing": True},
    "paper vae_runtime (splits 4 + checkpointing)": {"num_splits": 4, "dim_split": 1, "use_checkpointing": True},
    "checkpoint_blocks": {"num_splits": 1, "dim_split": 1, "use_checkpointing": False, "checkpoint_blocks": True},
    "checkpoint_blocks + splits 4": {"num_splits": 4, "dim_split": 1, "use_checkpointing": False,
                                     "checkpoint_blocks": True},
}


def _saved_bytes(fn, *args) -> tuple[int, object]:
    """Bytes of the distinct tensors autograd keeps for the backward while ``fn(*args)`` runs (saved-tensor hooks),
    and ``fn``'s output."""
    import torch

    seen: set = set()
    total = [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return total[0], out


def worker(spec: dict) -> dict:
    import torch

    from meduet.engines.vae import decoder_parameters
    from meduet.networks.patchwise import PatchEncoding
    from meduet.networks.vae import MAISI_CT_ARCHITECTURE, build_vae

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    vae = build_vae(dict(MAISI_CT_ARCHITECTURE), **spec["runtime"]).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    s = spec["size"]
    x = torch.rand(1, 1, s, s, s)
    scheme = PatchEncoding(spec["patch"], 0.0, "constant")
    with torch.no_grad():
        z = scheme.encode(vae, x)
    before = rss_kib()
    t0 = time.perf_counter()
    saved, recon = _saved_bytes(scheme.decode, vae, z)
    loss = torch.nn.functional.l1_loss(recon, x)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # what one block keeps when it runs with gradients: with checkpoint_blocks the backward recomputes the blocks one
    # at a time, so the largest of these comes on top of the kept inputs
    # the decoder's activations with nothing checkpointed: what MAISI's use_checkpointing recomputes at once in the
    # backward (it checkpoints the decoder as one piece), so that much is alive at the backward's peak either way
    decoder_all, _ = _saved_bytes(lambda latent: vae.decoder(vae.post_quant_conv(latent)), z)
    h = vae.post_quant_conv(z)
    largest = 0
    for block in vae.decoder.blocks:
        h = h.detach()
        nbytes, h = _saved_bytes(block, h)
        largest = max(largest, nbytes)
    voxels = s**3
    return {"size": s, "saved_per_voxel": saved / voxels, "largest_block_per_voxel": largest / voxels,
            "decoder_all_per_voxel": decoder_all / voxels,
            "before_kib": before, "peak_kib": peak, "seconds": seconds,
            "rss_per_voxel": (peak - before) * 1024 / voxels,
            "grad_norm": float(sum(p.grad.norm() ** 2 for p in params) ** 0.5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES))
    p.add_argument("--write-md", action="store_true")
    p.add_argument("--worker")
    args = p.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    rows = []
    for size in args.sizes:
        base = None
        for name in args.runtimes:
            r = spawn(__file__, {"size": size, "patch": args.patch, "threads": args.threads,
                                 "runtime": RUNTIMES[name]}, RESULT_TAG, timeout=3600)
            rt = RUNTIMES[name]
            recomputed = (r["largest_block_per_voxel"] if rt.get("checkpoint_blocks") else
                          r["decoder_all_per_voxel"] if rt.get("use_checkpointing") else 0.0)
            kept = r["saved_per_voxel"] + recomputed  # kept through the forward + recomputed at once in the backward
            r.update(name=name, kept_per_voxel=kept, ratio=(base["kept_per_voxel"] if base else kept) / kept,
                     same_gradient=base is None or abs(r["grad_norm"] - base["grad_norm"]) <= 1e-4 * base["grad_norm"])
            base = base or r
            rows.append(r)
            print(f"{size}^3 {name:46s} activations {r['kept_per_voxel']:7.0f} B/voxel (x{r['ratio']:.2f} less)  "
                  f"CPU step {r['rss_per_voxel']:7.0f} B/voxel, peak {r['peak_kib'] / 2**20:5.2f} GiB  "
                  f"{r['seconds']:.1f} s  same gradient {r['same_gradient']}", flush=True)
    if args.write_md:
        cmd = "python bench/decoder_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        lines = [SECTION_TITLE, "", f"Command: `{cmd}` (fp32, CPU, {args.threads} threads, paper width, encoding "
                 f"windows {args.patch}^3, no overlap; each row a fresh process).", "",
                 "| volume | vae_runtime | activations at the backward's peak (bytes / image voxel, fp32) | baseline / "
                 "this | CPU step: RSS increase (bytes / voxel) | CPU peak RSS (GiB) | step time (s) | same decoder "
                 "gradient |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['size']}^3 | {r['name']} | {r['kept_per_voxel']:.0f} | {r['ratio']:.2f}x | "
                         f"{r['rss_per_voxel']:.0f} | {r['peak_kib'] / 2**20:.2f} | {r['seconds']:.1f} | "
                         f"{'yes' if r['same_gradient'] else 'no'} |")
        replace_section(REPO / "BENCHMARKS.md", SECTION_TITLE, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
