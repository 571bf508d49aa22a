"""The training demo's decision rule, figures and result files.

Inputs: ``args`` (the parsed command line), ``data`` (``demo_data.load_data``), ``runs``
(``{seed: demo_train.run_seed's dict}``), ``meas`` (``demo_measure.measure_losses``) and
``env`` (command, device, versions, load average, wall times). Writes ``<tag>.png`` (test
images, ground truth, the predictions of every regime and arm, with zooms on thin parts),
``<tag>_curves.png`` (validation mIoU and base term per epoch, mean and spread over seeds),
``<tag>_results.md`` and ``<tag>_results.json`` (per-seed numbers included).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from demo_losses import RUN_LABEL
from demo_train import ARMS, REGIMES

ROOT = Path(__file__).resolve().parent.parent
METRICS = (("miou", "mIoU"), ("boundary_f", "boundary F (1 px)"), ("thin_miou", "thin mIoU"),
           ("fg_iou", "foreground IoU"), ("identity_acc", "identity accuracy"))
#: t(0.975, df) for the 95 % interval of a mean of df + 1 paired differences (1.96 past 30).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def output_paths(out_dir, tag) -> dict:
    """``{"png", "curves", "md", "json"}``: the four files a demo run writes."""
    return {"png": out_dir / f"{tag}.png", "curves": out_dir / f"{tag}_curves.png",
            "md": out_dir / f"{tag}_results.md", "json": out_dir / f"{tag}_results.json"}


# ---- decision rule -----------------------------------------------------------------------------

def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table, rounded down to
    the nearest tabulated df; 1.96 past 30)."""
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_std(values):
    """``(mean, sample standard deviation)``; NaN in, NaN out; std 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def paired_decision(base, rmi) -> dict:
    """The protocol's rule on per-seed values (same seeds, same order): the paired differences'
    mean, standard deviation, 95 % t-interval and the decision "RMI helps" (interval above 0),
    "RMI hurts" (below 0) or "no difference detected"."""
    diffs = [r - b for b, r in zip(base, rmi)]
    mean_b, std_b = mean_std(base)
    mean_r, std_r = mean_std(rmi)
    mean_d, std_d = mean_std(diffs)
    half = t975(len(diffs) - 1) * std_d / math.sqrt(len(diffs))
    lo, hi = mean_d - half, mean_d + half
    decision = ("RMI helps" if lo > 0 else "RMI hurts" if hi < 0 else "no difference detected")
    return {"base_mean": mean_b, "base_std": std_b, "rmi_mean": mean_r, "rmi_std": std_r,
            "diff_mean": mean_d, "diff_std": std_d, "ci95": [lo, hi], "decision": decision,
            "base": list(base), "rmi": list(rmi)}


def summarize(runs) -> dict:
    """``{regime: {metric: paired_decision}}`` over the seeds of ``runs``."""
    seeds = list(runs)
    out = {}
    for regime in REGIMES:
        if regime not in runs[seeds[0]]:
            continue
        out[regime] = {key: paired_decision(
            *[[runs[s][regime][arm]["metrics"][key] for s in seeds] for arm in ARMS])
            for key, _ in METRICS}
    return out


def summary_table(args, summary) -> str:
    """Markdown table: per regime and metric, both arms' mean +- std, the paired difference,
    its 95 % interval and the decision."""
    labels = RUN_LABEL[args.mode]
    lines = [f"| regime | metric (test) | {labels['base']} | {labels['rmi']} | difference "
             f"| 95 % interval | decision |", "|---|---|---:|---:|---:|---:|---|"]
    for regime, by_metric in summary.items():
        for key, name in METRICS:
            st = by_metric[key]
            lines.append(
                f"| {regime} | {name} | {st['base_mean']:.3f} ± {st['base_std']:.3f} "
                f"| {st['rmi_mean']:.3f} ± {st['rmi_std']:.3f} "
                f"| {st['diff_mean']:+.3f} ± {st['diff_std']:.3f} "
                f"| [{st['ci95'][0]:+.3f}, {st['ci95'][1]:+.3f}] | {st['decision']} |")
    return "\n".join(lines)


def per_seed_table(args, runs) -> str:
    labels = RUN_LABEL[args.mode]
    lines = ["| seed | regime | arm | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|---|" + "---:|" * len(METRICS)]
    for seed, by_regime in runs.items():
        rows = [(regime, labels[arm], by_regime[regime][arm]["metrics"])
                for regime in REGIMES if regime in by_regime for arm in ARMS]
        if "pretrain" in by_regime:
            best = by_regime["pretrain"]["hist"]["best_epoch"]
            rows.insert(0, ("pretrain", f"{labels['base']} (best epoch {best})",
                            by_regime["pretrain"]["metrics"]))
        for regime, arm, m in rows:
            lines.append(f"| {seed} | {regime} | {arm} | "
                         + " | ".join(f"{m[key]:.3f}" for key, _ in METRICS) + " |")
    return "\n".join(lines)


# ---- figures -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def zoom_window(thin, side):
    """``(top, left)`` of the ``side`` x ``side`` window with the most thin-structure pixels."""
    counts = F.avg_pool2d(thin[None, None].float(), side, 1)[0, 0]
    idx = int(counts.flatten().argmax())
    return divmod(idx, counts.shape[1])


def save_predictions_figure(args, data, runs, path):
    """For each of the first ``args.num_examples`` test images, two rows (the whole image and a
    zoom on its thin structures, the zoom window boxed above): input, ground truth and the
    first seed's prediction of each regime and arm."""
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    test_x, test_y, test_thin = data["test"]
    pal = data["palette"].numpy()
    first = runs[next(iter(runs))]
    labels = RUN_LABEL[args.mode]
    cols = [("input", None), ("ground truth", test_y)] + [
        (f"{regime}: {labels[arm]}", first[regime][arm]["pred"])
        for regime in REGIMES if regime in first for arm in ARMS]
    k = min(args.num_examples, len(test_x))
    side = max(8, args.size // 3)
    fig, axes = plt.subplots(2 * k, len(cols), figsize=(1.9 * len(cols), 3.9 * k + 0.8),
                             squeeze=False)
    for i in range(k):
        top, left = zoom_window(test_thin[i], side)
        for c, (name, maps) in enumerate(cols):
            for zoom in (0, 1):
                ax = axes[2 * i + zoom, c]
                img = (test_x[i].permute(1, 2, 0).numpy() if maps is None
                       else pal[maps[i].long().numpy()])
                if zoom:
                    img = img[top:top + side, left:left + side]
                else:
                    ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False,
                                           edgecolor="white", linewidth=0.8))
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and not zoom:
                    ax.set_title(name, fontsize=8)
            if c == 0:
                axes[2 * i, 0].set_ylabel(f"test image {i}", fontsize=8)
                axes[2 * i + 1, 0].set_ylabel("zoom", fontsize=8)
    handles = [Patch(color=pal[c] / 255.0, label=name)
               for c, name in enumerate(data["class_names"][:12])]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7,
               frameon=False)
    fig.suptitle(f"Test images, seed {next(iter(runs))} (DF {args.stride}, R {args.radius}, "
                 f"lambda {args.weight_lambda})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epoch_means(values, epochs):
    """Mean of a per-step history over each of ``epochs`` epochs."""
    per = len(values) // epochs
    return [sum(values[e * per:(e + 1) * per]) / per for e in range(epochs)]


def _band(ax, series, colour, label):
    """Mean line and +- 1 std band over seeds of equal-length per-epoch series."""
    t = torch.tensor(series, dtype=torch.float64)
    mean = t.mean(0)
    std = t.std(0) if len(t) > 1 else torch.zeros_like(mean)
    x = range(1, t.shape[1] + 1)
    ax.plot(x, mean.numpy(), "o-", color=colour, label=label, markersize=3)
    ax.fill_between(x, (mean - std).numpy(), (mean + std).numpy(), color=colour, alpha=0.2)


def save_curves_figure(args, runs, path):
    """Per regime: validation mIoU and the base term (epoch mean) per epoch, mean +- std over
    seeds, both arms."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    labels = RUN_LABEL[args.mode]
    regimes = [r for r in REGIMES if r in runs[next(iter(runs))]]
    fig, axes = plt.subplots(2, len(regimes), figsize=(6 * len(regimes), 6.4), squeeze=False)
    for c, regime in enumerate(regimes):
        for arm, colour in zip(ARMS, ("C0", "C3")):
            hists = [runs[s][regime][arm]["hist"] for s in runs]
            epochs = len(hists[0]["val_miou"])
            _band(axes[0, c], [h["val_miou"] for h in hists], colour, labels[arm])
            _band(axes[1, c], [epoch_means(h["base"], epochs) for h in hists], colour,
                  f"{labels[arm]} run")
        extra = (" (after pretraining)" if regime == "finetune" else "")
        axes[0, c].set_title(f"{regime}{extra}: validation mIoU, mean ± std over "
                             f"{len(runs)} seeds", fontsize=9)
        axes[1, c].set_title(f"{regime}: base term of the training loss (epoch mean)",
                             fontsize=9)
        for ax in axes[:, c]:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- result files ------------------------------------------------------------------------------

def median_step_ms(runs, regime, arm):
    steps = sorted(s for seed in runs for s in runs[seed][regime][arm]["hist"]["step_s"][1:])
    return 1e3 * steps[len(steps) // 2] if steps else float("nan")


def fmt_bytes(n):
    return "n/a" if not math.isfinite(n) else f"{n / 2 ** 20:.1f} MiB"


def decisions_text(args, summary) -> str:
    labels = RUN_LABEL[args.mode]
    parts = []
    for regime, by_metric in summary.items():
        st = by_metric["miou"]
        others = ", ".join(f"{name} {by_metric[key]['diff_mean']:+.3f} "
                           f"({by_metric[key]['decision']})" for key, name in METRICS[1:])
        parts.append(f"**{regime}**: {st['decision']} by the protocol's rule: test mIoU "
                     f"{labels['base']} {st['base_mean']:.3f} ± {st['base_std']:.3f}, "
                     f"{labels['rmi']} {st['rmi_mean']:.3f} ± {st['rmi_std']:.3f}, paired "
                     f"difference {st['diff_mean']:+.3f} (95 % interval "
                     f"[{st['ci95'][0]:+.3f}, {st['ci95'][1]:+.3f}]). Secondary: {others}.")
    return "\n\n".join(parts)


def markdown_report(args, data, runs, meas, env, summary, paths) -> str:
    labels = RUN_LABEL[args.mode]
    base_name = "CE" if args.mode == "softmax" else "BCE"
    L = [f"# RMI training demo: {labels['base']} vs {labels['rmi']}, {len(runs)} seeds\n",
         f"Protocol (written before the runs): [demo_protocol.md](demo_protocol.md).\n",
         f"Command: `{env['command']}`  ",
         f"Device: {env['device_name']} ({env['threads']} thread"
         f"{'s' if env['threads'] != 1 else ''}), torch {env['torch']}, "
         f"RMI backend `{env['backend']}`. Wall time {env['wall_total_s'] / 60:.1f} min "
         f"(training {env['wall_train_s'] / 60:.1f} min)"
         + (f"; 1-minute load average {env['load_start']:.1f} at the start, "
            f"{env['load_end']:.1f} at the end: the cores were shared with other jobs, so "
            f"times are noisy" if env.get("load_start") is not None else "") + ".\n",
         f"Data: `{args.data}` ({data['num_classes']} classes), {args.size}x{args.size}, "
         f"{args.n_train} train / {args.n_val} validation / {args.n_test} test images (fixed "
         f"seeds). Model: SmallSegNet width {args.width}. Seeds {', '.join(map(str, runs))} "
         f"(initialisation, batch order). RMI: R {args.radius}, DF {args.stride}, "
         f"{args.pool} pooling, total = {args.weight_lambda} * {base_name} + "
         f"{1 - args.weight_lambda:g} * RMI, {args.mode} mode. Scratch: {args.epochs} epochs, "
         f"one-cycle lr {args.lr}. Finetune: pretraining with {base_name} at lr "
         f"{args.pretrain_lr} until the validation mIoU has not improved for {args.patience} "
         f"epochs (at most {args.pretrain_max_epochs}), best weights kept, then {args.ft_epochs} "
         f"epochs, cosine lr {args.ft_lr}, from the same weights and batches.\n",
         "## Result\n", decisions_text(args, summary) + "\n",
         "Mean ± standard deviation over seeds; difference = RMI arm - base arm of the same seed; "
         "the decision is the protocol's (95 % t-interval of the paired difference).\n",
         summary_table(args, summary) + "\n", "## Per seed\n", per_seed_table(args, runs) + "\n"]
    if meas:
        shape = "x".join(map(str, meas["shape"]))
        ref = meas.get("reference")
        timing = ", ".join(f"{regime} {labels[arm]} {median_step_ms(runs, regime, arm):.0f} ms"
                           for regime in summary for arm in ARMS)
        L.append(f"Training step, median (model + loss + optimizer): {timing}. The loss alone "
                 f"(forward + backward, logits {shape}): {labels['base']} "
                 f"{1e3 * meas['base']['seconds']:.1f} ms, {fmt_bytes(meas['base']['extra_bytes'])}"
                 f" peak extra; {labels['rmi']} {1e3 * meas['rmi']['seconds']:.1f} ms, "
                 f"{fmt_bytes(meas['rmi']['extra_bytes'])}"
                 + (f"; the unfold reference {1e3 * ref['seconds']:.1f} ms, "
                    f"{fmt_bytes(ref['extra_bytes'])}" if ref else "")
                 + f". Memory: {env['mem_method']}\n")
    L.append(f"![predictions]({paths['png'].name})\n")
    L.append(f"![curves]({paths['curves'].name})\n")
    return "\n".join(L)


def run_json(run, epochs=None) -> dict:
    h = run["hist"]
    epochs = epochs or len(h["val_miou"])
    return {"metrics": run["metrics"], "val_miou_per_epoch": h["val_miou"],
            "base_term_per_epoch": epoch_means(h["base"], epochs),
            "base_term_first_step": h["base"][0], "wall_s": h["wall_s"],
            "best_epoch": h.get("best_epoch")}


def json_summary(args, runs, meas, env, summary) -> dict:
    per_seed = {str(seed): {regime: (run_json(r) if regime == "pretrain"
                                     else {arm: run_json(r[arm]) for arm in ARMS})
                            for regime, r in by_regime.items()}
                for seed, by_regime in runs.items()}
    return {"config": {k: (os.path.relpath(v, ROOT) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
            "env": env, "labels": RUN_LABEL[args.mode], "summary": summary,
            "per_seed": per_seed, "loss_measurements": meas}


def write_outputs(args, data, runs, meas, env, paths) -> dict:
    """Write the four files of ``paths``; returns ``{"summary", "table"}``."""
    save_predictions_figure(args, data, runs, paths["png"])
    save_curves_figure(args, runs, paths["curves"])
    summary = summarize(runs)
    paths["md"].write_text(markdown_report(args, data, runs, meas, env, summary, paths))
    paths["json"].write_text(json.dumps(json_summary(args, runs, meas, env, summary), indent=1,
                                        default=str))
    return {"summary": summary, "table": summary_table(args, summary)}
