"""The training demo's training loop and metrics.

``train_run`` trains one SmallSegNet with one loss ("base" or "rmi", see ``demo_losses``) and
validates it after every epoch. Both runs of the demo share the seed, hence the initial weights,
the batch order and the flips; only the loss differs. Images are float32 ``[N, 3, S, S]``,
labels uint8 ``[N, S, S]`` (255 = ignored), as ``synthetic_shapes.make_dataset`` builds them.
"""
from __future__ import annotations

import sys
import time

import torch

import synthetic_shapes as shapes
from demo_losses import RUN_LABEL, BaseLoss, criterion_options, make_criterion
from demo_model import SmallSegNet

IGNORE = shapes.IGNORE_INDEX
NUM_CLASSES = shapes.NUM_CLASSES


# ---- metrics ---------------------------------------------------------------------------------

def confusion(pred, target, num_classes=NUM_CLASSES):
    """Confusion matrix int64 ``[C, C]`` (row: true class, column: predicted) of integer label
    maps of any equal shape; pixels whose target is 255 are not counted."""
    valid = target != IGNORE
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(conf):
    """``(iou float64 [C], mIoU, pixel accuracy)``; a class absent from both target and
    prediction has IoU NaN and is left out of the mean."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou, float(torch.nanmean(iou)), float(tp.sum() / conf.sum().clamp(min=1))


@torch.no_grad()
def predict(model, images, device, batch=64):
    """Arg-max class maps uint8 ``[N, H, W]`` (on the CPU) of images float32 ``[N, 3, H, W]``."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        out.append(model(images[i:i + batch].to(device)).argmax(1).to("cpu", torch.uint8))
    model.train()
    return torch.cat(out)


def sync(device):
    """Wait for the GPU, so that a host clock times the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- training --------------------------------------------------------------------------------

def make_optimizer(model, args, total_steps):
    """``(optimizer, one-cycle schedule peaking at args.lr, 10 % warm-up)``: AdamW, or SGD with
    Nesterov momentum 0.9 as the RMI authors; weight decay 1e-4 either way."""
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps,
                                                pct_start=0.1)
    return opt, sched


def epoch_batches(images, labels, batch_size, generator):
    """One epoch of ``(images [B, 3, S, S], labels [B, S, S])`` batches: shuffled, each image
    flipped left-right with probability 1/2, the order and flips drawn from ``generator``; the
    last ``len(images) % batch_size`` images of the shuffled order are left out."""
    perm = torch.randperm(len(images), generator=generator)
    flips = torch.rand(len(images), generator=generator) < 0.5
    for step in range(len(images) // batch_size):
        idx = perm[step * batch_size:(step + 1) * batch_size]
        x, y, f = images[idx], labels[idx], flips[idx]
        yield (torch.where(f[:, None, None, None], x.flip(-1), x),
               torch.where(f[:, None, None], y.flip(-1), y))


def progress(hist, epoch, epochs):
    """The progress bar's postfix: epoch, the last step's loss terms, the last val mIoU."""
    post = {"ep": f"{epoch + 1}/{epochs}", "loss": f"{hist['loss'][-1]:.3f}",
            "base": f"{hist['base'][-1]:.3f}"}
    if hist["rmi"][-1] is not None:
        post["rmi"] = f"{hist['rmi'][-1]:.3f}"
    if hist["val_miou"]:
        post["val_mIoU"] = f"{hist['val_miou'][-1]:.3f}"
    return post


def train_run(run, args, data, device):
    """Train a fresh SmallSegNet with the loss of ``run`` ("base" or "rmi"), validating after
    every epoch; ``data = (train_x, train_y, val_x, val_y)``.

    Returns ``{"model", "hist", "pred", "iou", "miou", "pixel_acc"}``: ``pred`` uint8
    ``[N_val, S, S]`` and per-class ``iou`` (a list) from the last epoch; ``hist`` has per step
    ``loss``, ``base``, ``rmi`` (None while RMI is off) and ``step_s``, per epoch ``val_miou``
    and ``epoch_s``, and ``wall_s``.
    """
    from tqdm import tqdm

    train_x, train_y, val_x, val_y = data
    torch.manual_seed(args.seed)  # same initialisation for both runs
    model = SmallSegNet(width=args.width).to(device)
    crit = make_criterion(run, **criterion_options(args))
    # --rmi-start-epoch K: the RMI run trains with the base loss alone for its first K epochs.
    warmup_crit = BaseLoss(args.mode) if run == "rmi" and args.rmi_start_epoch > 0 else None
    total = len(train_x) // args.batch_size * args.epochs
    opt, sched = make_optimizer(model, args, total)
    order_gen = torch.Generator().manual_seed(args.seed + 1)  # same data order for both runs
    hist = {"loss": [], "base": [], "rmi": [], "step_s": [], "val_miou": [], "epoch_s": []}
    bar = tqdm(total=total, desc=f"{RUN_LABEL[args.mode][run]:>9}", unit="step",
               dynamic_ncols=True, mininterval=0.5, file=sys.stdout)
    t_run = time.perf_counter()
    for epoch in range(args.epochs):
        t_epoch = time.perf_counter()
        warm = warmup_crit is not None and epoch < args.rmi_start_epoch
        active = warmup_crit if warm else crit
        for x, y in epoch_batches(train_x, train_y, args.batch_size, order_gen):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            sync(device)
            t0 = time.perf_counter()
            loss = active(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sync(device)
            hist["step_s"].append(time.perf_counter() - t0)
            total_term, base_term, rmi_term = active.last_terms
            hist["loss"].append(float(total_term))
            hist["base"].append(float(base_term))
            hist["rmi"].append(float(rmi_term) if rmi_term is not None else None)
            bar.set_postfix(progress(hist, epoch, args.epochs), refresh=False)
            bar.update()
        pred = predict(model, val_x, device)
        hist["val_miou"].append(iou_from_confusion(confusion(pred, val_y))[1])
        hist["epoch_s"].append(time.perf_counter() - t_epoch)
        bar.set_postfix(progress(hist, epoch, args.epochs))
    bar.close()
    hist["wall_s"] = time.perf_counter() - t_run
    iou, miou, acc = iou_from_confusion(confusion(pred, val_y))
    return {"model": model, "hist": hist, "pred": pred, "iou": iou.tolist(), "miou": miou,
            "pixel_acc": acc}
