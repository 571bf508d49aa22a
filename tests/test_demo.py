"""The demo (python/train_demo.py and the demo_*.py modules it wires) and its data set
(python/synthetic_shapes.py).

Unit checks of the data set, the batches, the losses, the metrics and the memory probe, then
short end-to-end runs of the script in a subprocess (tiny data, 2 epochs) that check the files
it writes and the numbers in them.
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

import demo_losses  # noqa: E402
import demo_measure  # noqa: E402
import demo_model  # noqa: E402
import demo_train  # noqa: E402
import rmi_ext  # noqa: E402
import synthetic_shapes as shapes  # noqa: E402
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


def test_model_output_shape():
    model = demo_model.SmallSegNet(width=4)
    out = model(torch.rand(2, 3, 24, 36))
    assert out.shape == (2, shapes.NUM_CLASSES, 24, 36)


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
    for argv in (["--size", "30"], ["--rmi-start-epoch", "3", "--epochs", "3"],
                 ["--n-train", "4", "--batch-size", "8"],
                 ["--_measure-loss", "{}"]):  # no hidden self-re-run option any more
        with pytest.raises(SystemExit):
            train_demo.parse_args(argv)


# ---- end to end --------------------------------------------------------------------------------

TINY = ["--epochs", "2", "--n-train", "32", "--n-val", "16", "--size", "32", "--batch-size", "8",
        "--width", "8", "--threads", "1", "--num-examples", "3", "--device", "cpu"]


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


@pytest.mark.parametrize("extra, tag, df, base_label", [
    ((), "demo", 4, "BCE"),
    (("--full-res", "--mode", "softmax", "--rmi-start-epoch", "1", "--tag", "t"), "t", 1, "CE"),
])
def test_demo_runs_and_reports(tmp_path, extra, tag, df, base_label):
    out = run_demo(tmp_path, *extra)
    assert "self-check passed" in out
    for name in (f"{tag}.png", f"{tag}_curves.png", f"{tag}_results.md", f"{tag}_results.json"):
        path = tmp_path / name
        assert path.stat().st_size > 1000, name
    assert (tmp_path / f"{tag}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / f"{tag}_results.json").read_text())
    assert summary["config"]["stride"] == df
    assert summary["env"]["backend"] == rmi_ext.backend_info("cpu")["auto"]
    runs = summary["runs"]
    assert runs["base"]["label"] == base_label and runs["rmi"]["label"] == base_label + "+RMI"
    for run in runs.values():
        assert 0.0 <= run["miou"] <= 1.0 and 0.0 <= run["pixel_acc"] <= 1.0
        assert len(run["iou"]) == shapes.NUM_CLASSES
        assert len(run["val_miou_per_epoch"]) == 2 == len(run["base_term_per_epoch"])
        assert all(math.isfinite(v) and v > 0 for v in run["base_term_per_epoch"])
        assert run["step_s_median"] > 0
    meas = summary["loss_measurements"]
    assert meas["shape"] == [8, shapes.NUM_CLASSES, 32, 32]
    assert meas["logits_bytes"] == 4 * math.prod(meas["shape"])
    for key in ("base", "rmi", "reference"):
        # The peak includes the logits' gradient, as large as the logits.
        assert math.isfinite(meas[key]["extra_bytes"])
        assert meas[key]["extra_bytes"] >= meas["logits_bytes"], (key, meas[key])
        assert meas[key]["seconds"] > 0
    # The fused loss needs less memory than the unfold reference, by far at DF 1.
    assert meas["rmi"]["extra_bytes"] < meas["reference"]["extra_bytes"] / (8 if df == 1 else 2)
    md = (tmp_path / f"{tag}_results.md").read_text()
    assert f"val mIoU | {runs['base']['miou']:.3f} | {runs['rmi']['miou']:.3f}" in md
    assert ("RMI switched on at epoch 2" in md) == ("--rmi-start-epoch" in extra)
    if "--rmi-start-epoch" in extra:
        # The RMI run is the base run for its first epoch (same seed, weights and batches): the
        # same base-term values and validation mIoU; then RMI changes the training.
        base, rmi = runs["base"], runs["rmi"]
        assert base["val_miou_per_epoch"][0] == rmi["val_miou_per_epoch"][0]
        assert base["base_term_per_epoch"][0] == rmi["base_term_per_epoch"][0]
        assert base["base_term_per_epoch"][1] != rmi["base_term_per_epoch"][1]
