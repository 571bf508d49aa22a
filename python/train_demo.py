#!/usr/bin/env python
"""Train a small segmentation network with and without RMI over several seeds, in two regimes.

    pip install --no-build-isolation .      # from the repository root
    python python/train_demo.py             # the protocol of docs/demo_protocol.md, < 10 min on
                                            # a 2-core CPU; a GPU if present
    python python/train_demo.py --quick     # a smoke test (about a minute)
    python python/train_demo.py --data shapes    # the harder shape-kind task (21 classes)
    python python/train_demo.py --regime finetune --seeds 0 1 2 3 4
    python python/train_demo.py --full-res  # RMI at DF 1 (no downsampling)

Default data (``synthetic_thin.py``): 48x48 images, background + 4 classes told apart by a weak
colour tint and texture, with noise, blur, occluders and many 1-2 px structures; procedural,
fixed seeds, nothing downloaded. Per seed: the *scratch* regime trains a fresh SmallSegNet with
the base loss alone and with base + RMI; the *finetune* regime pretrains with the base loss until
the validation mIoU stops improving, then fine-tunes those weights with each loss. The arms of a
regime share the initial weights and the batches. The base term is BCE (sigmoid mode, the
paper's RMI experiments; CE with ``--mode softmax``), RMI is ``rmi_ext.RMILoss`` (lambda 0.5,
R 3, DF 2). Test-split metrics: mIoU, boundary F-score (1 px), thin-structure mIoU, foreground
IoU and identity accuracy, mean and std over seeds, and the decision of the protocol's rule
(95 % t-interval of the paired difference). Writes ``<out-dir>/<tag>.png`` (test images,
ground truth, predictions, zooms), ``<tag>_curves.png``, ``<tag>_results.md`` and
``<tag>_results.json``; exits non-zero if a file is missing or a number is not finite.

The parts: ``demo_data.py`` (splits), ``synthetic_thin.py`` / ``synthetic_shapes.py`` (data
sets), ``demo_model.py`` (network), ``demo_losses.py`` (losses), ``demo_train.py`` (training,
regimes), ``demo_metrics.py`` (metrics), ``demo_measure.py`` (the loss's time and peak memory)
and ``demo_report.py`` (decision rule, figures, md/json).
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

from demo_data import load_data  # noqa: E402
from demo_losses import RUN_LABEL, criterion_options  # noqa: E402
from demo_measure import measure_losses, memory_method  # noqa: E402
from demo_report import output_paths, write_outputs  # noqa: E402
from demo_train import ARMS, REGIMES, run_seed, steps_planned  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="thin", choices=("thin", "shapes"),
                   help="thin: weak local evidence, thin structures (default); shapes: the "
                        "21-class shape-kind task")
    p.add_argument("--regime", default="both", choices=("both", "scratch", "finetune"),
                   help="(both)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds: initialisation and batch order (default 0 1 2; "
                        "--quick 0 1)")
    p.add_argument("--size", type=int, default=48,
                   help="image side in pixels, a multiple of 4 (48)")
    p.add_argument("--n-train", type=int, default=None, help="(384; --quick 64)")
    p.add_argument("--n-val", type=int, default=None,
                   help="validation images: early stopping, curves (96; --quick 32)")
    p.add_argument("--n-test", type=int, default=None,
                   help="test images: every reported number (128; --quick 32)")
    p.add_argument("--batch-size", type=int, default=16, help="(16)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(adamw)")
    p.add_argument("--epochs", type=int, default=None,
                   help="scratch regime: epochs (8; --quick 2)")
    p.add_argument("--lr", type=float, default=4e-3,
                   help="scratch regime: one-cycle peak lr (4e-3)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3,
                   help="finetune regime: constant lr of the pretraining (2e-3)")
    p.add_argument("--pretrain-max-epochs", type=int, default=None,
                   help="finetune regime: pretraining epochs at most (12; --quick 2)")
    p.add_argument("--patience", type=int, default=2,
                   help="pretraining stops after this many epochs without a better val mIoU (2)")
    p.add_argument("--ft-epochs", type=int, default=None,
                   help="finetune regime: fine-tuning epochs (4; --quick 1)")
    p.add_argument("--ft-lr", type=float, default=1e-3,
                   help="finetune regime: peak lr of the cosine schedule (1e-3)")
    p.add_argument("--width", type=int, default=16, help="channels of the first model stage (16)")
    p.add_argument("--df", "--stride", type=int, default=2, dest="stride",
                   help="RMI downsampling factor DF (2)")
    p.add_argument("--radius", "-R", type=int, default=3, help="RMI region side R (3)")
    p.add_argument("--pool", default="avg", choices=("avg", "max", "interp"), help="(avg)")
    p.add_argument("--weight-lambda", type=float, default=0.5,
                   help="lambda: total = lambda * base + (1 - lambda) * RMI (0.5)")
    p.add_argument("--mode", default="sigmoid", choices=("sigmoid", "softmax"),
                   help="sigmoid: BCE vs BCE+RMI, the paper's RMI (default); softmax: CE vs CE+RMI")
    p.add_argument("--backend", default="auto",
                   help="RMI backend: auto (default), torch, cpu, cuda, triton, reference")
    p.add_argument("--full-res", action="store_true", help="RMI at full resolution (DF 1)")
    p.add_argument("--quick", action="store_true", help="tiny run (about a minute), a smoke test")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available; default), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on a CPU of at most 2 cores, where a "
                        "second thread competing with other jobs made steps 10x slower; else "
                        "torch's)")
    p.add_argument("--num-examples", type=int, default=3, help="test images in the figure (3)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="(docs/ of the repository)")
    p.add_argument("--tag", default=None,
                   help="output file prefix (default demo, demo_shapes, demo_quick, ...)")
    p.add_argument("--no-reference-memory", action="store_true",
                   help="skip measuring the unfold reference (memory and time)")
    args = p.parse_args(argv)
    if args.full_res:
        args.stride = 1
    q = args.quick
    for name, full, quick in (("seeds", [0, 1, 2], [0, 1]), ("n_train", 384, 64),
                              ("n_val", 96, 32), ("n_test", 128, 32), ("epochs", 8, 2),
                              ("pretrain_max_epochs", 12, 2), ("ft_epochs", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.tag is None:
        args.tag = ("demo" + ("_shapes" if args.data == "shapes" else "")
                    + ("_softmax" if args.mode == "softmax" else "") + ("_quick" if q else "")
                    + ("_fullres" if args.full_res else ""))
    if args.size % 4 or args.size < 16:
        p.error("--size must be a multiple of 4 and at least 16")
    if args.n_train < args.batch_size:
        p.error("--n-train must be at least --batch-size")
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        p.error("--seeds needs at least 2 distinct seeds (a spread)")
    if min(args.epochs, args.pretrain_max_epochs, args.ft_epochs, args.patience) < 1:
        p.error("epochs and --patience must be at least 1")
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


def self_check(paths, runs):
    """Problems that make the run fail: a missing or empty file, a non-finite loss or metric."""
    problems = [f"missing {p}" for p in paths.values() if not p.exists() or p.stat().st_size == 0]
    for seed, by_regime in runs.items():
        for regime in REGIMES:
            for arm, run in by_regime.get(regime, {}).items():
                numbers = [run["metrics"][k] for k in ("miou", "boundary_f", "thin_miou")]
                if not all(math.isfinite(v) for v in run["hist"]["loss"] + numbers):
                    problems.append(f"seed {seed} {regime} {arm}: non-finite loss or metric")
    return problems


def main(argv=None):
    args = parse_args(argv)
    device, backend, device_name = pick_device(args)
    if args.threads is None and device.type == "cpu" and (os.cpu_count() or 1) <= 2:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"rmi_ext {rmi_ext.__version__}, torch {torch.__version__}, device {device_name}, "
          f"{torch.get_num_threads()} threads, RMI backend '{backend}'"
          + (" (the C++ 'cpu' backend is not built: the torch backend is slower)"
             if backend == "torch" and device.type == "cpu" else ""))
    labels = RUN_LABEL[args.mode]
    print(f"{labels['base']} vs {labels['rmi']} (R {args.radius}, DF {args.stride}, lambda "
          f"{args.weight_lambda}), data '{args.data}' {args.size}x{args.size}, "
          f"{args.n_train}/{args.n_val}/{args.n_test} train/val/test images, regime "
          f"{args.regime}, seeds {' '.join(map(str, args.seeds))}")

    t_all = time.perf_counter()
    load_start = load_average()
    t0 = time.perf_counter()
    data = load_data(args.data, args.size, args.n_train, args.n_val, args.n_test)
    print(f"data set built in {time.perf_counter() - t0:.1f} s")

    from tqdm import tqdm
    bar = tqdm(total=len(args.seeds) * steps_planned(args, args.n_train), unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
    runs = {}
    for seed in args.seeds:
        runs[seed] = run_seed(seed, data, args, device, bar)
        by_arm = {regime: runs[seed][regime] for regime in REGIMES if regime in runs[seed]}
        mious = {regime: " / ".join(f"{labels[arm]} {r[arm]['metrics']['miou']:.3f}"
                                    for arm in ARMS)
                 for regime, r in by_arm.items()}
        summary = "; ".join(f"{regime} {text}" for regime, text in mious.items())
        bar.write(f"seed {seed}: test mIoU {summary}")
    bar.close()
    wall_train = time.perf_counter() - t_all

    # The loss alone, at the training batch's logits shape.
    criteria = {run: (run, criterion_options(args, backend=backend)) for run in ARMS}
    if not args.no_reference_memory and backend != "reference":
        criteria["reference"] = ("rmi", criterion_options(args, backend="reference"))
    shape = (args.batch_size, data["num_classes"], args.size, args.size)
    meas = measure_losses(criteria, shape, device)
    wall_total = time.perf_counter() - t_all

    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(args.out_dir, args.tag)
    cmd = "python python/train_demo.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    env = {"command": cmd, "device_name": device_name, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "backend": backend, "mem_method": memory_method(device),
           "load_start": load_start, "load_end": load_average(), "wall_train_s": wall_train,
           "wall_total_s": wall_total}
    report = write_outputs(args, data, runs, meas, env, paths)
    print("\n" + report["table"])
    print(f"\nTotal wall time {wall_total / 60:.1f} min. Wrote "
          + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                      for p in paths.values()))

    problems = self_check(paths, runs)
    if problems:
        print("SELF-CHECK FAILED: " + "; ".join(problems))
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
