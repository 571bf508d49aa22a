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

This file is the command line; the parts, each readable on its own: ``synthetic_shapes.py``
(data), ``demo_model.py`` (the network), ``demo_losses.py`` (the two losses),
``demo_train.py`` (training loop, IoU metrics), ``demo_measure.py`` (the loss's time and peak
memory, with the benchmark suite's probe) and ``demo_report.py`` (figures, tables, md/json).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import rmi_ext
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import rmi_ext

import synthetic_shapes as shapes  # noqa: E402
from demo_losses import RUN_LABEL, criterion_options  # noqa: E402
from demo_measure import measure_losses, memory_method  # noqa: E402
from demo_report import output_paths, print_tables, write_outputs  # noqa: E402
from demo_train import train_run  # noqa: E402


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


def pick_device(args):
    """``(torch.device, RMI backend that auto picks there or the one named, readable name)``."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    backend = rmi_ext.backend_info(device)["auto"] if args.backend == "auto" else args.backend
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({os.cpu_count()} cores, {platform.machine()})")
    return device, backend, device_name


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def self_check(paths, results, labels):
    """Problems that make the run fail: a missing or empty file, a non-finite loss or mIoU."""
    problems = [f"missing {p}" for p in paths.values() if not p.exists() or p.stat().st_size == 0]
    for run, res in results.items():
        if not math.isfinite(res["miou"]) or not all(math.isfinite(v) for v in res["hist"]["loss"]):
            problems.append(f"{labels[run]}: non-finite loss or mIoU")
    return problems


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, backend, device_name = pick_device(args)
    print(f"rmi_ext {rmi_ext.__version__}, torch {torch.__version__}, device {device_name}, "
          f"{torch.get_num_threads()} threads, RMI backend '{backend}'"
          + (" (the C++ 'cpu' backend is not built: the torch backend is slower)"
             if backend == "torch" and device.type == "cpu" else ""))
    labels = RUN_LABEL[args.mode]
    print(f"{labels['base']} vs {labels['rmi']}: R {args.radius}, DF {args.stride}, "
          f"{args.epochs} epochs, {args.n_train}+{args.n_val} images {args.size}x{args.size}")

    t_all = time.perf_counter()
    load_start = load_average()
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
    criteria = {run: (run, criterion_options(args, backend=backend)) for run in ("base", "rmi")}
    if not args.no_reference_memory and backend != "reference":
        criteria["reference"] = ("rmi", criterion_options(args, backend="reference"))
    shape = (args.batch_size, shapes.NUM_CLASSES, args.size, args.size)
    meas = measure_losses(criteria, shape, device)
    wall_total = time.perf_counter() - t_all

    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(args.out_dir, args.tag)
    cmd = "python python/train_demo.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    env = {"command": cmd, "device_name": device_name, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "backend": backend, "mem_method": memory_method(device),
           "load_start": load_start, "load_end": load_average()}
    cmp = write_outputs(args, data, results, meas, env, wall_total, paths)
    print_tables(args, results, meas, env, cmp)
    print(f"\nTotal wall time {wall_total / 60:.1f} min. Wrote "
          + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                      for p in paths.values()))

    problems = self_check(paths, results, labels)
    if problems:
        print("SELF-CHECK FAILED: " + "; ".join(problems))
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
