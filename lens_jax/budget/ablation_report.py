"""report.md and PNG plots of a caption-density ablation (the results dict of lens_jax.budget.ablation).

The verdict is computed, never written in advance: arms are ranked by their final overall ShapesEval
score, and a gap is called a difference only when it exceeds two binomial standard errors of the
per-item pass rate at the number of prompts evaluated.
"""

from __future__ import annotations

import math
import pathlib

TASK_ORDER = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
# Below ~256 image tokens a dense caption outweighs the image, and a FLOPs-matched comparison measures the
# cost of longer text more than caption density (../shared/DESIGN.md): the report warns.
MIN_IMAGE_TOKENS = 256
ARM_COLORS = {"dense": "tab:blue", "mix": "tab:purple", "short": "tab:orange"}


def _tasks(results: dict) -> list[str]:
    seen = []
    for arm in results["arms"].values():
        for ck in arm["checkpoints"]:
            for style in results["eval"]["prompt_styles"]:
                for t in ck[style]["tasks"]:
                    if t not in seen:
                        seen.append(t)
    return [t for t in TASK_ORDER if t in seen] + [t for t in seen if t not in TASK_ORDER]


def plot_scores(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = results["eval"]["prompt_styles"]
    fig, axes = plt.subplots(1, len(styles), figsize=(5.2 * len(styles), 3.8), squeeze=False)
    for ax, style in zip(axes[0], styles):
        for arm, r in results["arms"].items():
            xs = [c["flops"] for c in r["checkpoints"]]
            ys = [c[style]["overall"] for c in r["checkpoints"]]
            ax.plot(xs, ys, "o-", color=ARM_COLORS.get(arm), label=f"{arm} captions")
        gt = results.get("ground_truth", {}).get("overall")
        if gt is not None:
            ax.axhline(gt, color="gray", ls=":", lw=1, label="ground-truth renders")
        floor = results.get("noise_floor", {}).get("overall")
        if floor is not None:
            ax.axhline(floor, color="gray", ls="--", lw=1, label="uniform-noise images")
        ax.set_title(f"ShapesEval overall, {style} prompts")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("score (mean of task means)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tasks(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(results)
    styles = results["eval"]["prompt_styles"]
    cols = 3
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for arm, r in results["arms"].items():
            for style, ls in zip(styles, ("-", "--")):
                xs = [c["flops"] for c in r["checkpoints"] if task in c[style]["tasks"]]
                ys = [c[style]["tasks"][task] for c in r["checkpoints"] if task in c[style]["tasks"]]
                ax.plot(xs, ys, "o" + ls, ms=3, color=ARM_COLORS.get(arm), label=f"{arm} / {style} prompts")
        ax.set_title(task)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("training FLOPs")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(results: dict, path: pathlib.Path, window: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm, r in results["arms"].items():
        if not r["loss"]:
            continue
        xs = np.array([p["flops"] for p in r["loss"]])
        ys = np.array([p["loss"] for p in r["loss"]])
        k = min(window, len(ys))
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(xs[k - 1:], smooth, color=ARM_COLORS.get(arm), label=f"{arm} captions")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"flow-matching loss (moving mean of {window} logs)")
    ax.set_title("training loss vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(results: dict, style: str) -> str:
    n = results["eval"]["items"]
    finals = {arm: r["checkpoints"][-1][style]["overall"] for arm, r in results["arms"].items()}
    ranked = sorted(finals, key=finals.get, reverse=True)
    lines = [" > ".join(f"{a} ({finals[a]:.3f})" for a in ranked)]
    for a, b in zip(ranked, ranked[1:]):
        p = (finals[a] + finals[b]) / 2
        se = math.sqrt(max(p * (1 - p), 1e-9) * 2 / max(n, 1))
        gap = finals[a] - finals[b]
        lines.append(f"{a} - {b} = {gap:+.3f} ({'beyond' if gap > 2 * se else 'within'} two standard errors, "
                     f"2 SE = {2 * se:.3f} at {n} prompts)")
    return "; ".join(lines)


def write_report(results: dict, out: pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    plot_scores(results, out / "shapeseval_vs_flops.png")
    plot_tasks(results, out / "shapeseval_per_task.png")
    plot_loss(results, out / "loss_vs_flops.png")
    styles = results["eval"]["prompt_styles"]
    tasks = _tasks(results)
    lines = ["# Caption-density ablation", "",
             f"Each arm trains the same model from the same seed for {results['budget_flops']:.3g} training FLOPs "
             "(DiT forward+backward plus the frozen text encoder's forward over the padded text, per step). "
             f"ShapesEval: {results['eval']['items']} prompts ({results['eval']['per_task']} per task) at "
             f"{results['eval']['width']}x{results['eval']['height']}, one image each, scored by the programmatic "
             "detector; 'short' prompts are GenEval-like, 'dense' prompts are the dataset's dense caption of the "
             "same scene (the analog of Lens's prompt reasoner).", "",
             "## Arms", "",
             "| arm | text tokens (padded) | mean caption tokens | text/image tokens | FLOPs/step | steps | total FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in results["arms"].items():
        p = r["plan"]
        lines.append(f"| {arm} | {p['max_text_len']} | {p['mean_text_tokens']:.1f} | {p['text_image_ratio']:.3f} "
                     f"| {p['flops_per_step']:.3g} | {p['steps']} | {p['total_flops']:.3g} |")
    image_tokens = min(r["plan"]["image_tokens"] for r in results["arms"].values())
    if image_tokens < MIN_IMAGE_TOKENS:
        lines += ["", f"Warning: {image_tokens} image tokens per sample. Below ~{MIN_IMAGE_TOKENS} a dense caption outweighs the image "
                  "(the real model sees 1,024-4,096 image tokens and ~150 text tokens), so equal FLOPs mostly measures "
                  "the cost of longer text; configs/caption_ablation.py keeps 256."]
    gt = results.get("ground_truth")
    lines += ["", "## Final scores", ""]
    if gt:
        lines.append(f"Ground-truth renders score {gt['overall']:.3f} with the same detector (the ceiling).")
    floor = results.get("noise_floor")
    if floor:
        lines.append(f"Uniform-noise images score {floor['overall']:.3f} (the floor: detector false positives; per task "
                     + ", ".join(f"{t} {v:.2f}" for t, v in floor["tasks"].items()) + ").")
    lines.append("")
    for style in styles:
        lines += [f"### {style} prompts", "", "| arm | overall | " + " | ".join(tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
        for arm, r in results["arms"].items():
            s = r["checkpoints"][-1][style]
            lines.append(f"| {arm} | {s['overall']:.3f} | " +
                         " | ".join(f"{s['tasks'][t]:.2f}" if t in s["tasks"] else "-" for t in tasks) + " |")
        lines += ["", f"Ranking: {verdict(results, style)}", ""]
    lines += ["## Over training", "", "| arm | step | FLOPs | " + " | ".join(f"{s} prompts" for s in styles) + " | last loss |",
              "|---|---|---|" + "---|" * len(styles) + "---|"]
    for arm, r in results["arms"].items():
        for c in r["checkpoints"]:
            losses = [p["loss"] for p in r["loss"] if p["step"] <= c["step"]]
            loss = f"{losses[-1]:.4f}" if losses else "-"
            lines.append(f"| {arm} | {c['step']} | {c['flops']:.3g} | " +
                         " | ".join(f"{c[s]['overall']:.3f}" for s in styles) + f" | {loss} |")
    lines += ["", "![ShapesEval vs training FLOPs](shapeseval_vs_flops.png)", "",
              "![per task](shapeseval_per_task.png)", "", "![loss vs FLOPs](loss_vs_flops.png)", "",
              "Losses are not comparable across arms as a quality measure (each arm conditions on different text); "
              "they show that every arm trained. Sample grids of the evaluated images: arms/<arm>/eval/step_<n>_*.png.",
              ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
