"""Figures, tables and result files of the training demo.

Inputs: ``args`` (the parsed command line), ``data = (train_x, train_y, val_x, val_y)``,
``results = {"base": ..., "rmi": ...}`` (``demo_train.train_run``'s dicts), ``meas``
(``demo_measure.measure_losses``) and ``env`` (command, device, versions, load average).
Writes ``<tag>.png`` (held-out inputs, ground truth, both runs' predictions),
``<tag>_curves.png`` (loss terms and held-out mIoU during training), ``<tag>_results.md`` and
``<tag>_results.json``, and prints the per-class table.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import synthetic_shapes as shapes
from demo_losses import RUN_LABEL
from demo_train import confusion, iou_from_confusion

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shapes.IGNORE_INDEX
NUM_CLASSES = shapes.NUM_CLASSES
PLURAL = {"disc": "discs", "box": "boxes", "triangle": "triangles", "ring": "rings",
          "line": "lines"}


def output_paths(out_dir, tag) -> dict:
    """``{"png", "curves", "md", "json"}``: the four files a demo run writes."""
    return {"png": out_dir / f"{tag}.png", "curves": out_dir / f"{tag}_curves.png",
            "md": out_dir / f"{tag}_results.md", "json": out_dir / f"{tag}_results.json"}


# ---- figures ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_predictions_figure(args, data, results, path):
    """Rows: the first ``args.num_examples`` held-out images, their ground truth and both runs'
    predictions (each with its pixel accuracy); a legend of the 21 class colours."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    _, _, val_x, val_y = data
    pal = shapes.palette().numpy()
    labels = RUN_LABEL[args.mode]
    k = min(args.num_examples, len(val_x))
    rows = [("input", None), ("ground truth", val_y),
            (f"{labels['base']} prediction", results["base"]["pred"]),
            (f"{labels['rmi']} prediction", results["rmi"]["pred"])]
    fig, axes = plt.subplots(len(rows), k, figsize=(1.9 * k, 1.95 * len(rows) + 1.1),
                             squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for i in range(k):
            ax = axes[r, i]
            if maps is None:
                ax.imshow(val_x[i].permute(1, 2, 0).numpy())
            else:
                shown = maps[i].clone()
                if r >= 2:  # predictions: draw the ignored border like the ground truth
                    shown[val_y[i] == IGNORE] = IGNORE
                ax.imshow(pal[shown.long().numpy()], interpolation="nearest")
                if r >= 2:
                    run = "base" if r == 2 else "rmi"
                    _, _, acc = iou_from_confusion(confusion(results[run]["pred"][i], val_y[i]))
                    ax.set_title(f"pixel acc. {acc:.3f}", fontsize=8, pad=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=9)
    # Legend: one column per shape kind (the kind sets the hue, the colour the shade).
    patch = lambda c: Patch(color=pal[c] / 255.0, label=shapes.CLASS_NAMES[c])  # noqa: E731
    blank = Patch(visible=False, label="")
    handles = [patch(0), Patch(facecolor="white", edgecolor="0.6", label="ignored (255)"),
               blank, blank] + [patch(c) for c in range(1, NUM_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    b, r = results["base"], results["rmi"]
    fig.suptitle(f"Held-out images (the first {k} of the val split). val mIoU: "
                 f"{labels['base']} {b['miou']:.3f}, {labels['rmi']} {r['miou']:.3f} "
                 f"(DF {args.stride}, R {args.radius})", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves_figure(args, results, path):
    """Three panels against epochs: the base term (both runs), the RMI term (RMI run), each a
    running mean over a quarter epoch, and the held-out mIoU after each epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    labels = RUN_LABEL[args.mode]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8))
    spe = len(results["base"]["hist"]["loss"]) // args.epochs
    win = max(1, spe // 4)

    def curve(ax, values, **kw):
        # The RMI term is None for the steps before --rmi-start-epoch.
        start = next((i for i, v in enumerate(values) if v is not None), len(values))
        t = torch.tensor(values[start:], dtype=torch.float64)
        if len(t) >= win:  # running mean over a quarter epoch
            t = F.avg_pool1d(t[None, None], win, 1).flatten()
        x = (start + torch.arange(len(t)) + (win if len(values) - start >= win else 1)) / spe
        ax.plot(x.numpy(), t.numpy(), **kw)

    base_name = "CE" if args.mode == "softmax" else "BCE"
    for run, colour in (("base", "C0"), ("rmi", "C3")):
        h = results[run]["hist"]
        curve(ax1, h["base"], color=colour, label=f"{labels[run]} run")
        ax3.plot(range(1, args.epochs + 1), h["val_miou"], "o-", color=colour, label=labels[run])
    curve(ax2, results["rmi"]["hist"]["rmi"], color="C3", label="RMI term")
    ax1.set_title(f"{base_name} term during training (both runs)")
    ax2.set_title(f"RMI term of the {labels['rmi']} run")
    ax2.text(0.02, 0.03, "a lower-bound surrogate: negative values are expected",
             transform=ax2.transAxes, fontsize=8, color="0.35")
    ax3.set_title("held-out mIoU after each epoch")
    ax1.set_ylabel("loss (running mean)")
    ax3.set_ylabel("val mIoU")
    ax3.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- numbers ---------------------------------------------------------------------------------

def epoch_means(values, epochs):
    """Mean of a per-step history over each epoch."""
    per = len(values) // epochs
    return [sum(values[e * per:(e + 1) * per]) / per for e in range(epochs)]


def fmt_bytes(n):
    return "n/a" if not math.isfinite(n) else f"{n / 2 ** 20:.1f} MiB"


def verdict(args, delta_pts, per_kind_delta):
    """One paragraph: the mIoU change of the RMI run, the range over shape kinds, a caveat."""
    labels = RUN_LABEL[args.mode]
    best = max(per_kind_delta, key=lambda kv: kv[1])
    worst = min(per_kind_delta, key=lambda kv: kv[1])
    if abs(delta_pts) < 1.0:
        head = (f"On this data set and budget, {labels['rmi']} and {labels['base']} end within "
                f"1 mIoU point of each other ({delta_pts:+.1f}): no clear difference")
    elif delta_pts > 0:
        head = (f"{labels['rmi']} improved held-out mIoU by {delta_pts:.1f} points over "
                f"{labels['base']}")
    else:
        head = (f"{labels['rmi']} lowered held-out mIoU by {-delta_pts:.1f} points against "
                f"{labels['base']}")
    return (f"{head}. Per shape kind the change runs from {worst[1]:+.1f} points "
            f"({PLURAL[worst[0]]}) "
            f"to {best[1]:+.1f} ({PLURAL[best[0]]}). This is one seed of one short schedule on a "
            f"synthetic data set: differences of a point or two are within run-to-run noise.")


def compare_runs(args, results) -> dict:
    """What the tables and the report say about the two runs: ``delta`` (mIoU change, points),
    ``kinds`` (``(kind, mean IoU base, mean IoU rmi)`` per shape kind), ``med`` (median training
    step seconds per run, the first step left out) and ``verdict``."""
    b, r = results["base"], results["rmi"]
    delta = 100 * (r["miou"] - b["miou"])
    kinds = []
    for k, kind in enumerate(shapes.KINDS):
        cls = [shapes.class_of(k, c) for c in range(len(shapes.COLOURS))]
        mb = sum(b["iou"][c] for c in cls) / len(cls)
        mr = sum(r["iou"][c] for c in cls) / len(cls)
        kinds.append((kind, mb, mr))
    text = verdict(args, delta, [(k, 100 * (mr - mb)) for k, mb, mr in kinds])
    step = {run: sorted(results[run]["hist"]["step_s"][1:] or results[run]["hist"]["step_s"])
            for run in results}
    med = {run: s[len(s) // 2] for run, s in step.items()}
    return {"delta": delta, "kinds": kinds, "med": med, "verdict": text}


# ---- result files ----------------------------------------------------------------------------

def markdown_report(args, results, meas, env, wall_total, cmp, paths) -> str:
    """``<tag>_results.md``: setup, verdict, summary table, loss memory, per-class table."""
    labels = RUN_LABEL[args.mode]
    b, r = results["base"], results["rmi"]
    med = cmp["med"]
    L = []
    L.append(f"# RMI training demo: {labels['base']} vs {labels['rmi']}\n")
    L.append(f"Command: `{env['command']}`  ")
    L.append(f"Device: {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
             f"RMI backend `{env['backend']}`, total wall time {wall_total / 60:.1f} min"
             + (f" (1-minute load average {env['load_start']:.1f} at the start, "
                f"{env['load_end']:.1f} at the end: times are inflated when other jobs share "
                f"the cores)" if env.get("load_start") is not None else "") + ".\n")
    L.append(f"Data: procedural shapes, {NUM_CLASSES} classes (background + 5 shape kinds x 4 "
             f"colours; rings and lines are 1.5-3 px wide), {args.size}x{args.size}, "
             f"{args.n_train} train / {args.n_val} held-out images, seed {args.seed}. "
             f"Model: SmallSegNet (width {args.width}, "
             f"{sum(p.numel() for p in b['model'].parameters()) / 1e3:.0f} k parameters), "
             f"{'SGD (momentum 0.9)' if args.optimizer == 'sgd' else 'AdamW'} lr {args.lr}, "
             f"one-cycle, batch {args.batch_size}, {args.epochs} epochs. "
             f"RMI: R {args.radius}, DF {args.stride}, {args.pool} pooling, lambda "
             f"{args.weight_lambda} (lambda_way 1: total = {args.weight_lambda} * "
             f"{'CE' if args.mode == 'softmax' else 'BCE'} + {1 - args.weight_lambda:g} * RMI), "
             f"{args.mode} mode"
             + (f", RMI switched on at epoch {args.rmi_start_epoch + 1} (base loss alone before)"
                if args.rmi_start_epoch else "")
             + ". Both runs: same seed, same initial weights, same batches.\n")
    L.append(f"**Result.** {cmp['verdict']}\n")
    L.append(f"| | {labels['base']} | {labels['rmi']} | change |")
    L.append("|---|---:|---:|---:|")
    L.append(f"| val mIoU | {b['miou']:.3f} | {r['miou']:.3f} | {cmp['delta']:+.1f} pts |")
    L.append(f"| val pixel accuracy | {b['pixel_acc']:.3f} | {r['pixel_acc']:.3f} | "
             f"{100 * (r['pixel_acc'] - b['pixel_acc']):+.1f} pts |")
    for kind, mb, mr in cmp["kinds"]:
        L.append(f"| mean IoU, {PLURAL[kind]} | {mb:.3f} | {mr:.3f} | {100 * (mr - mb):+.1f} pts |")
    L.append(f"| training step, median (model + loss + optimizer) | {1e3 * med['base']:.0f} ms "
             f"| {1e3 * med['rmi']:.0f} ms | x{med['rmi'] / med['base']:.2f} |")
    L.append(f"| run wall time (incl. per-epoch validation) | {b['hist']['wall_s']:.0f} s | "
             f"{r['hist']['wall_s']:.0f} s | |")
    shape = "x".join(map(str, meas["shape"]))
    L.append(f"| loss forward+backward alone, logits {shape} | "
             f"{1e3 * meas['base']['seconds']:.1f} ms "
             f"| {1e3 * meas['rmi']['seconds']:.1f} ms | |")
    L.append(f"| peak extra memory of the loss (incl. the logits' gradient) | "
             f"{fmt_bytes(meas['base']['extra_bytes'])} | "
             f"{fmt_bytes(meas['rmi']['extra_bytes'])} | |")
    L.append("")
    if "reference" in meas:
        lb = meas["logits_bytes"]
        L.append(f"Loss memory for logits {shape} float32 ({fmt_bytes(lb)}), DF {args.stride}: "
                 f"backend `{env['backend']}` {fmt_bytes(meas['rmi']['extra_bytes'])} "
                 f"({meas['rmi']['extra_bytes'] / lb:.1f}x the logits), the unfold reference "
                 f"(the authors' algorithm) {fmt_bytes(meas['reference']['extra_bytes'])} "
                 f"({meas['reference']['extra_bytes'] / lb:.1f}x), "
                 f"{1e3 * meas['reference']['seconds']:.0f} ms.\n")
    L.append("Memory: " + env["mem_method"] + (
        " The BCE baseline is the plain PyTorch expression in python/demo_losses.py (one-hot "
        "target materialised); `RMILoss` computes its BCE term inside the fused kernels."
        if args.mode == "sigmoid" else "") + "\n")
    L.append("Per-class IoU on the held-out split:\n")
    L.append(f"| class | {labels['base']} | {labels['rmi']} | change |")
    L.append("|---|---:|---:|---:|")
    for c in range(NUM_CLASSES):
        ib, ir = b["iou"][c], r["iou"][c]
        L.append(f"| {c} {shapes.CLASS_NAMES[c]} | {ib:.3f} | {ir:.3f} | {100 * (ir - ib):+.1f} |")
    L.append("")
    L.append(f"Val mIoU per epoch: {labels['base']} "
             + ", ".join(f"{v:.3f}" for v in b["hist"]["val_miou"]) + f"; {labels['rmi']} "
             + ", ".join(f"{v:.3f}" for v in r["hist"]["val_miou"]) + ".\n")
    L.append(f"![predictions]({paths['png'].name})\n")
    L.append(f"![curves]({paths['curves'].name})\n")
    return "\n".join(L)


def json_summary(args, results, meas, env, wall_total, cmp) -> dict:
    """``<tag>_results.json``: config, environment, verdict, per-run numbers, loss measurements."""
    labels = RUN_LABEL[args.mode]
    return {
        "config": {k: (os.path.relpath(v, ROOT) if isinstance(v, Path) else v)
                   for k, v in vars(args).items() if not k.startswith("_")},
        "env": env, "wall_total_s": wall_total, "verdict": cmp["verdict"],
        "runs": {run: {"label": labels[run], "miou": res["miou"], "pixel_acc": res["pixel_acc"],
                       "iou": res["iou"], "val_miou_per_epoch": res["hist"]["val_miou"],
                       "base_term_per_epoch": epoch_means(res["hist"]["base"], args.epochs),
                       "step_s_median": cmp["med"][run], "wall_s": res["hist"]["wall_s"]}
                 for run, res in results.items()},
        "loss_measurements": meas,
    }


def write_outputs(args, data, results, meas, env, wall_total, paths) -> dict:
    """Write the four files of ``paths`` (``output_paths``); returns ``compare_runs``."""
    save_predictions_figure(args, data, results, paths["png"])
    save_curves_figure(args, results, paths["curves"])
    cmp = compare_runs(args, results)
    paths["md"].write_text(markdown_report(args, results, meas, env, wall_total, cmp, paths))
    summary = json_summary(args, results, meas, env, wall_total, cmp)
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    return cmp


def print_tables(args, results, meas, env, cmp):
    """Per-class IoU of both runs, per-kind means, median step time, the loss alone, verdict."""
    labels = RUN_LABEL[args.mode]
    b, r = results["base"], results["rmi"]
    med = cmp["med"]
    print(f"\nPer-class IoU (held-out split, {args.n_val} images):")
    print(f"  {'class':<18} {labels['base']:>8} {labels['rmi']:>8} {'change':>8}")
    for c in range(NUM_CLASSES):
        print(f"  {c:>2} {shapes.CLASS_NAMES[c]:<15} {b['iou'][c]:8.3f} {r['iou'][c]:8.3f} "
              f"{100 * (r['iou'][c] - b['iou'][c]):+8.1f}")
    for kind, mb, mr in cmp["kinds"]:
        print(f"  {'mean ' + PLURAL[kind]:<18} {mb:8.3f} {mr:8.3f} {100 * (mr - mb):+8.1f}")
    print(f"  {'mIoU':<18} {b['miou']:8.3f} {r['miou']:8.3f} {100 * (r['miou'] - b['miou']):+8.1f}")
    print(f"\nTime per training step (median): {labels['base']} {1e3 * med['base']:.0f} ms, "
          f"{labels['rmi']} {1e3 * med['rmi']:.0f} ms (RMI backend '{env['backend']}', "
          f"{env['device_name']})")
    shape = "x".join(map(str, meas["shape"]))
    print(f"Loss alone, forward+backward on logits {shape}: "
          f"{labels['base']} {1e3 * meas['base']['seconds']:.1f} ms / "
          f"{fmt_bytes(meas['base']['extra_bytes'])} peak extra; {labels['rmi']} "
          f"{1e3 * meas['rmi']['seconds']:.1f} ms / {fmt_bytes(meas['rmi']['extra_bytes'])}"
          + (f"; unfold reference {1e3 * meas['reference']['seconds']:.0f} ms / "
             f"{fmt_bytes(meas['reference']['extra_bytes'])}" if "reference" in meas else ""))
    print(f"\n{cmp['verdict']}")
