"""The training demo's training loop and its two regimes.

``run_seed`` runs every arm of one seed: the *scratch* regime (a fresh SmallSegNet trained with
the base loss alone and with base + RMI) and the *finetune* regime (pretraining with the base
loss until the validation mIoU stops improving, then fine-tuning the same weights with the base
loss alone and with base + RMI). The arms of a regime share the initial weights, the batch order
and the flips; only the loss differs. ``data`` is ``demo_data.load_data``'s dict: splits
``train``, ``val``, ``test`` as ``(images float32 [N, 3, S, S], labels uint8 [N, S, S], thin
bool [N, S, S])`` and ``num_classes``.
"""
from __future__ import annotations

import copy
import math
import time

import torch

from demo_losses import RUN_LABEL, BaseLoss, criterion_options, make_criterion
from demo_metrics import confusion, evaluate, iou_from_confusion  # noqa: F401 (re-exported)
from demo_model import SmallSegNet

ARMS = ("base", "rmi")
REGIMES = ("scratch", "finetune")


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


def make_optimizer(model, kind, lr, total_steps, schedule):
    """``(optimizer, per-step schedule)``: AdamW, or SGD with Nesterov momentum 0.9 as the RMI
    authors, weight decay 1e-4 either way; ``schedule`` "onecycle" (peak ``lr``, 10 % warm-up),
    "cosine" (10 % linear warm-up to ``lr``, cosine decay to 0) or "constant"."""
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=0.1)
    elif schedule == "cosine":
        warm = max(1, total_steps // 10)

        def factor(s):
            return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                                 / total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
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


def fit(model, crit, data, args, device, *, epochs, lr, schedule, order_seed, bar, label,
        patience=None):
    """Train ``model`` in place with ``crit`` for ``epochs`` epochs, validating after each.

    With ``patience`` P: stop once the validation mIoU has not improved for P epochs and load
    the best epoch's weights. Returns the history: per step ``loss``, ``base``, ``rmi`` (None
    for the base loss) and ``step_s``; per epoch ``val_miou``; ``best_epoch`` (1-based) and
    ``wall_s``. ``bar`` is a tqdm bar advanced by one per step."""
    train_x, train_y, _ = data["train"]
    val_x, val_y, _ = data["val"]
    steps = len(train_x) // args.batch_size
    opt, sched = make_optimizer(model, args.optimizer, lr, steps * epochs, schedule)
    gen = torch.Generator().manual_seed(order_seed)
    hist = {"loss": [], "base": [], "rmi": [], "step_s": [], "val_miou": []}
    best, best_state, t_run = -1.0, None, time.perf_counter()
    for epoch in range(epochs):
        for x, y in epoch_batches(train_x, train_y, args.batch_size, gen):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            sync(device)
            t0 = time.perf_counter()
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sync(device)
            hist["step_s"].append(time.perf_counter() - t0)
            terms = [None if t is None else float(t) for t in crit.last_terms]
            for key, value in zip(("loss", "base", "rmi"), terms):
                hist[key].append(value)
            bar.set_postfix_str(f"{label} ep {epoch + 1}/{epochs} loss {terms[0]:.3f}",
                                refresh=False)
            bar.update()
        miou = iou_from_confusion(confusion(predict(model, val_x, device), val_y,
                                            data["num_classes"]))[1]
        hist["val_miou"].append(miou)
        if miou > best:
            best, hist["best_epoch"] = miou, epoch + 1
            best_state = copy.deepcopy(model.state_dict()) if patience is not None else None
        elif patience is not None and epoch + 1 - hist["best_epoch"] >= patience:
            bar.total -= steps * (epochs - epoch - 1)  # the epochs not run
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    hist["wall_s"] = time.perf_counter() - t_run
    return hist


def new_model(data, args, device, state):
    model = SmallSegNet(num_classes=data["num_classes"], width=args.width).to(device)
    model.load_state_dict(state)
    return model


def test_metrics(model, data, device):
    """``(evaluate's dict on the test split, test predictions uint8 [N, S, S])``."""
    test_x, test_y, test_thin = data["test"]
    pred = predict(model, test_x, device)
    return evaluate(pred, test_y, test_thin, data["num_classes"]), pred


def run_arms(state, data, args, device, bar, *, regime, seed, **schedule):
    """Both arms of a regime from the weights ``state``, with the same batches."""
    out = {}
    for arm in ARMS:
        model = new_model(data, args, device, state)
        crit = make_criterion(arm, **criterion_options(args))
        label = f"seed {seed} {regime} {RUN_LABEL[args.mode][arm]}"
        hist = fit(model, crit, data, args, device, bar=bar, label=label, **schedule)
        metrics, pred = test_metrics(model, data, device)
        out[arm] = {"hist": hist, "metrics": metrics, "pred": pred[:args.num_examples]}
    return out


def steps_planned(args, n_train) -> int:
    """Training steps of one seed (pretraining at its maximum), for the progress bar."""
    per_epoch = n_train // args.batch_size
    epochs = 0
    if args.regime in ("both", "scratch"):
        epochs += 2 * args.epochs
    if args.regime in ("both", "finetune"):
        epochs += args.pretrain_max_epochs + 2 * args.ft_epochs
    return per_epoch * epochs


def run_seed(seed, data, args, device, bar) -> dict:
    """``{"scratch": {arm: run}, "finetune": {arm: run}, "pretrain": {...}}`` for one seed (the
    regimes of ``args.regime``); a run is ``{"hist", "metrics", "pred"}`` (``pred``: the first
    ``args.num_examples`` test predictions)."""
    torch.manual_seed(seed)  # the seed's initial weights, shared by every arm
    init = SmallSegNet(num_classes=data["num_classes"], width=args.width).state_dict()
    out = {}
    if args.regime in ("both", "scratch"):
        out["scratch"] = run_arms(init, data, args, device, bar, regime="scratch", seed=seed,
                                  epochs=args.epochs, lr=args.lr, schedule="onecycle",
                                  order_seed=1000 * seed + 1)
    if args.regime in ("both", "finetune"):
        model = new_model(data, args, device, init)
        hist = fit(model, BaseLoss(args.mode), data, args, device, epochs=args.pretrain_max_epochs,
                   lr=args.pretrain_lr, schedule="constant", order_seed=1000 * seed + 2, bar=bar,
                   label=f"seed {seed} pretrain", patience=args.patience)
        metrics, _ = test_metrics(model, data, device)
        out["pretrain"] = {"hist": hist, "metrics": metrics}
        out["finetune"] = run_arms(copy.deepcopy(model.state_dict()), data, args, device, bar,
                                   regime="finetune", seed=seed, epochs=args.ft_epochs,
                                   lr=args.ft_lr, schedule="cosine", order_seed=1000 * seed + 3)
    return out
