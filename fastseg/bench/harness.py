"""Measurement machinery shared by every op's benchmark module.

An op module describes its cases (`Case`: what is measured, and how to build a `Workload` of callables);
this module times them, measures memory, checks fastseg against the reference, and turns the numbers into
the rows, results file and table described in shared/notes/results-format.md.

Timing follows the workplace method (device/METHOD.md): on CUDA, triton.testing.do_bench (CUDA events,
warm-up, L2 flushed before every timed call, median); on CPU, time.perf_counter around each call after a
warm-up, median of the repeats.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# do_bench's warm-up and repeat windows, in milliseconds of device time per timed callable.
CUDA_WARMUP_MS = 20
CUDA_REP_MS = 100
# CPU: repeat until this much wall time has passed, within these bounds on the number of repeats; calls slow
# enough to spend CPU_SLOW_BUDGET_S before CPU_MIN_REPEATS stop there (at least 2 repeats: seconds-long
# references such as pydensecrf vary by a few percent, and every repeat costs the run seconds).
CPU_TIME_BUDGET_S = 0.25
CPU_SLOW_BUDGET_S = 2.0
CPU_MIN_REPEATS = 5
CPU_MAX_REPEATS = 200

MB = 1e6
GB = 1e9


# --------------------------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median wall time of one call of `fn`, in milliseconds; `fn` has already been run once (compiled)."""
    if device.type == "cuda":
        from triton.testing import do_bench  # imported here: only the CUDA path needs a Triton driver

        with torch.cuda.device(device):
            return float(do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median"))
    times = []
    start = time.perf_counter()
    while len(times) < 2 or (
        len(times) < CPU_MIN_REPEATS and time.perf_counter() - start < CPU_SLOW_BUDGET_S
    ) or (len(times) < CPU_MAX_REPEATS and time.perf_counter() - start < CPU_TIME_BUDGET_S):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_and_measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn` once on CUDA `device`; return its result and the device memory it allocated at its peak above
    what was already allocated before the call (outputs, workspace, tensors saved for backward, gradients), in
    MB."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, (torch.cuda.max_memory_allocated(device) - before) / MB


def saved_for_backward_bytes(forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while `forward` runs (a storage
    saved twice, or viewed by two saved tensors, counts once). Sees tensors saved through
    ctx.save_for_backward / autograd's own saving; not tensors an autograd.Function stashes on ctx."""
    storage_bytes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storage_bytes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(storage_bytes.values())


# ------------------------------------------------------------------------------------------ ceilings

def measure_ceilings(device: torch.device) -> dict[str, float | None]:
    """The two rooflines of this device, measured now: a large device-to-device copy (GB/s counting bytes
    read plus written) and a large matrix product (TFLOP/s; bf16 on GPU, float32 on CPU), on random data."""
    if device.type == "cuda":
        copy_bytes, matmul_n, matmul_dtype, matmul_key = 1 << 30, 8192, torch.bfloat16, "matmul_bf16_TFLOPs"
    else:
        copy_bytes, matmul_n, matmul_dtype, matmul_key = 1 << 27, 1024, torch.float32, "matmul_fp32_TFLOPs"
    ceilings: dict[str, float | None] = {"copy_GBps": None, matmul_key: None}
    try:
        source = torch.randn(copy_bytes // 4, device=device)
        destination = torch.empty_like(source)
        destination.copy_(source)
        ms = time_ms(lambda: destination.copy_(source), device)
        ceilings["copy_GBps"] = _significant(2 * copy_bytes / (ms * 1e-3) / GB)
        del source, destination
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        torch.matmul(a, b)
        ms = time_ms(lambda: torch.matmul(a, b), device)
        ceilings[matmul_key] = _significant(2 * matmul_n**3 / (ms * 1e-3) / 1e12)
    except Exception as error:  # a missing ceiling must not stop the benchmark; the file says null
        print(f"ceiling measurement failed: {describe_error(error)}", flush=True)
    return ceilings


# --------------------------------------------------------------------------------- cases and rows

@dataclass
class Workload:
    """Inputs already on the device, closed over by callables that each run one timed unit of work."""

    reference: Callable[[], Any]
    fastseg: Callable[[], Any]
    # The fewest bytes fastseg's version must move: each input read once, each output written once
    # (with fastseg's own index encoding). Achieved GB/s = this / fastseg's time.
    fastseg_bytes: int
    # Raises (AssertionError) if fastseg's result is not the reference's result; may return a note for the row
    # (e.g. how closely an approximate result agrees).
    check: Callable[[Any, Any], str | None]
    # Forwards run under autograd whose saved tensors are counted (training cases only).
    reference_forward_for_backward: Callable[[], Any] | None = None
    fastseg_forward_for_backward: Callable[[], Any] | None = None
    # Floating-point operations of one fastseg call, for compute-bound ops (TFLOP/s = this / fastseg's time).
    fastseg_flops: int | None = None
    # Time the reference by the host's clock, not with CUDA events: for references that run on the CPU or end
    # in a host synchronisation (pydensecrf, fastseg's C++ path), whose seconds-long calls do_bench would
    # repeat several more times.
    reference_wall_clock: bool = False


@dataclass
class Case:
    op: str  # results-format op: max_pool2d, max_unpool2d, fused_conv2d, permutohedral_filter, dense_crf, model
    case: str
    dtype: torch.dtype
    layout: str  # "nchw" or "channels_last"
    pass_: str  # forward, backward or train_step
    reference: str
    setup: Callable[[], Workload]
    skip_reason: str | None = None  # set when the case cannot run here (e.g. its reference is not installed)
    target: bool = False  # an issue's target is judged on this row: it runs before the others (a budget keeps it)

    @property
    def label(self) -> str:
        return f"{self.op} | {self.case} | {dtype_name(self.dtype)} | {self.layout} | {self.pass_}"

    def finish_row(self, row: "Row") -> None:
        """Add notes that need the measured times (a group's Case subclass overrides it)."""


@dataclass
class Row:
    """One row of a results file; `as_json` gives exactly the results-format fields, in order."""

    op: str
    case: str
    dtype: str
    layout: str
    pass_: str
    reference: str
    reference_ms: float | None = None
    fastseg_ms: float | None = None
    GBps: float | None = None
    TFLOPs: float | None = None
    peak_memory_MB: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_case(cls, case: Case) -> "Row":
        return cls(case.op, case.case, dtype_name(case.dtype), case.layout, case.pass_, case.reference)

    @property
    def label(self) -> str:
        return f"{self.op} | {self.case} | {self.dtype} | {self.layout} | {self.pass_}"

    @property
    def speedup(self) -> float | None:
        if self.reference_ms is None or self.fastseg_ms is None:
            return None
        return self.reference_ms / self.fastseg_ms

    def as_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "case": self.case,
            "dtype": self.dtype,
            "layout": self.layout,
            "pass": self.pass_,
            "reference": self.reference,
            "reference_ms": _significant(self.reference_ms),
            "fastseg_ms": _significant(self.fastseg_ms),
            "speedup": _significant(self.speedup),
            "GBps": _significant(self.GBps),
            "TFLOPs": _significant(self.TFLOPs),
            "peak_memory_MB": _significant(self.peak_memory_MB),
            "notes": "; ".join(self.notes),
        }


def _significant(value: float | None, digits: int = 4) -> float | None:
    # Four significant digits: finer than run-to-run noise, readable for 0.004 ms and 3000 GB/s alike.
    return None if value is None else float(f"{value:.{digits}g}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_error(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def _release_after_error(device: torch.device) -> None:
    # After an OOM the failed case's blocks are still cached; hand them back so later cases start clean.
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Measurement:
    """What was measured of one side (reference or fastseg) of a case; `error` says where it stopped."""

    ms: float | None = None
    peak_MB: float | None = None
    saved_bytes: int | None = None
    result: Any = None
    error: str | None = None


def measure(
    fn: Callable[[], Any],
    forward_for_backward: Callable[[], Any] | None,
    device: torch.device,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Measurement:
    """Inside `context`: a first call compiles and warms up; then the timing; on CUDA one more call for peak
    memory, whose result is kept for the correctness check (on the CPU, which has no allocator statistics,
    the first call's); then the bytes saved for backward."""
    measurement = Measurement()
    try:
        with context():
            first = fn()
            measurement.ms = time_ms(fn, device)
            if device.type == "cuda":
                measurement.result, measurement.peak_MB = run_and_measure_peak(fn, device)
            else:
                measurement.result = first
            if forward_for_backward is not None:
                measurement.saved_bytes = saved_for_backward_bytes(forward_for_backward)
    except Exception as error:
        measurement.result = None
        _release_after_error(device)
        measurement.error = describe_error(error)
        if os.environ.get("FASTSEG_BENCH_TRACEBACK"):
            traceback.print_exc()
    return measurement


def run_case(case: Case, device: torch.device, fastseg_context: Callable[[], ContextManager]) -> Row:
    """Measure the reference, then fastseg inside `fastseg_context` (its backend choice); check fastseg's
    result against the reference's, and fill the row. Any failure becomes a note; the row is kept."""
    row = Row.for_case(case)
    try:
        workload = case.setup()
    except Exception as error:
        _release_after_error(device)
        row.notes.append(f"setup failed: {describe_error(error)}")
        return row

    reference_device = torch.device("cpu") if workload.reference_wall_clock else device
    reference = measure(workload.reference, workload.reference_forward_for_backward, reference_device)
    fastseg = measure(workload.fastseg, workload.fastseg_forward_for_backward, device, fastseg_context)
    if reference.result is not None and fastseg.result is not None:
        try:
            note = workload.check(reference.result, fastseg.result)
            if isinstance(note, str) and note:  # a check may describe how close the results are
                row.notes.append(note)
        except AssertionError as mismatch:
            row.notes.append(f"MISMATCH vs {case.reference}: {describe_error(mismatch)}")
    fastseg_bytes, fastseg_flops = workload.fastseg_bytes, workload.fastseg_flops
    del workload  # frees the case's inputs and both results before the next case allocates its own
    reference.result = fastseg.result = None

    row.reference_ms, row.fastseg_ms, row.peak_memory_MB = reference.ms, fastseg.ms, fastseg.peak_MB
    if fastseg.error:
        row.notes.append(f"fastseg failed: {fastseg.error}")
    if reference.error:
        row.notes.append(f"reference failed: {reference.error}")
    if fastseg.ms:
        row.GBps = fastseg_bytes / (fastseg.ms * 1e-3) / GB
        if fastseg_flops:
            row.TFLOPs = fastseg_flops / (fastseg.ms * 1e-3) / 1e12
            row.notes.append(f"{row.TFLOPs:.3g} TFLOP/s")
    if fastseg.peak_MB is not None and reference.peak_MB is not None:
        row.notes.append(f"peak {fastseg.peak_MB:.0f} MB vs {case.reference} {reference.peak_MB:.0f} MB")
    if fastseg.saved_bytes is not None and reference.saved_bytes is not None:
        row.notes.append(saved_bytes_note(case.reference, reference.saved_bytes, fastseg.saved_bytes))
    return row


def saved_bytes_note(reference: str, reference_bytes: int, fastseg_bytes: int) -> str:
    change = f" ({(fastseg_bytes / reference_bytes - 1) * 100:+.0f}%)" if reference_bytes else ""
    return f"saved-for-backward {fastseg_bytes / MB:.1f} MB vs {reference} {reference_bytes / MB:.1f} MB{change}"


def skipped_row(case: Case, reason: str) -> Row:
    row = Row.for_case(case)
    row.notes.append(f"skipped: {reason}")
    return row


# ---------------------------------------------------------------------------------- run description

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} ({cpu_count()} cores, torch on {torch.get_num_threads()} threads)"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def card_name(device: str | torch.device) -> str:
    """Short lower-case card name for result file names: h100, h200, a100, ...; cpu-<n>core on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"cpu-{cpu_count()}core"
    words = [w for w in re.split(r"[^a-z0-9]+", device_name(device).lower()) if w and w != "nvidia"]
    for word in words:
        if re.fullmatch(r"[a-z]\d+[a-z]?", word):  # h100, a100, l40s, t4 (not 80gb, sxm5, hbm3)
            return word
    return "-".join(words) or "gpu"


def git_commit() -> str:
    """Short commit of the working tree: git if it answers, else FASTSEG_COMMIT, else "unknown"."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTSEG_COMMIT") or "unknown"


def software_versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from fastseg._version import __version__ as fastseg_version

    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastseg": fastseg_version,
    }


def tests_from_junit(path: str | Path) -> dict[str, int]:
    """passed / failed / skipped counts of a pytest --junitxml file (errors count as failed)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    failed = totals["failures"] + totals["errors"]
    return {"passed": totals["tests"] - failed - totals["skipped"], "failed": failed, "skipped": totals["skipped"]}


def write_results(
    path: str | Path,
    rows: Sequence[Row],
    device: torch.device,
    commit: str,
    ceilings: dict[str, float | None],
    tests: dict[str, int] | None,
) -> None:
    document = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "device": device_name(device),
        "software": software_versions(),
        "ceilings": ceilings,
        "tests": tests,
        "rows": [row.as_json() for row in rows],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------------------- reporting

TABLE_COLUMNS = ("op", "case", "dtype", "layout", "pass", "ref ms", "fastseg ms", "speedup", "GB/s",
                 "%copy-bw", "notes")


def _number(value: float | None, format_spec: str) -> str:
    return "-" if value is None else format(value, format_spec)


def format_table(rows: Iterable[Row], copy_GBps: float | None) -> str:
    lines = []
    for row in rows:
        copy_fraction = row.GBps / copy_GBps * 100 if row.GBps is not None and copy_GBps else None
        lines.append((
            row.op, row.case, row.dtype, row.layout, row.pass_,
            _number(row.reference_ms, ".4f"), _number(row.fastseg_ms, ".4f"), _number(row.speedup, ".2f"),
            _number(row.GBps, ".1f"), _number(copy_fraction, ".0f"), "; ".join(row.notes),
        ))
    widths = [max([len(TABLE_COLUMNS[i])] + [len(line[i]) for line in lines]) for i in range(len(TABLE_COLUMNS) - 1)]
    numeric = set(range(5, 10))

    def render(cells: Sequence[str]) -> str:
        aligned = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])]
        return "  ".join(aligned + [cells[-1]]).rstrip()

    header = render(TABLE_COLUMNS)
    return "\n".join([header, "-" * len(header)] + [render(line) for line in lines])


# Notes that mean the row's numbers cannot be trusted or are missing for a reason other than the time budget.
FAILURE_NOTE_PREFIXES = ("setup failed", "reference failed", "fastseg failed", "MISMATCH")


def row_failed(row: Row) -> bool:
    return any(note.startswith(FAILURE_NOTE_PREFIXES) for note in row.notes)


def progress_line(index: int, total: int, row: Row, seconds: float) -> str:
    reference = _number(row.reference_ms, ".4f")
    fastseg = _number(row.fastseg_ms, ".4f")
    speedup = "" if row.speedup is None else f" ({row.speedup:.2f}x)"
    problems = [note for note in row.notes if note.startswith(FAILURE_NOTE_PREFIXES + ("skipped",))]
    tail = f"  [{'; '.join(problems)}]" if problems else ""
    return f"[{index}/{total}] {row.label}: ref {reference} ms, fastseg {fastseg} ms{speedup}, {seconds:.1f}s{tail}"


def write_speedup_plot(path: str | Path, rows: Sequence[Row], title: str) -> bool:
    """Horizontal bars of fastseg's speedup per row (log scale, 1x marked). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [row for row in rows if row.speedup is not None]
    labels = [row.label for row in measured]
    speedups = [row.speedup for row in measured]
    figure, axes = plt.subplots(figsize=(12, 1.5 + 0.2 * max(len(measured), 1)))
    colours = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    axes.barh(range(len(measured)), speedups, color=colours)
    axes.set_yticks(range(len(measured)), labels, fontsize=6)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("speedup over reference (reference ms / fastseg ms)")
    axes.set_title(title, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
