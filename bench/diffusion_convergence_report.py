"""The report of bench/diffusion_convergence.py: steps-to-target summaries, markdown tables and plots of its runs
(run dicts as ``train_run`` returns them, keyed by ``(objective, condition)``, or by ``(backbone, objective,
condition)`` for the backbone comparison)."""

from __future__ import annotations

import math
from pathlib import Path

OBJECTIVES = ("ddpm", "rflow")
CONDITIONS = ("none", "metadata", "factors")
LABEL = {"ddpm": "DiT (ddpm)", "rflow": "SiT (rflow)"}
BACKBONES = ("dit", "dualflow")


def first_reach(steps: list[float], values: list[float | None], target: float) -> float | None:
    """First step at which the curve is <= ``target``, linear interpolation between evaluations (points without a
    value are skipped)."""
    pts = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    for k, (s, v) in enumerate(pts):
        if v <= target:
            if k == 0:
                return float(s)
            s0, v0 = pts[k - 1]
            return float(s0 + (v0 - target) / (v0 - v) * (s - s0)) if v0 != v else float(s)
    return None


def summarise(runs: dict) -> dict:
    out: dict = {}
    for obj in OBJECTIVES:
        base = runs.get((obj, "none"))
        if base is None:
            continue
        out[obj] = {}
        for metric in ("val_loss", "fid_proxy"):
            bsteps = [r["step"] for r in base["rows"]]
            bvals = [r[metric] for r in base["rows"]]
            entry: dict = {"none_total_steps": base["total_steps"]}
            # the last epoch always has both metrics; "best" is a second target for non-monotone curves
            for kind, target in (("final", bvals[-1]), ("best", min(v for v in bvals if v is not None))):
                ref = first_reach(bsteps, bvals, target)
                per = {}
                for cond in CONDITIONS:
                    run = runs.get((obj, cond))
                    if run is None:
                        continue
                    s = first_reach([r["step"] for r in run["rows"]], [r[metric] for r in run["rows"]], target)
                    per[cond] = {"steps_to_target": s, "final": run["rows"][-1][metric],
                                 "best": min(r[metric] for r in run["rows"] if r[metric] is not None),
                                 "ratio_vs_none": (s / ref) if (s is not None and ref) else None}
                if kind == "final":
                    entry.update({"target_none_final": target, "none_first_reach": ref, "conditions": per})
                else:
                    entry["target_none_best"] = {"target": target, "none_first_reach": ref, "conditions": per}
            out[obj][metric] = entry
    return out


def fmt(v, nd=3):
    if v is None:
        return "never"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def tables(runs: dict, summary: dict, floor: float | None, real_std: float | None = None) -> str:
    lines = ["| objective | condition | steps | val loss final (best) | FID proxy final (best) | generated latent std, "
             "final | train s/step | s/step ratio vs none |", "|---|---|---|---|---|---|---|---|"]
    for obj in OBJECTIVES:
        for cond in CONDITIONS:
            r = runs.get((obj, cond))
            if r is None:
                continue
            vl = [x["val_loss"] for x in r["rows"]]
            fd = [x["fid_proxy"] for x in r["rows"] if x["fid_proxy"] is not None]
            base = runs.get((obj, "none"))
            ratio = r["train_s_per_step"] / base["train_s_per_step"] if base else None
            lines.append(f"| {LABEL[obj]} | {cond} | {r['total_steps']} | {vl[-1]:.4f} ({min(vl):.4f}) | "
                         f"{fd[-1]:.3f} ({min(fd):.3f}) | {r['rows'][-1].get('gen_std', float('nan')):.2f} | "
                         f"{r['train_s_per_step']:.2f} | {fmt(ratio, 2)} |")
    def block(pick) -> None:
        for obj, per_metric in summary.items():
            for metric, s in per_metric.items():
                target, c = pick(s)

                def g(cond, key):
                    return fmt(c[cond][key], 0 if key == "steps_to_target" else 2) if cond in c else "–"

                lines.append(f"| {LABEL[obj]} | {metric} | {target:.4f} | {g('none', 'steps_to_target')} "
                             f"| {g('metadata', 'steps_to_target')} | {g('factors', 'steps_to_target')} | "
                             f"{g('metadata', 'ratio_vs_none')} | {g('factors', 'ratio_vs_none')} |")

    if summary:  # steps to reach the unconditional run's values (none without an unconditional run)
        lines += ["", "Steps to reach the unconditional run's final value (first crossing, linear interpolation "
                  "between evaluations; ratio = steps / the unconditional run's own first crossing):", "",
                  "| objective | metric | target (none, final) | none | metadata | factors | ratio metadata | "
                  "ratio factors |", "|---|---|---|---|---|---|---|---|"]
        block(lambda s: (s["target_none_final"], s["conditions"]))
        lines += ["", "The same with the unconditional run's *best* value as the target (differs from the above where "
                  "its curve is not monotone):", "",
                  "| objective | metric | target (none, best) | none | metadata | factors | ratio metadata | "
                  "ratio factors |", "|---|---|---|---|---|---|---|---|"]
        block(lambda s: (s["target_none_best"]["target"], s["target_none_best"]["conditions"]))
    extra = [f"{LABEL[o]}: {r['fid_proxy_train_factors']:.3f}" for (o, c), r in runs.items()
             if "fid_proxy_train_factors" in r]
    if extra:
        lines += ["", "Final FID proxy of the factors runs when the factors come from the training latents instead of "
                  "the reference test latents: " + "; ".join(extra)]
    if floor is not None:
        lines += [f"Real-vs-real floor (training crops vs the reference test crops, same features): {floor:.3f}"
                  + (f"; real reference latent std {real_std:.2f}" if real_std is not None else "")]
    return "\n".join(lines)


def plot(runs: dict, summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = [o for o in OBJECTIVES if any(k[0] == o for k in runs)]
    fig, axes = plt.subplots(2, len(objs), figsize=(6 * len(objs), 8), squeeze=False)
    colours = {"none": "tab:gray", "metadata": "tab:blue", "factors": "tab:red"}
    for j, obj in enumerate(objs):
        for i, (metric, name) in enumerate((("val_loss", "validation loss (EMA)"), ("fid_proxy", "FID proxy"))):
            ax = axes[i][j]
            for cond in CONDITIONS:
                r = runs.get((obj, cond))
                if r is None:
                    continue
                pts = [(x["step"], x[metric]) for x in r["rows"] if x[metric] is not None]
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", ms=3, color=colours[cond], label=cond)
            s = summary.get(obj, {}).get(metric)
            if s:
                ax.axhline(s["target_none_final"], ls="--", lw=0.8, color="k", label="none, final")
            ax.set_title(f"{LABEL[obj]}: {name}")
            ax.set_xlabel("training step")
            ax.set_ylabel(name)
            if metric == "fid_proxy":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backbone_table(runs: dict) -> str:
    """Markdown: every (objective, condition) run of each backbone side by side (parameters, steps, final and best
    validation loss and FID proxy, s/step and its ratio to the dit run)."""
    lines = ["| objective | condition | backbone | parameters | steps | val loss final (best) | FID proxy final (best) "
             "| generated latent std, final | train s/step | s/step ratio vs dit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for obj in OBJECTIVES:
        for cond in CONDITIONS:
            for bb in BACKBONES:
                r = runs.get((bb, obj, cond))
                if r is None:
                    continue
                vl = [x["val_loss"] for x in r["rows"]]
                fd = [x["fid_proxy"] for x in r["rows"] if x["fid_proxy"] is not None]
                base = runs.get(("dit", obj, cond))
                ratio = r["train_s_per_step"] / base["train_s_per_step"] if base else None
                n = r.get("num_parameters")
                lines.append(f"| {LABEL[obj]} | {cond} | {bb} | {n / 1e6:.3f} M | {r['total_steps']} | "
                             f"{vl[-1]:.4f} ({min(vl):.4f}) | {fd[-1]:.3f} ({min(fd):.3f}) | "
                             f"{r['rows'][-1].get('gen_std', float('nan')):.2f} | {r['train_s_per_step']:.2f} | "
                             f"{fmt(ratio, 2)} |")
    return "\n".join(lines)


def plot_backbones(runs: dict, path: Path, title: str) -> None:
    """Validation loss and FID proxy vs step, one colour per (objective, condition), solid dit, dashed dualflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(o, c) for _, o, c in runs})
    colours = dict(zip(keys, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for (bb, obj, cond), r in sorted(runs.items()):
        for ax, metric in zip(axes, ("val_loss", "fid_proxy")):
            pts = [(x["step"], x[metric]) for x in r["rows"] if x[metric] is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o-" if bb == "dit" else "s--", ms=3,
                    color=colours[(obj, cond)], label=f"{bb} {obj}/{cond} ({r.get('num_parameters', 0) / 1e6:.2f} M)")
    for ax, name in zip(axes, ("validation loss (EMA)", "FID proxy")):
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
