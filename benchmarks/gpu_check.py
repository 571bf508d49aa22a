"""The GPU check's measurements (run by ``benchmarks/gpu_check.sh``): one JSON and one markdown
table in OUTDIR.

For each headline case and backend: the loss and gradient against the unfold reference, the
median forward+backward time, the peak extra memory, and the achieved bytes/s against a
device-to-device copy of the same bytes. Then the checks a training loop relies on: no host
sync in a forward+backward of each fast backend (``torch.cuda.set_sync_debug_mode("error")``;
on CPU the profiler sees no ``.item()``/``nonzero``/linalg error check), autocast and
``torch.compile``, and what Inf logits do (NaN loss and gradient on CUDA, the context alive).

``--dry``: tiny shapes on the CPU (Triton interpreted), so CI runs every line of this file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import rmi_ext
import rmi_bench
from rmi_bench import Case

GPU_CASES = [Case((16, 21, 513, 513), 4, 3, "avg"), Case((8, 21, 513, 513), 1, 3, "avg")]
DRY_CASES = [Case((2, 5, 37, 33), 4, 3, "avg"), Case((1, 5, 21, 19), 1, 3, "avg")]
TOL = {"loss": 1e-5, "grad": 1e-4}  # float32 logits against the reference
#: Host-sync markers in a CPU profile: a forward+backward must contain none of them.
SYNC_OPS = ("aten::_linalg_check_errors", "aten::item", "aten::_local_scalar_dense",
            "aten::nonzero")


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(nbytes: int, device: str, repeats: int) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def measure_case(case: Case, backends, device: str, repeats: int) -> list[dict]:
    logits, labels = rmi_bench.make_inputs(case, device)
    ref_loss = rmi_ext.rmi_loss(logits, labels, backend="reference", **case.options)
    ref_loss.backward()
    ref_grad, logits.grad = logits.grad, None
    # Bytes a fused forward+backward must move: logits read twice, gradient written, labels
    # read twice. The copy rate is measured on the same number of bytes.
    moved = 3 * logits.numel() * logits.element_size() + 2 * labels.numel() * labels.element_size()
    copy = copy_rate(moved // 2, device, repeats)
    peak = rmi_bench.peak_extra_bytes_cuda if device == "cuda" else rmi_bench.peak_extra_bytes_torch
    rows = []
    for backend in backends:
        row = dict(case=case.id, shape=list(case.shape), stride=case.stride,
                   radius=case.radius, pool=case.pool, backend=backend)
        try:
            fn = rmi_bench.make_loss_fn(backend, case, labels)
            loss = fn(logits)
            loss.backward()
            row["loss_rel_err"] = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            row["grad_rel_err"] = rel(logits.grad, ref_grad)
            row["matches_reference"] = (row["loss_rel_err"] <= TOL["loss"]
                                        and row["grad_rel_err"] <= TOL["grad"])

            def fwd_bwd():
                logits.grad = None
                fn(logits).backward()

            row["fwd_bwd_ms"] = 1e3 * timed(fwd_bwd, device, repeats)
            logits.grad = None
            extra = peak(fwd_bwd)
            row["peak_extra_bytes"] = extra
            row["peak_extra_x_logits"] = extra / (logits.numel() * logits.element_size())
            row["bytes_per_s"] = moved / (row["fwd_bwd_ms"] / 1e3)
            row["copy_bytes_per_s"] = copy
            row["fraction_of_copy"] = row["bytes_per_s"] / copy
        except Exception as exc:  # record it, measure the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        logits.grad = None
        rows.append(row)
    ref = next((r for r in rows if r["backend"] == "reference" and "fwd_bwd_ms" in r), None)
    for row in rows:
        if ref and "fwd_bwd_ms" in row:
            row["speedup_vs_reference"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def sync_free(backend: str, device: str) -> dict:
    """One forward+backward with host syncs forbidden (CUDA) or looked for (CPU profile)."""
    logits, labels = rmi_bench.make_inputs(Case((2, 5, 37, 33), 2, 3, "avg"), device)
    # nonfinite="nan": the policy "auto" gives on CUDA (on CPU it raises, reading the count).
    run = lambda: rmi_ext.rmi_loss(logits, labels, backend=backend, stride=2,  # noqa: E731
                                   nonfinite="nan").backward()
    run()  # warm-up: compiles, loads
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return {"backend": backend, "host_syncs": []}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return {"backend": backend,
                "host_syncs": sorted({e.name for e in prof.events() if e.name in SYNC_OPS})}
    except Exception as exc:
        return {"backend": backend, "host_syncs": [f"{type(exc).__name__}: {exc}"]}


def nonfinite_survives(backend: str, device: str) -> dict:
    """Inf/NaN logits with the default policy: on CUDA a NaN loss and gradient (no assert, the
    context lives on: the next clean call is finite); on CPU a RuntimeError."""
    logits, labels = rmi_bench.make_inputs(Case((2, 5, 37, 33), 2, 3, "avg"), device)
    out = {"backend": backend}
    bad = logits.detach().clone()
    bad[1, 2, 4, 5] = float("inf")
    bad.requires_grad_()
    try:
        loss = rmi_ext.rmi_loss(bad, labels, backend=backend, stride=2)
        loss.backward()
        out["loss_nan"] = bool(torch.isnan(loss))
        out["grad_nan"] = bool(torch.isnan(bad.grad).any())
    except RuntimeError as exc:
        out["raised"] = str(exc)
    clean = rmi_ext.rmi_loss(logits, labels, backend=backend, stride=2)
    out["next_call_finite"] = bool(torch.isfinite(clean))
    expected_raise = device == "cpu"
    out["ok"] = out["next_call_finite"] and (
        ("raised" in out) if expected_raise else (out.get("loss_nan") and out.get("grad_nan")))
    return out


def autocast_and_compile(backend: str, device: str) -> dict:
    """bf16 autocast around a conv + loss, and torch.compile(fullgraph) of the same step,
    against the eager float32 loss."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(device)
    image = torch.randn(2, 3, 40, 36, device=device)
    labels = torch.randint(0, 5, (2, 40, 36), device=device)
    step = lambda: rmi_ext.rmi_loss(conv(image), labels, backend=backend, stride=2)  # noqa
    out = {"backend": backend}
    try:
        eager = step()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            amp = step()
        out["autocast_bf16_rel_err"] = abs(amp.item() - eager.item()) / abs(eager.item())
        amp.backward()
        out["autocast_grad_finite"] = bool(torch.isfinite(conv.weight.grad).all())
        conv.weight.grad = None
        compiled = torch.compile(step, fullgraph=True,
                                 backend="inductor" if device == "cuda" else "aot_eager")
        out["compile_rel_err"] = abs(compiled().item() - eager.item()) / abs(eager.item())
        out["ok"] = (out["autocast_bf16_rel_err"] < 5e-2 and out["autocast_grad_finite"]
                     and out["compile_rel_err"] < 1e-5)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["ok"] = False
    return out


#: Candidate tile settings per kernel of the Triton backend (entries of ``triton_backend.TILES``,
#: the defaults included), timed at the GPU cases (sigmoid mode: the logsumexp kernel unused).
TUNING_CANDIDATES = {
    "main_pass": [{"pixels": 256}, {"pixels": 512}, {"pixels": 1024}],
    "moment": [{"BK": 16}, {"BK": 32}, {"BK": 64}],
    "stencil": [{"elements": 1024}, {"elements": 2048}, {"elements": 4096}],
    "grad": [{"pixels": 512}, {"pixels": 1024}, {"pixels": 2048}],
}


def triton_tuning(device: str, dry: bool = False, repeats: int = 3) -> dict:
    """Forward+backward ms of the Triton backend at each GPU case for each candidate of
    :data:`TUNING_CANDIDATES`, one kernel's entry of ``TILES`` changed at a time (the others at
    their defaults): ``{"tables": {kernel: [{"case", "tiles", "fwd_bwd_ms", "fastest"}]}}``, or
    ``{"skipped": reason}`` off CUDA and in the dry run. About 24 settings, most compiled once."""
    if dry or not str(device).startswith("cuda"):
        return {"skipped": "CUDA only"}
    from rmi_ext import triton_backend as tb

    tables = {}
    for case in GPU_CASES:
        torch.manual_seed(0)
        x = torch.randn(case.shape, device=device, requires_grad=True)
        lab = torch.randint(0, case.shape[1], (case.shape[0], *case.shape[2:]), device=device)

        def fwd_bwd():
            rmi_ext.rmi_loss(x, lab, radius=case.radius, stride=case.stride,
                             pool=case.pool, backend="triton").backward()
            x.grad = None

        for kernel, candidates in TUNING_CANDIDATES.items():
            rows = []
            for cand in candidates:
                saved = dict(tb.TILES[kernel])
                tb.TILES[kernel].update(cand)
                row = {"case": case.id, "tiles": dict(tb.TILES[kernel]), "fastest": False}
                try:
                    row["fwd_bwd_ms"] = timed(fwd_bwd, device, repeats) * 1e3
                except Exception as exc:  # e.g. out of resources: recorded, not fatal
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                finally:
                    tb.TILES[kernel].clear()
                    tb.TILES[kernel].update(saved)
                rows.append(row)
            timed_rows = [r for r in rows if "fwd_bwd_ms" in r]
            if timed_rows:
                min(timed_rows, key=lambda r: r["fwd_bwd_ms"])["fastest"] = True
            tables.setdefault(kernel, []).extend(rows)
        del x, lab
    return {"tables": tables}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# rmi_ext GPU check{' (dry run, CPU)' if report['dry'] else ''}", "",
             f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
             f"Python {env['python']}; {env['date']}.", "",
             "| case | backend | fwd+bwd ms | x reference | peak extra (x logits) | "
             "GB/s | of copy | loss err | grad err |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['backend']} | error: {r['error'][:80]} |||||||")
            continue
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['fwd_bwd_ms']:.2f} | "
            f"{r.get('speedup_vs_reference', float('nan')):.1f} | "
            f"{r['peak_extra_x_logits']:.2f} | {r['bytes_per_s'] / 1e9:.1f} | "
            f"{r['fraction_of_copy']:.0%} | {r['loss_rel_err']:.1e} | {r['grad_rel_err']:.1e} |")
    lines += ["", "| backend | host syncs in fwd+bwd | autocast bf16 / compile | Inf logits |",
              "|---|---|---|---|"]
    for s, a, f in zip(report["sync_free"], report["autocast_compile"], report["nonfinite"]):
        syncs = ", ".join(s["host_syncs"]) or "none"
        amp = "ok" if a["ok"] else a.get("error", json.dumps(a))
        inf = ("raises" if "raised" in f else "NaN loss and gradient") if f["ok"] else json.dumps(f)
        lines.append(f"| {s['backend']} | {syncs} | {amp} | {inf} |")
    tuning = report.get("triton_tuning", {})
    if "skipped" in tuning:
        lines += ["", f"Triton tile tuning: skipped ({tuning['skipped']})."]
    for kernel, rows in tuning.get("tables", {}).items():
        lines += ["", f"Triton tiles, kernel `{kernel}` (**bold**: fastest per case):", "",
                  "| case | tiles | fwd+bwd ms |", "|---|---|---:|"]
        for r in rows:
            ms = f"{r['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in r else r.get("error", "")
            if r["fastest"]:
                ms = f"**{ms}**"
            lines.append(f"| {r['case']} | {json.dumps(r['tiles'])} | {ms} |")
    lines += ["", f"Checks passed: {report['passed']}. Wall time {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.dry:
        device, cases, repeats = "cpu", DRY_CASES, args.repeats or 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
        fast = [b for b in ("triton", "cpu", "torch")
                if rmi_ext.backend_info("cpu")["available"][b] is True]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --dry on a CPU machine)")
        device, cases, repeats = "cuda", GPU_CASES, args.repeats or 10
        fast = ["triton", "cuda"]
    import triton

    report = {"dry": args.dry, "environment": {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or platform.machine(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "backend_info": rmi_ext.backend_info(device)}, "cases": []}
    for case in cases:
        report["cases"] += measure_case(case, ["reference", *fast], device, repeats)
    report["sync_free"] = [sync_free(b, device) for b in fast]
    report["autocast_compile"] = [autocast_and_compile(b, device) for b in fast]
    report["nonfinite"] = [nonfinite_survives(b, device) for b in fast]
    report["triton_tuning"] = (triton_tuning(device, dry=args.dry) if "triton" in fast
                               else {"skipped": "backend 'triton' unavailable"})
    report["passed"] = (all(r.get("matches_reference", r["backend"] == "reference")
                            for r in report["cases"])
                        and all(not s["host_syncs"] for s in report["sync_free"])
                        and all(a["ok"] for a in report["autocast_compile"])
                        and all(f["ok"] for f in report["nonfinite"]))
    report["wall_s"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
