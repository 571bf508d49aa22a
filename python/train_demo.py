#!/usr/bin/env python
"""Train a small segmentation network twice, without and with RMI, and compare.

    pip install --no-build-isolation .      # from the repository root
    python python/train_demo.py             # BCE vs BCE+RMI; CPU under 10 minutes, GPU if present
    python python/train_demo.py --mode softmax   # CE vs CE+RMI
    python python/train_demo.py --full-res  # the RMI run at DF 1 (no downsampling)
    python python/train_demo.py --rmi-start-epoch 5  # RMI switched on after 5 epochs of BCE
    python python/train_demo.py --quick     # about a minute: a smoke test

The data set is procedural (``synthetic_shapes.py``, 21 classes: background + 5 shape kinds x
4 colours, with thin rings and lines, occlusion and noise), built from a fixed seed: nothing is
downloaded. Both runs share the seed, the model initialisation and the data order; only the
loss differs: the base term alone (BCE in the default sigmoid mode, as in the paper's RMI
experiments; CE with ``--mode softmax``) against base + RMI (``rmi_ext.RMILoss``, lambda 0.5).
The script prints mIoU and per-class IoU on a held-out split, time per step and the loss's peak
memory, and writes ``<out-dir>/<tag>.png`` (inputs, ground truth, both models' predictions),
``<tag>_curves.png``, ``<tag>_results.md`` and ``<tag>_results.json``. It exits non-zero if any
of those is missing or a number is not finite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import rmi_ext
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import rmi_ext

import synthetic_shapes as shapes  # noqa: E402

IGNORE = shapes.IGNORE_INDEX
NUM_CLASSES = shapes.NUM_CLASSES


# --------------------------------------------------------------------------------------------
# Model: a small U-Net-like fully convolutional network (3 scales, dilated bottleneck).
# --------------------------------------------------------------------------------------------
def conv_bn_relu(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallSegNet(nn.Module):
    """Encoder at 1, 1/2 and 1/4 resolution (dilations 2 and 4 at 1/4 for context), a decoder
    with skip connections back to full resolution, and a 1x1 classifier. ~0.2 GFLOP per 64x64
    image at ``width=16``."""

    def __init__(self, num_classes=NUM_CLASSES, width=16):
        super().__init__()
        c = width
        self.enc1 = nn.Sequential(conv_bn_relu(3, c), conv_bn_relu(c, c))
        self.enc2 = nn.Sequential(conv_bn_relu(c, 2 * c, stride=2), conv_bn_relu(2 * c, 2 * c))
        self.enc3 = nn.Sequential(conv_bn_relu(2 * c, 4 * c, stride=2),
                                  conv_bn_relu(4 * c, 4 * c, dilation=2),
                                  conv_bn_relu(4 * c, 4 * c, dilation=4))
        self.dec2 = conv_bn_relu(6 * c, 2 * c)
        self.dec1 = conv_bn_relu(3 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        z = self.enc3(b)
        z = F.interpolate(z, size=b.shape[-2:], mode="bilinear", align_corners=False)
        z = self.dec2(torch.cat([z, b], 1))
        z = F.interpolate(z, size=a.shape[-2:], mode="bilinear", align_corners=False)
        z = self.dec1(torch.cat([z, a], 1))
        return self.head(z)


# --------------------------------------------------------------------------------------------
# Losses. The baseline is the base term of the RMI loss alone.
# --------------------------------------------------------------------------------------------
def bce_loss(logits, labels):
    """The BCE term of the RMI loss in sigmoid mode (spec section 1.3): per-class BCE with
    logits, summed over classes, divided by (number of valid pixels + 1)."""
    valid = (labels >= 0) & (labels < logits.shape[1]) & (labels != IGNORE)
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None]
    per = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * valid[:, None]
    return per.sum() / (valid.sum() + 1)


class BaseLoss(nn.Module):
    """CE (softmax mode) or BCE (sigmoid mode) alone, with the same ``last_terms`` as RMILoss."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.last_terms = None

    def forward(self, logits, labels):
        if self.mode == "softmax":
            loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)
        else:
            loss = bce_loss(logits, labels)
        self.last_terms = (loss.detach(), loss.detach(), None)
        return loss


def make_criterion(run, args):
    if run == "base":
        return BaseLoss(args.mode)
    return rmi_ext.RMILoss(radius=args.radius, stride=args.stride, pool=args.pool,
                           weight_lambda=args.weight_lambda, lambda_way=1, ignore_index=IGNORE,
                           mode=args.mode, backend=args.backend)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def confusion(pred, target, num_classes=NUM_CLASSES):
    valid = target != IGNORE
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(conf):
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou, float(torch.nanmean(iou)), float(tp.sum() / conf.sum().clamp(min=1))


@torch.no_grad()
def predict(model, images, device, batch=64):
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        out.append(model(images[i:i + batch].to(device)).argmax(1).to("cpu", torch.uint8))
    model.train()
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Peak memory and time of the loss alone (forward + backward to the logits)
# --------------------------------------------------------------------------------------------
def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _loss_inputs(shape, device):
    """Seeded random ``logits`` (requires grad) and ``labels`` for the loss measurements."""
    torch.manual_seed(0)
    n, c, h, w = shape
    logits = torch.randn(n, c, h, w, device=device, requires_grad=True)
    return logits, torch.randint(0, c, (n, h, w), device=device)


def _measure_loss_child(spec):
    """Runs in a fresh process (CPU): extra resident memory of one loss forward+backward."""
    logits, labels = _loss_inputs(spec.pop("shape"), "cpu")
    crit = make_criterion(spec.pop("run"), argparse.Namespace(**spec))
    small_l = logits.detach()[:1, :, :32, :32].clone().requires_grad_()
    small_y = labels[:1, :32, :32]
    crit(small_l, small_y).backward()  # warm-up: lazy initialisation, library loading
    rss0 = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM to the current RSS
    crit(logits, labels).backward()
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - rss0) * 1024}))


def measure_loss(run, args, shape, device, backend):
    """``{"extra_bytes"}``: peak extra memory of one loss forward+backward on logits of ``shape``.

    CPU: the rise of the process's resident-memory high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over the RSS before, in a fresh process whose large allocations are
    returned to the OS at once (MALLOC_MMAP_THRESHOLD_). GPU: torch.cuda.max_memory_allocated
    around the loss alone. Either way the logits' gradient (1x the logits) is included.
    """
    if device.type == "cuda":
        logits, labels = _loss_inputs(shape, device)
        crit = make_criterion(run, argparse.Namespace(**{**vars(args), "backend": backend}))
        crit(logits, labels).backward()  # warm-up
        logits.grad = None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        crit(logits, labels).backward()
        torch.cuda.synchronize(device)
        return {"extra_bytes": torch.cuda.max_memory_allocated(device) - base}
    if not os.path.exists("/proc/self/clear_refs"):
        return {"extra_bytes": float("nan")}
    spec = dict(run=run, shape=list(shape), radius=args.radius, stride=args.stride,
                pool=args.pool, weight_lambda=args.weight_lambda, mode=args.mode,
                backend=backend)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--_measure-loss", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  (memory measurement failed: {proc.stderr.strip().splitlines()[-1:]})")
        return {"extra_bytes": float("nan")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_loss(crit, shape, device, reps=5):
    """Median seconds of one loss forward+backward (in-process, after a warm-up)."""
    logits, labels = _loss_inputs(shape, device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        logits.grad = None
        crit(logits, labels).backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train_run(run, args, data, device):
    from tqdm import tqdm

    train_x, train_y, val_x, val_y = data
    torch.manual_seed(args.seed)  # same initialisation for both runs
    model = SmallSegNet(width=args.width).to(device)
    crit = make_criterion(run, args)
    # --rmi-start-epoch K: the RMI run trains with the base loss alone for its first K epochs.
    warmup_crit = BaseLoss(args.mode) if run == "rmi" and args.rmi_start_epoch > 0 else None
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.optimizer == "sgd":  # as the RMI authors (momentum 0.9, weight decay 1e-4)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.1)
    order_gen = torch.Generator().manual_seed(args.seed + 1)  # same data order for both runs
    hist = {"loss": [], "base": [], "rmi": [], "step_s": [], "val_miou": [], "epoch_s": []}
    label = RUN_LABEL[args.mode][run]
    bar = tqdm(total=total, desc=f"{label:>9}", unit="step", dynamic_ncols=True,
               mininterval=0.5, file=sys.stdout)
    t_run = time.perf_counter()
    for epoch in range(args.epochs):
        t_epoch = time.perf_counter()
        perm = torch.randperm(len(train_x), generator=order_gen)
        flips = torch.rand(len(train_x), generator=order_gen) < 0.5
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = train_x[idx], train_y[idx]
            f = flips[idx]
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            y = torch.where(f[:, None, None], y.flip(-1), y)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            sync(device)
            t0 = time.perf_counter()
            logits = model(x)
            warm = warmup_crit is not None and epoch < args.rmi_start_epoch
            active = warmup_crit if warm else crit
            loss = active(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sync(device)
            hist["step_s"].append(time.perf_counter() - t0)
            terms = active.last_terms
            hist["loss"].append(float(terms[0]))
            hist["base"].append(float(terms[1]))
            hist["rmi"].append(float(terms[2]) if terms[2] is not None else None)
            post = {"ep": f"{epoch + 1}/{args.epochs}", "loss": f"{hist['loss'][-1]:.3f}",
                    "base": f"{hist['base'][-1]:.3f}"}
            if terms[2] is not None:
                post["rmi"] = f"{hist['rmi'][-1]:.3f}"
            if hist["val_miou"]:
                post["val_mIoU"] = f"{hist['val_miou'][-1]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update()
        pred = predict(model, val_x, device)
        _, miou, _ = iou_from_confusion(confusion(pred, val_y))
        hist["val_miou"].append(miou)
        hist["epoch_s"].append(time.perf_counter() - t_epoch)
        bar.set_postfix({**post, "val_mIoU": f"{miou:.3f}"})
    bar.close()
    hist["wall_s"] = time.perf_counter() - t_run
    iou, miou, acc = iou_from_confusion(confusion(pred, val_y))
    return {"model": model, "crit": crit, "hist": hist, "pred": pred, "iou": iou.tolist(),
            "miou": miou, "pixel_acc": acc}


PLURAL = {"disc": "discs", "box": "boxes", "triangle": "triangles", "ring": "rings",
          "line": "lines"}
RUN_LABEL = {"softmax": {"base": "CE", "rmi": "CE+RMI"},
             "sigmoid": {"base": "BCE", "rmi": "BCE+RMI"}}


# --------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------
def save_figures(args, data, results, out_png, curves_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8))
    spe = len(b["hist"]["loss"]) // args.epochs
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
    h = results["rmi"]["hist"]
    curve(ax2, h["rmi"], color="C3", label="RMI term")
    ax1.set_title(f"{base_name} term during training (both runs)")
    ax2.set_title(f"RMI term of the {labels['rmi']} run")
    ax2.text(0.02, 0.03, "a lower-bound surrogate: negative values are expected",
             transform=ax2.transAxes, fontsize=8, color="0.35")
    ax3.set_title("held-out mIoU after each epoch")
    ax1.set_ylabel("loss (running mean)")
    ax3.set_ylabel("val mIoU")
    ax3.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)


def epoch_means(values, epochs):
    """Mean of a per-step history over each epoch."""
    per = len(values) // epochs
    return [sum(values[e * per:(e + 1) * per]) / per for e in range(epochs)]


def fmt_bytes(n):
    return "n/a" if not math.isfinite(n) else f"{n / 2 ** 20:.1f} MiB"


def verdict(args, delta_pts, per_kind_delta):
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


def write_report(args, results, meas, env, paths, wall_total):
    labels = RUN_LABEL[args.mode]
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
    L.append(f"**Result.** {text}\n")
    L.append(f"| | {labels['base']} | {labels['rmi']} | change |")
    L.append("|---|---:|---:|---:|")
    L.append(f"| val mIoU | {b['miou']:.3f} | {r['miou']:.3f} | {delta:+.1f} pts |")
    L.append(f"| val pixel accuracy | {b['pixel_acc']:.3f} | {r['pixel_acc']:.3f} | "
             f"{100 * (r['pixel_acc'] - b['pixel_acc']):+.1f} pts |")
    for kind, mb, mr in kinds:
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
        " The BCE baseline is the plain PyTorch expression in this script (one-hot target "
        "materialised); `RMILoss` computes its BCE term inside the fused kernels."
        if args.mode == "sigmoid" else "") + "\n")
    L.append(f"Per-class IoU on the held-out split:\n")
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
    paths["md"].write_text("\n".join(L))

    summary = {
        "config": {k: (os.path.relpath(v, ROOT) if isinstance(v, Path) else v)
                   for k, v in vars(args).items() if not k.startswith("_")},
        "env": env, "wall_total_s": wall_total, "verdict": text,
        "runs": {run: {"label": labels[run], "miou": res["miou"], "pixel_acc": res["pixel_acc"],
                       "iou": res["iou"], "val_miou_per_epoch": res["hist"]["val_miou"],
                       "base_term_per_epoch": epoch_means(res["hist"]["base"], args.epochs),
                       "step_s_median": med[run], "wall_s": res["hist"]["wall_s"]}
                 for run, res in results.items()},
        "loss_measurements": meas,
    }
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    return text, kinds, med, delta


def print_tables(args, results, kinds, med, meas, env, text):
    labels = RUN_LABEL[args.mode]
    b, r = results["base"], results["rmi"]
    print(f"\nPer-class IoU (held-out split, {args.n_val} images):")
    print(f"  {'class':<18} {labels['base']:>8} {labels['rmi']:>8} {'change':>8}")
    for c in range(NUM_CLASSES):
        print(f"  {c:>2} {shapes.CLASS_NAMES[c]:<15} {b['iou'][c]:8.3f} {r['iou'][c]:8.3f} "
              f"{100 * (r['iou'][c] - b['iou'][c]):+8.1f}")
    for kind, mb, mr in kinds:
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
    print(f"\n{text}")


# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default 10; --quick 2)")
    p.add_argument("--size", type=int, default=64,
                   help="image side in pixels, a multiple of 4 (64)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training images (default 1024; --quick 160)")
    p.add_argument("--n-val", type=int, default=None,
                   help="held-out images (default 256; --quick 64)")
    p.add_argument("--batch-size", type=int, default=16, help="(16)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(adamw)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the one-cycle schedule "
                        "(default sgd 0.05, adamw 4e-3)")
    p.add_argument("--width", type=int, default=16, help="channels of the first model stage (16)")
    p.add_argument("--stride", "--df", type=int, default=4, dest="stride",
                   help="RMI downsampling factor DF, the stride (4)")
    p.add_argument("--radius", "-R", type=int, default=3, help="RMI region side R (3)")
    p.add_argument("--pool", default="avg", choices=("avg", "max", "interp"), help="(avg)")
    p.add_argument("--weight-lambda", type=float, default=0.5,
                   help="lambda: total = lambda * base + (1 - lambda) * RMI (0.5)")
    p.add_argument("--mode", default="sigmoid", choices=("sigmoid", "softmax"),
                   help="sigmoid: BCE vs BCE+RMI, the paper's RMI (default); softmax: CE vs CE+RMI")
    p.add_argument("--backend", default="auto",
                   help="RMI backend: auto (default), torch, cpu, cuda, triton, reference")
    p.add_argument("--rmi-start-epoch", type=int, default=0,
                   help="the RMI run uses the base loss alone for its first K epochs, then base + "
                        "RMI (a warm start standing in for a pretrained model; 0)")
    p.add_argument("--full-res", action="store_true",
                   help="RMI at full resolution (DF 1), what the fused kernels make affordable")
    p.add_argument("--quick", action="store_true", help="tiny run (about a minute), a smoke test")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available; default), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and batch order (0)")
    p.add_argument("--num-examples", type=int, default=6, help="val images in the figure (6)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="(docs/ of the repository)")
    p.add_argument("--tag", default=None,
                   help="output file prefix (default demo, demo_fullres, demo_quick...)")
    p.add_argument("--no-reference-memory", action="store_true",
                   help="skip measuring the unfold reference (memory and time)")
    p.add_argument("--_measure-loss", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_res:
        args.stride = 1
    q = args.quick
    args.lr = args.lr or (0.05 if args.optimizer == "sgd" else 4e-3)
    args.epochs = args.epochs or (2 if q else 10)
    args.n_train = args.n_train or (160 if q else 1024)
    args.n_val = args.n_val or (64 if q else 256)
    if args.tag is None:
        args.tag = "demo" + ("_quick" if q else "") + ("_fullres" if args.full_res else "")
    if args.size % 4 or args.size < 16:
        p.error("--size must be a multiple of 4 and at least 16")
    if not 0 <= args.rmi_start_epoch < args.epochs:
        p.error("--rmi-start-epoch must be at least 0 and less than --epochs")
    if args.n_train < args.batch_size:
        p.error("--n-train must be at least --batch-size")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._measure_loss:
        _measure_loss_child(json.loads(args._measure_loss))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    backend = rmi_ext.backend_info(device)["auto"] if args.backend == "auto" else args.backend
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({os.cpu_count()} cores, {platform.machine()})")
    print(f"rmi_ext {rmi_ext.__version__}, torch {torch.__version__}, device {device_name}, "
          f"{torch.get_num_threads()} threads, RMI backend '{backend}'"
          + (" (the C++ 'cpu' backend is not built: the torch backend is slower)"
             if backend == "torch" and device.type == "cpu" else ""))
    labels = RUN_LABEL[args.mode]
    print(f"{labels['base']} vs {labels['rmi']}: R {args.radius}, DF {args.stride}, "
          f"{args.epochs} epochs, {args.n_train}+{args.n_val} images {args.size}x{args.size}")

    t_all = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    train_x, train_y = shapes.make_dataset(args.n_train, args.size, seed=args.seed)
    val_x, val_y = shapes.make_dataset(args.n_val, args.size, seed=args.seed + 10_000)
    data = (train_x, train_y, val_x, val_y)
    print(f"data set built in {time.perf_counter() - t0:.1f} s")

    results = {}
    for run in ("base", "rmi"):
        results[run] = train_run(run, args, data, device)
        print(f"  {labels[run]}: val mIoU {results[run]['miou']:.3f}, "
              f"{results[run]['hist']['wall_s']:.0f} s")

    # The loss alone, at the training batch's logits shape.
    shape = (args.batch_size, NUM_CLASSES, args.size, args.size)
    meas = {"shape": list(shape), "logits_bytes": 4 * math.prod(shape)}
    for run in ("base", "rmi"):
        meas[run] = {**measure_loss(run, args, shape, device, backend),
                     "seconds": time_loss(results[run]["crit"], shape, device)}
    if not args.no_reference_memory and backend != "reference":
        ref_args = argparse.Namespace(**{**vars(args), "backend": "reference"})
        meas["reference"] = {**measure_loss("rmi", args, shape, device, "reference"),
                             "seconds": time_loss(make_criterion("rmi", ref_args), shape, device)}
    mem_method = ("torch.cuda.max_memory_allocated during one loss forward+backward, minus the "
                  "memory allocated before." if device.type == "cuda" else
                  "rise of the resident-memory high-water mark (VmHWM, reset through "
                  "/proc/self/clear_refs) over the RSS before one loss forward+backward, "
                  "measured in a fresh process; it includes the logits' gradient.")
    wall_total = time.perf_counter() - t_all

    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": args.out_dir / f"{args.tag}.png",
             "curves": args.out_dir / f"{args.tag}_curves.png",
             "md": args.out_dir / f"{args.tag}_results.md",
             "json": args.out_dir / f"{args.tag}_results.json"}
    save_figures(args, data, results, paths["png"], paths["curves"])
    cmd = "python python/train_demo.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    env = {"command": cmd, "device_name": device_name, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "backend": backend, "mem_method": mem_method,
           "load_start": load_start,
           "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    text, kinds, med, _ = write_report(args, results, meas, env, paths, wall_total)
    print_tables(args, results, kinds, med, meas, env, text)
    print(f"\nTotal wall time {wall_total / 60:.1f} min. Wrote "
          + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                      for p in paths.values()))

    # Self-check: the files exist and the numbers are finite.
    problems = [f"missing {p}" for p in paths.values() if not p.exists() or p.stat().st_size == 0]
    for run, res in results.items():
        if not math.isfinite(res["miou"]) or not all(math.isfinite(v) for v in res["hist"]["loss"]):
            problems.append(f"{labels[run]}: non-finite loss or mIoU")
    if problems:
        print("SELF-CHECK FAILED: " + "; ".join(problems))
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
