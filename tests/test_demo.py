"""The demo (python/train_demo.py and the demo_*.py modules it wires) and its data sets
(python/synthetic_thin.py, the default; python/synthetic_shapes.py, the harder setting).

Unit checks of the data sets (determinism), the batches, the losses, the metrics and the
decision rule against hand-computed cases, the memory probe, then short end-to-end runs of the
script in a subprocess (tiny data, --quick schedule, 2 seeds) that check the files it writes and
the numbers in them.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "python"
sys.path.insert(0, str(SCRIPTS))

import demo_data  # noqa: E402
import demo_losses  # noqa: E402
import demo_measure  # noqa: E402
import demo_metrics  # noqa: E402
import demo_model  # noqa: E402
import demo_report  # noqa: E402
import demo_train  # noqa: E402
import rmi_ext  # noqa: E402
import synthetic_shapes as shapes  # noqa: E402
import synthetic_thin  # noqa: E402
import train_demo  # noqa: E402


# ---- data set ----------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_seed_dependent():
    x1, y1 = shapes.make_dataset(6, 32, seed=5)
    x2, y2 = shapes.make_dataset(6, 32, seed=5)
    x3, y3 = shapes.make_dataset(6, 32, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_dataset_shapes_values_and_ignored_border():
    x, y = shapes.make_dataset(16, 40, seed=0)
    assert x.shape == (16, 3, 40, 40) and x.dtype == torch.float32
    assert y.shape == (16, 40, 40) and y.dtype == torch.uint8
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    values = set(torch.unique(y).tolist())
    assert values <= set(range(shapes.NUM_CLASSES)) | {shapes.IGNORE_INDEX}
    b = shapes.IGNORE_BORDER
    assert (y[:, :b] == 255).all() and (y[:, -b:] == 255).all()
    assert (y[:, :, :b] == 255).all() and (y[:, :, -b:] == 255).all()
    assert not (y[:, b:-b, b:-b] == 255).any()
    # Every image has background and at least one shape; 16 images cover most classes.
    inner = y[:, b:-b, b:-b].flatten(1)
    assert ((inner == 0).any(1) & (inner > 0).any(1)).all()
    assert len(values - {0, 255}) >= 12


def test_thin_dataset_is_deterministic_and_seed_dependent():
    a = synthetic_thin.make_dataset(6, 32, seed=5)
    b = synthetic_thin.make_dataset(6, 32, seed=5)
    c = synthetic_thin.make_dataset(6, 32, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_thin_dataset_classes_and_thin_mask():
    x, y, thin = synthetic_thin.make_dataset(32, 48, seed=0)
    assert x.shape == (32, 3, 48, 48) and x.dtype == torch.float32
    assert y.shape == thin.shape == (32, 48, 48) and y.dtype == torch.uint8
    assert thin.dtype == torch.bool
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(torch.unique(y).tolist()) == set(range(synthetic_thin.NUM_CLASSES))
    assert not (thin & (y == 0)).any()  # thin pixels are foreground
    assert 0.02 < float(thin.float().mean()) < float((y > 0).float().mean())
    # Thin structures are thin: most thin pixels have a background pixel within 1 px.
    bg_near = demo_metrics.near(y == 0, 1)
    assert float(bg_near[thin].float().mean()) > 0.9
    # The splits of demo_data use fixed seeds: the same data for every training seed.
    d1 = demo_data.load_data("thin", 32, 8, 4, 4)
    d2 = demo_data.load_data("thin", 32, 8, 4, 4)
    assert torch.equal(d1["test"][0], d2["test"][0]) and d1["num_classes"] == 5
    shapes_data = demo_data.load_data("shapes", 32, 8, 4, 4)
    _, ys, thins = shapes_data["train"]
    assert torch.equal(thins, demo_data.shapes_thin_mask(ys)) and thins.any()
    assert shapes_data["num_classes"] == 21


def test_class_ids_and_names():
    assert shapes.NUM_CLASSES == 21 == len(shapes.CLASS_NAMES)
    assert shapes.class_of(0, 0) == 1 and shapes.class_of(4, 3) == 20
    assert shapes.CLASS_NAMES[shapes.class_of(3, 2)] == "blue-ring"


def test_epoch_batches_shuffle_and_flip_images_with_their_labels():
    x, y = shapes.make_dataset(10, 16, seed=1)
    batches = list(demo_train.epoch_batches(x, y, 4, torch.Generator().manual_seed(7)))
    assert len(batches) == 2 and all(bx.shape == (4, 3, 16, 16) for bx, _ in batches)
    seen, flipped = set(), 0
    for bx, by in batches:
        for image, label in zip(bx, by):
            for i in range(len(x)):
                if torch.equal(image, x[i]) and torch.equal(label, y[i]):
                    seen.add(i)
                elif torch.equal(image, x[i].flip(-1)) and torch.equal(label, y[i].flip(-1)):
                    seen.add(i)
                    flipped += 1
    assert len(seen) == 8  # 8 distinct images, each flipped (or not) with its label
    assert 0 < flipped < 8
    again = list(demo_train.epoch_batches(x, y, 4, torch.Generator().manual_seed(7)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


# ---- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_base_loss_is_the_base_term_of_the_rmi_loss(mode):
    # The baseline run trains with exactly the base term of the RMI run's loss.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, shapes.NUM_CLASSES, 20, 24, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, shapes.NUM_CLASSES, (2, 20, 24), generator=gen)
    labels[:, :2] = shapes.IGNORE_INDEX
    base = demo_losses.make_criterion("base", mode)
    rmi = demo_losses.make_criterion("rmi", mode, backend="torch", stride=2, weight_lambda=0.25)
    base_loss, rmi_loss = base(logits, labels), rmi(logits, labels)
    total, base_term, rmi_term = rmi.last_terms
    torch.testing.assert_close(base_loss, base_term, rtol=1e-12, atol=0)
    torch.testing.assert_close(rmi_loss, 0.25 * base_term + 0.75 * rmi_term, rtol=1e-12, atol=0)
    assert base.last_terms[2] is None and float(base.last_terms[0]) == float(base_loss)


# ---- metrics -----------------------------------------------------------------------------------


def test_iou_from_confusion_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 255], dtype=torch.uint8)
    pred = torch.tensor([0, 1, 1, 1, 0, 2], dtype=torch.uint8)
    conf = demo_train.confusion(pred, target, num_classes=3)
    assert conf.sum() == 5  # the ignored pixel is not counted
    iou, miou, acc = demo_train.iou_from_confusion(conf)
    # class 0: tp 1, fp 1 (pixel 4), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 0/1.
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert miou == pytest.approx(1 / 3)
    assert acc == pytest.approx(3 / 5)


def test_iou_skips_absent_classes():
    target = torch.tensor([0, 0, 1], dtype=torch.uint8)
    conf = demo_train.confusion(target.clone(), target, num_classes=4)
    iou, miou, _ = demo_train.iou_from_confusion(conf)
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert miou == 1.0


BOX = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


def test_boundary_by_hand():
    b = demo_metrics.boundary(BOX[None])[0]
    # Every pixel but the 4 corners has a 4-neighbour of another label.
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[0, 3] = expected[3, 0] = expected[3, 3] = False
    assert torch.equal(b, expected)


def test_boundary_f_by_hand():
    shifted = torch.roll(BOX, 1, dims=1)  # the square moved right by one pixel
    # Predicted boundary: 10 pixels, true boundary: 12; 8 coincide exactly.
    counts0 = demo_metrics.boundary_counts(shifted[None], BOX[None], tolerance=0)
    assert counts0 == (8, 10, 8, 12)
    f, p, r = demo_metrics.boundary_f(counts0)
    assert (p, r) == (0.8, pytest.approx(2 / 3)) and f == pytest.approx(8 / 11)
    # Within 1 px every boundary pixel finds one of the other map.
    counts1 = demo_metrics.boundary_counts(shifted[None], BOX[None], tolerance=1)
    assert counts1 == (10, 10, 12, 12) and demo_metrics.boundary_f(counts1)[0] == 1.0
    # Nothing predicted: F 0; nothing to find and nothing found: F 1.
    assert demo_metrics.boundary_f(demo_metrics.boundary_counts(
        torch.zeros(1, 4, 4), BOX[None]))[0] == 0.0
    assert demo_metrics.boundary_f((0, 0, 0, 0))[0] == 1.0
    # Pixels within 1 px of an ignored pixel are left out (here rows 0 and 1).
    target = BOX.clone()[None]
    target[0, 0] = 255
    pred = BOX.clone()[None]
    assert demo_metrics.boundary_counts(pred, target, tolerance=0) == (6, 6, 6, 6)


def test_thin_miou_and_structure_identity_by_hand():
    target = torch.zeros(1, 5, 5, dtype=torch.uint8)
    target[0, :, 2] = 1  # a vertical 1 px line
    thin = target == 1
    pred = torch.zeros_like(target)
    pred[0, :3, 2] = 1   # 3 of the 5 line pixels found
    pred[0, :, 3] = 1    # a false positive column next to it
    pred[0, :, 0] = 1    # a false positive outside the 1 px band: not counted
    band = demo_metrics.near(thin, 1)
    assert int(band.sum()) == 15  # columns 1-3
    m = demo_metrics.evaluate(pred, target, thin, num_classes=2)
    # In the band: class 1 tp 3, fn 2, fp 5 -> 3/10; class 0 tp 5, fn 5, fp 2 -> 5/12.
    assert m["thin_miou"] == pytest.approx((3 / 10 + 5 / 12) / 2)
    fg_iou, ident = demo_metrics.structure_identity(
        torch.tensor([0, 1, 2, 2, 0, 3]), torch.tensor([0, 1, 1, 2, 2, 0]))
    # Foreground: true {1, 2, 3, 4}, predicted {1, 2, 3, 5}: 3 / 5; of {1, 2, 3}, 2 right.
    assert fg_iou == pytest.approx(3 / 5) and ident == pytest.approx(2 / 3)


def test_decision_rule_by_hand():
    helps = demo_report.paired_decision([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])
    assert helps["decision"] == "RMI helps" and helps["diff_mean"] == pytest.approx(0.1)
    assert helps["diff_std"] == pytest.approx(0.0, abs=1e-12)
    # Differences +0.1, -0.1, 0: mean 0, std 0.1, interval 0 +- 4.303 * 0.1 / sqrt(3).
    none = demo_report.paired_decision([0.5, 0.5, 0.5], [0.6, 0.4, 0.5])
    assert none["decision"] == "no difference detected"
    assert none["ci95"][1] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    hurts = demo_report.paired_decision([0.5, 0.5, 0.5], [0.4, 0.38, 0.42])
    assert hurts["decision"] == "RMI hurts" and hurts["base_std"] == 0.0
    assert hurts["rmi_std"] == pytest.approx(0.02)
    assert demo_report.t975(2) == 4.303 and demo_report.t975(12) == 2.228
    assert demo_report.t975(100) == 1.96


def test_model_output_shape():
    model = demo_model.SmallSegNet(width=4)
    out = model(torch.rand(2, 3, 24, 36))
    assert out.shape == (2, shapes.NUM_CLASSES, 24, 36)


@pytest.mark.slow
def test_memory_probe_reports_each_loss_and_a_failure_as_nan(capsys):
    # The demo measures with the benchmark suite's probe (a fresh process on the CPU); a loss
    # that cannot run is NaN with a printed reason, and does not hide the others.
    shape = (2, shapes.NUM_CLASSES, 16, 16)
    good = dict(mode="sigmoid", backend="torch", radius=3, stride=2, pool="avg",
                weight_lambda=0.5)
    criteria = {"base": ("base", good), "bad": ("rmi", {**good, "pool": "no-such-pool"}),
                "rmi": ("rmi", good)}
    peaks = demo_measure.peak_memory(criteria, shape, torch.device("cpu"))
    logits_bytes = 4 * math.prod(shape)
    assert math.isnan(peaks["bad"])
    assert "memory measurement of bad failed" in capsys.readouterr().out
    for name in ("base", "rmi"):  # at least the logits' gradient
        assert math.isfinite(peaks[name]) and peaks[name] >= logits_bytes, (name, peaks)


def test_bad_arguments_are_refused():
    for argv in (["--size", "30"], ["--seeds", "0"], ["--seeds", "1", "1"],
                 ["--n-train", "4", "--batch-size", "8"], ["--patience", "0"],
                 ["--rmi-start-epoch", "2"]):  # replaced by --regime finetune
        with pytest.raises(SystemExit):
            train_demo.parse_args(argv)


def test_defaults_are_the_protocols():
    args = train_demo.parse_args([])
    assert (args.data, args.regime, args.seeds, args.size, args.stride, args.radius) == (
        "thin", "both", [0, 1, 2], 48, 2, 3)
    assert (args.n_train, args.n_val, args.n_test, args.epochs, args.pretrain_max_epochs,
            args.ft_epochs, args.weight_lambda, args.tag) == (384, 96, 128, 8, 12, 4, 0.5, "demo")
    assert train_demo.parse_args(["--full-res"]).stride == 1


# ---- end to end --------------------------------------------------------------------------------

TINY = ["--quick", "--n-train", "32", "--n-val", "16", "--n-test", "16", "--size", "32",
        "--batch-size", "8", "--width", "8", "--threads", "1", "--device", "cpu"]


def run_demo(tmp_path, *extra):
    # The script imports the same rmi_ext as this test session (installed or source tree).
    package_parent = str(Path(rmi_ext.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=package_parent)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train_demo.py"), *TINY,
                           "--out-dir", str(tmp_path), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra, tag, df, regimes, classes", [
    ((), "demo_quick", 2, ("scratch", "finetune"), 5),
    (("--data", "shapes", "--full-res", "--mode", "softmax", "--regime", "finetune",
      "--no-reference-memory"), "demo_shapes_softmax_quick_fullres", 1, ("finetune",), 21),
])
def test_demo_runs_and_reports(tmp_path, extra, tag, df, regimes, classes):
    out = run_demo(tmp_path, *extra)
    assert "self-check passed" in out
    for name in (f"{tag}.png", f"{tag}_curves.png", f"{tag}_results.md", f"{tag}_results.json"):
        path = tmp_path / name
        assert path.stat().st_size > 1000, name
    assert (tmp_path / f"{tag}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / f"{tag}_results.json").read_text())
    assert summary["config"]["stride"] == df and summary["config"]["seeds"] == [0, 1]
    assert summary["env"]["backend"] == rmi_ext.backend_info("cpu")["auto"]
    assert tuple(summary["summary"]) == regimes
    md = (tmp_path / f"{tag}_results.md").read_text()
    for regime in regimes:
        for key, _ in demo_report.METRICS:
            st = summary["summary"][regime][key]
            per_seed = [[summary["per_seed"][seed][regime][arm]["metrics"][key]
                         for seed in ("0", "1")] for arm in ("base", "rmi")]
            # The summary is computed from the per-seed numbers in the same file.
            assert st["base"] == per_seed[0] and st["rmi"] == per_seed[1]
            assert st["decision"] in ("RMI helps", "RMI hurts", "no difference detected")
        st = summary["summary"][regime]["miou"]
        assert f"| {regime} | mIoU | {st['base_mean']:.3f} ± {st['base_std']:.3f} |" in md
        for seed in ("0", "1"):
            for arm in ("base", "rmi"):
                run = summary["per_seed"][seed][regime][arm]
                assert 0.0 <= run["metrics"]["miou"] <= 1.0
                assert 0.0 <= run["metrics"]["boundary_f"] <= 1.0
                assert len(run["metrics"]["iou"]) == classes
                assert all(math.isfinite(v) and v > 0 for v in run["base_term_per_epoch"])
    if "finetune" in regimes:
        pre = summary["per_seed"]["0"]["pretrain"]
        assert 1 <= pre["best_epoch"] <= len(pre["val_miou_per_epoch"]) <= 2
    for regime in regimes:
        # Both arms start from the same weights on the same first batch: the same base term
        # at the first step (RMILoss computes its BCE in its own kernels: not bit-equal).
        arms = summary["per_seed"]["1"][regime]
        first = arms["base"]["base_term_first_step"]
        assert arms["rmi"]["base_term_first_step"] == pytest.approx(first, rel=1e-4)
    meas = summary["loss_measurements"]
    assert meas["shape"] == [8, classes, 32, 32]
    for key in ("base", "rmi") + (() if "--no-reference-memory" in extra else ("reference",)):
        assert math.isfinite(meas[key]["extra_bytes"]) and meas[key]["seconds"] > 0
