"""Turn a pytest-benchmark JSON of ``pytest benchmarks`` into ``benchmarks/RESULTS.md`` and plots.

Usage::

    pytest benchmarks --benchmark-json=benchmarks/.results/latest.json
    python python/make_results.py benchmarks/.results/latest.json

Writes ``benchmarks/RESULTS.md`` (machine, torch version, date; per case and backend the median
time of forward, backward and forward+backward with their interquartile range, the speed-up over
the unfold reference, and the peak extra memory of forward+backward) and, in
``benchmarks/plots/``, ``df_sweep.png`` and ``radius_sweep.png`` (time and memory against DF and
against R, one line per backend). Every number comes from the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHASES = ("fwd", "bwd", "fwd+bwd")
BACKEND_ORDER = ("reference", "compiled-reference", "torch", "cpu", "cuda", "triton",
                 "rmi-pytorch")
BACKEND_LABELS = {"reference": "reference (unfold, eager)",
                  "compiled-reference": "reference + torch.compile",
                  "rmi-pytorch": "rmi-pytorch (PyPI)"}
MIB = 2**20
ROWS_TEXT = [
    "## What each row runs", "",
    "Before timing, every row's loss is checked once per case against the reference "
    "(relative 1e-4; rmi-pytorch: its RMI term).", "",
    "- *reference*: `rmi_ext.rmi_loss(..., backend=\"reference\")`, the authors' algorithm "
    "(stacked shifted copies in float64, autograd).",
    "- *reference + torch.compile*: `torch.compile(rmi_ext.reference.reference_loss, "
    "dynamic=False)`, compiled once per case (by default only in the paper and DF-sweep cases; "
    "`--rmi-compile-all` for all).",
    "- *torch*, *cpu*, *cuda*, *triton*: `rmi_ext.rmi_loss(..., backend=...)`, the fused "
    "backends with the hand-written backward.",
    "- *rmi-pytorch*: `rmi.RMILoss(with_logits=True, radius=R, stride=DF, pool=..., "
    "bce_weight=0.5, use_log_trace=True, use_double_precision=True, epsilon=5e-4)` on a float "
    "one-hot target built before timing (it has no ignore index and no `interp` pooling). Its "
    "BCE is a mean over all elements where the authors sum over classes, so its total differs "
    "by that scale; its RMI term is the authors' (`use_log_trace=True` is the Cholesky "
    "log-determinant).", ""]


def load(path: Path):
    """``(machine_info, datetime, {case: {backend: row}}, case_info)``, rows keyed by phase."""
    data = json.loads(path.read_text())
    results = defaultdict(lambda: defaultdict(dict))
    case_info = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        row = results[info["case"]][info["backend"]]
        row[info["phase"]] = bench["stats"]
        row.update({k: info[k] for k in ("peak_extra_bytes", "peak_extra_x_logits",
                                          "memory_method", "first_call_s")
                    if k in info})
        row.setdefault("loadavg", []).append(info.get("loadavg_1min", 0.0))
        case_info[info["case"]] = {k: info[k] for k in ("shape", "stride", "radius", "pool",
                                                         "logits_bytes", "device")}
        # "labels" or "float" (a soft float target); older JSON: the case id's suffix
        case_info[info["case"]]["target"] = info.get(
            "target", "float" if info["case"].endswith("-float") else "labels")
    return data["machine_info"], data["datetime"], results, case_info


def ordered(backends):
    return sorted(backends, key=lambda b: BACKEND_ORDER.index(b) if b in BACKEND_ORDER else 99)


def case_order(case_info):
    """Biggest shape first, then by pool, DF, R and target (labels first)."""
    pools = ("avg", "max", "interp")
    return sorted(case_info, key=lambda c: (-case_info[c]["logits_bytes"],
                                            pools.index(case_info[c]["pool"]),
                                            case_info[c]["stride"], case_info[c]["radius"],
                                            case_info[c]["target"] != "labels"))


def case_label(info, sep=" ") -> str:
    """``4x21x513x513 DF 4 R 3 avg`` (``sep`` between the parts), ``float target`` appended
    for a float-target case."""
    parts = [f"`{'x'.join(map(str, info['shape']))}`", f"DF {info['stride']}",
             f"R {info['radius']}", info["pool"]]
    if info["target"] != "labels":
        parts.append(f"{info['target']} target")
    return sep.join(parts)


def fmt_time(stats) -> str:
    if stats is None:
        return "–"
    return f"{stats['median'] * 1e3:,.1f} ± {stats['iqr'] * 1e3 / 2:,.1f}"


def speedup(results_case, backend, against="reference", phase="fwd+bwd"):
    base, row = results_case.get(against, {}).get(phase), results_case[backend].get(phase)
    if base is None or row is None:
        return None
    return base["median"] / row["median"]


def fmt_ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def machine_lines(machine, when):
    rmi = machine.get("rmi", {})
    cpu = rmi.get("cpu_model") or machine.get("cpu", {}).get("brand_raw", "?")
    lines = [f"- Date: {datetime.fromisoformat(when).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- Device: `{rmi.get('device', '?')}`"
             + (f" ({rmi['gpu']}, CUDA {rmi.get('cuda_version')})" if rmi.get("gpu") else ""),
             f"- CPU: {cpu}, {rmi.get('cpu_count', '?')} cores visible, "
             f"{rmi.get('torch_threads', '?')} torch threads",
             f"- torch {rmi.get('torch_version', '?')}, Python {machine.get('python_version')}, "
             f"{machine.get('system')} {machine.get('release')}"]
    if "session_wall_s" in rmi:
        flags = " ".join(f"{k}" if v is True else f"{k}={v}" for k, v in
                         rmi.get("options", {}).items() if v not in (False, None))
        lines.append(f"- Run: `pytest benchmarks {flags}`, {rmi['session_wall_s'] / 60:.1f} min "
                     "wall time for the whole session")
    return lines


def results_table(results, case_info):
    head = ("| Case | Backend | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd speed-up vs reference "
            "| peak extra MiB | x logits |")
    lines = [head, "|---" * 8 + "|"]
    for case in case_order(case_info):
        info = case_info[case]
        label = case_label(info)
        for backend in ordered(results[case]):
            row = results[case][backend]
            mem = row.get("peak_extra_bytes")
            lines.append(
                f"| {label} | {BACKEND_LABELS.get(backend, backend)} | "
                + " | ".join(fmt_time(row.get(p)) for p in PHASES)
                + f" | {fmt_ratio(speedup(results[case], backend))} | "
                + ("–" if mem is None else f"{mem / MIB:,.0f}") + " | "
                + ("–" if mem is None else f"{row['peak_extra_x_logits']:.1f}") + " |")
    return lines


def is_volume(info) -> bool:
    return len(info["shape"]) == 5


def headline(results, case_info):
    """Forward+backward at the paper's setting and at DF 1 (2-D), integer labels: time,
    speed-ups, memory."""
    planar = {c: info for c, info in case_info.items()
              if not is_volume(info) and info["target"] == "labels"}
    paper = [c for c in planar if planar[c]["shape"][2] == 513]
    df1 = [c for c in planar if planar[c]["stride"] == 1 and planar[c]["pool"] == "avg"]
    return case_tables(results, {c: case_info[c] for c in paper + df1})


def case_tables(results, case_info):
    """One forward+backward table per case: time, speed-ups and memory per backend."""
    lines = []
    for case in case_order(case_info):
        info, rows = case_info[case], results[case]
        lines += [f"{case_label(info, ', ')}, forward+backward:", "",
                  "| Backend | ms, median ± IQR/2 | speed-up vs reference "
                  "| speed-up vs torch.compile | peak extra memory, x logits |", "|---" * 5 + "|"]
        for backend in ordered(rows):
            row = rows[backend]
            if "fwd+bwd" not in row:
                continue
            mem = row.get("peak_extra_x_logits")
            lines.append(f"| {BACKEND_LABELS.get(backend, backend)} | "
                         f"{fmt_time(row['fwd+bwd'])} | {fmt_ratio(speedup(rows, backend))} | "
                         f"{fmt_ratio(speedup(rows, backend, 'compiled-reference'))} | "
                         + ("–" if mem is None else f"{mem:.1f}") + " |")
        compiled = rows.get("compiled-reference", {})
        if "first_call_s" in compiled:
            lines += ["", f"The first forward+backward under torch.compile (compiling) took "
                          f"{compiled['first_call_s']:.0f} s."]
        lines.append("")
    return lines


def targets_section(results, case_info):
    """Each float-target case beside the same case with integer labels: forward+backward time
    and peak extra memory per backend, and the time ratio."""
    lines = []
    same = ("shape", "stride", "radius", "pool")
    for case in case_order(case_info):
        info = case_info[case]
        if info["target"] == "labels":
            continue
        twin = next((c for c, other in case_info.items() if other["target"] == "labels"
                     and all(other[k] == info[k] for k in same)), None)
        lines += [f"{case_label(info, ', ')}, forward+backward, beside integer labels:", "",
                  "| Backend | labels ms | float target ms | ratio | peak extra memory, x logits "
                  "(labels / float target) |", "|---" * 5 + "|"]
        for backend in ordered(results[case]):
            row = results[case][backend]
            base = results[twin].get(backend, {}) if twin else {}
            if "fwd+bwd" not in row:
                continue
            ratio = (row["fwd+bwd"]["median"] / base["fwd+bwd"]["median"]
                     if "fwd+bwd" in base else None)
            mems = [r.get("peak_extra_x_logits") for r in (base, row)]
            lines.append(f"| {BACKEND_LABELS.get(backend, backend)} | "
                         f"{fmt_time(base.get('fwd+bwd'))} | {fmt_time(row['fwd+bwd'])} | "
                         f"{fmt_ratio(ratio)} | "
                         + " / ".join("–" if m is None else f"{m:.2f}" for m in mems) + " |")
        lines.append("")
    return lines


def sweep_plot(results, case_info, vary, fixed, path, xlabel):
    """Time and memory of forward+backward against ``vary`` (``stride`` or ``radius``)."""
    cases = [c for c in case_info if all(case_info[c][k] == v for k, v in fixed.items())]
    if len({case_info[c][vary] for c in cases}) < 2:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    backends = ordered({b for c in cases for b in results[c]})
    for backend in backends:
        pts = sorted((case_info[c][vary], results[c][backend]) for c in cases
                     if "fwd+bwd" in results[c].get(backend, {}))
        if not pts:
            continue
        xs = [x for x, _ in pts]
        med = [r["fwd+bwd"]["median"] * 1e3 for _, r in pts]
        lo = [r["fwd+bwd"]["q1"] * 1e3 for _, r in pts]
        hi = [r["fwd+bwd"]["q3"] * 1e3 for _, r in pts]
        label = BACKEND_LABELS.get(backend, backend)
        style = dict(marker="o", linestyle="--" if "reference" in backend else "-")
        line, = ax_t.plot(xs, med, label=label, **style)
        ax_t.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        mem = [(x, r["peak_extra_x_logits"]) for x, r in pts if "peak_extra_x_logits" in r]
        if mem:
            ax_m.plot(*zip(*mem), label=label, color=line.get_color(), **style)
    shape = "x".join(map(str, fixed["shape"]))
    names = {"stride": "DF", "radius": "R", "pool": "pool"}
    others = ", ".join(f"{names[k]} {v}" for k, v in fixed.items() if k != "shape")
    for ax, ylabel in ((ax_t, "forward+backward time, ms (median, IQR band)"),
                       (ax_m, "peak extra memory, x logits bytes")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_xticks(sorted({case_info[c][vary] for c in cases}))
        ax.grid(True, which="both", alpha=0.3)
    ax_m.axhline(1.0, color="gray", linewidth=0.8, linestyle=":",
                 label="1x: the size of the gradient itself")
    ax_t.legend(fontsize=8)
    ax_m.legend(handles=ax_m.get_lines()[-1:], fontsize=8, loc="upper right")
    fig.suptitle(f"RMI loss, logits {shape} float32, {others} "
                 f"({case_info[cases[0]]['device']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--plots", type=Path, default=REPO / "benchmarks" / "plots")
    args = parser.parse_args(argv)

    machine, when, results, case_info = load(args.json)
    rmi_pytorch = machine.get("rmi", {}).get("rmi_pytorch_version")
    if rmi_pytorch:
        BACKEND_LABELS["rmi-pytorch"] = f"rmi-pytorch {rmi_pytorch} (PyPI)"
    small = [2, 21, 257, 257]
    plots = []
    if sweep_plot(results, case_info, "stride", dict(shape=small, radius=3, pool="avg"),
                  args.plots / "df_sweep.png", "downsampling factor DF"):
        plots.append(("Against DF (R 3, avg)", "df_sweep.png"))
    if sweep_plot(results, case_info, "radius", dict(shape=small, stride=4, pool="avg"),
                  args.plots / "radius_sweep.png", "radius R"):
        plots.append(("Against R (DF 4, avg)", "radius_sweep.png"))
    volume = [2, 4, 96, 96, 96]
    if sweep_plot(results, case_info, "stride", dict(shape=volume, radius=3, pool="avg"),
                  args.plots / "volume_df_sweep.png", "downsampling factor DF"):
        plots.append(("Volumes against DF (R 3, avg)", "volume_df_sweep.png"))
    volumes = {c: info for c, info in case_info.items() if is_volume(info)}

    loads = [x for rows in results.values() for row in rows.values() for x in row["loadavg"]]
    cores = machine.get("rmi", {}).get("cpu_count") or float("inf")
    methods = sorted({row["memory_method"] for rows in results.values()
                      for row in rows.values() if "memory_method" in row})
    lines = ["# RMI loss benchmarks", "",
             "Generated by `python python/make_results.py` from the JSON of "
             "`pytest benchmarks --benchmark-json=...`; do not edit by hand.", "",
             *machine_lines(machine, when),
             *([f"- Load average (1 min) seen after the timed rounds: {min(loads):.1f} to "
                f"{max(loads):.1f}"
                + (" (above the core count, other work competed for the cores and inflated "
                   "the times)" if max(loads) > cores else "")] if loads else []),
             "", "## Headline", "", *headline(results, case_info),
             *(["## Volumes", "", "Logits `[N, C, D, H, W]` float32, R 3 on every axis "
                "(`d` = 27), every backend that computes volumes:", "",
                *case_tables(results, volumes)] if volumes else []),
             *(["## Targets", "", "A soft float target (a one-hot target with label smoothing "
                "0.1, float32, made before timing) against integer labels:", "",
                *targets_section(results, case_info)]
               if any(i["target"] != "labels" for i in case_info.values()) else []),
             "## All cases", "",
             "Times are the median over the rounds ± half the interquartile range, in ms; "
             "`bwd` is the backward alone (its forward is untimed). The speed-up is the "
             "reference's forward+backward median over the backend's. Peak extra memory is "
             "measured during one forward+backward after a warm-up, above what was allocated "
             f"before it (inputs included there, the gradient counted in the peak): "
             f"{'; '.join(methods) or 'not measured'}. Inputs have every label valid.", "",
             *results_table(results, case_info), "", *ROWS_TEXT]
    if plots:
        lines += ["## Plots", ""]
        for title, name in plots:
            link = Path(os.path.relpath(args.plots / name, args.out.parent)).as_posix()
            lines += [f"### {title}", "", f"![{title}]({link})", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {len(plots)} plot(s) in {args.plots}")


if __name__ == "__main__":
    main()
