"""The demo (python/train_demo.py) and its data set (python/synthetic_shapes.py).

Unit checks of the data set and the metrics, then short end-to-end runs of the script in a
subprocess (tiny data, 2 epochs) that check the files it writes and the numbers in them.
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


# ---- metrics -----------------------------------------------------------------------------------


def test_iou_from_confusion_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 255], dtype=torch.uint8)
    pred = torch.tensor([0, 1, 1, 1, 0, 2], dtype=torch.uint8)
    conf = train_demo.confusion(pred, target, num_classes=3)
    assert conf.sum() == 5  # the ignored pixel is not counted
    iou, miou, acc = train_demo.iou_from_confusion(conf)
    # class 0: tp 1, fp 1 (pixel 4), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 0/1.
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert miou == pytest.approx(1 / 3)
    assert acc == pytest.approx(3 / 5)


def test_iou_skips_absent_classes():
    target = torch.tensor([0, 0, 1], dtype=torch.uint8)
    conf = train_demo.confusion(target.clone(), target, num_classes=4)
    iou, miou, _ = train_demo.iou_from_confusion(conf)
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert miou == 1.0


def test_model_output_shape():
    model = train_demo.SmallSegNet(width=4)
    out = model(torch.rand(2, 3, 24, 36))
    assert out.shape == (2, shapes.NUM_CLASSES, 24, 36)


def test_bad_arguments_are_refused():
    for argv in (["--size", "30"], ["--rmi-start-epoch", "3", "--epochs", "3"],
                 ["--n-train", "4", "--batch-size", "8"]):
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
    for key in ("base", "rmi", "reference"):
        assert math.isfinite(meas[key]["extra_bytes"]) and meas[key]["extra_bytes"] > 0
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
