"""`python -m fastseg bench`: fastseg against its references, side by side, on one device.

Each group of ops is one module that exposes `cases(device, dtypes, quick) -> list[harness.Case]`; a new op
joins the benchmark by adding its module to OP_GROUPS. The harness times every case, checks fastseg's
result against the reference's, and writes the rows of shared/notes/results-format.md. A group may also expose
`write_plot(path, rows, title, device) -> bool` (False without matplotlib): with `--plot PATH` its own plot is
written beside the speedup plot, as <PATH stem>-<group>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, Sequence
from xml.etree.ElementTree import ParseError

import torch

import fastseg
from fastseg import _backend
from fastseg.bench import harness

# In the order they run (a --budget-s cut drops the last ones): whole networks first (the main job: what
# fastseg.convert.optimize gives a model), then the kernels one by one, the foundation's first.
OP_GROUPS = {
    "models": "fastseg.bench.models",
    "max_pool": "fastseg.bench.max_pool",
    "crf": "fastseg.bench.crf",
    "conv": "fastseg.bench.conv",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Most used first: a run cut short by its time budget loses the last dtype's cases, not whole ops.
GPU_DTYPES = ("bfloat16", "float16", "float32")
CPU_DTYPES = ("float32",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastseg bench",
        description="Time fastseg's ops against their references (torch, ...) and write a results file.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--ops", nargs="+", choices=list(OP_GROUPS), default=list(OP_GROUPS),
                        help="op groups to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help=f"default: {' '.join(GPU_DTYPES)} on GPU, {' '.join(CPU_DTYPES)} on CPU")
    parser.add_argument("--quick", action="store_true", help="few, small cases: a smoke run")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch and fastseg's C++ kernels (torch.set_num_threads); "
                             "default: torch's")
    parser.add_argument("--filter", default="",
                        help="run only cases whose 'op | case | dtype | layout | pass' label contains this text")
    parser.add_argument("--backends", nargs="+", choices=_backend.BACKENDS, default=["auto"],
                        help="fastseg backends to time, each its own rows (default: auto)")
    parser.add_argument("--budget-s", type=float,
                        help="start no case once the cases have run this many seconds; the rest become 'skipped' rows")
    parser.add_argument("--json", metavar="PATH", help="write the results file here")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the speedups here, and beside it <stem>-crf.png (time against image "
                             "size and labels) when the crf group runs (needs matplotlib)")
    parser.add_argument("--commit", help="commit recorded in the results file "
                                         "(default: git rev-parse --short HEAD, else $FASTSEG_COMMIT, else unknown)")
    parser.add_argument("--tests-junit", metavar="PATH", nargs="+",
                        help="pytest --junitxml files whose summed passed/failed/skipped counts go into the results "
                             "file")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    return parser.parse_args(argv)


def collect_cases(ops: Sequence[str], device: torch.device, dtypes: Sequence[torch.dtype], quick: bool,
                  label_filter: str) -> list[harness.Case]:
    cases = []
    for group, op in enumerate(ops):
        group_cases = importlib.import_module(OP_GROUPS[op]).cases(device, dtypes, quick)
        # The rows targets are judged on first, each group's in its own order; then an op's cases in its most used
        # dtype (the CRF's float32 included), torch.compile baselines (minutes of autotuning) after the eager
        # ones: a run cut by --budget-s still measures the targets and every op.
        group_dtypes = [dtype for dtype in dtypes if any(case.dtype == dtype for case in group_cases)]
        cases += [((0, group) if case.target else
                   (1, group_dtypes.index(case.dtype) if case.dtype in group_dtypes else len(dtypes),
                    case.reference.startswith("torch.compile"), group), case) for case in group_cases]
    cases.sort(key=lambda ranked: ranked[0])  # stable: each op keeps its own order within a rank
    return [case for _, case in cases if label_filter in case.label]


def group_plot_path(plot: str, group: str) -> Path:
    """Where a group's own plot goes: beside the speedup plot, its name suffixed with -<group>."""
    path = Path(plot)
    return path.with_name(f"{path.stem}-{group}{path.suffix or '.png'}")


def backend_context(name: str) -> Callable[[], ContextManager]:
    if name == "auto":
        return contextlib.nullcontext
    return lambda: fastseg.backend(name)


def print_header(device: torch.device, commit: str) -> None:
    print(f"fastseg bench on {harness.device_name(device)}, commit {commit}", flush=True)
    print("software: " + ", ".join(f"{k} {v}" for k, v in harness.software_versions().items()), flush=True)
    try:
        print(f"build: {fastseg.build_info()}", flush=True)
    except Exception as error:  # the benchmark still runs (and records failures) without a build
        print(f"build: unavailable ({harness.describe_error(error)})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [DTYPES[name] for name in (args.dtypes or (GPU_DTYPES if device.type == "cuda" else CPU_DTYPES))]
    cases = collect_cases(args.ops, device, dtypes, args.quick, args.filter)
    if args.list:
        print("\n".join(case.label for case in cases))
        return 0
    commit = args.commit or harness.git_commit()
    tests = None
    for path in args.tests_junit or ():
        try:
            counts = harness.tests_from_junit(path)
        except (OSError, ParseError) as error:  # e.g. pytest killed mid-write
            print(f"no test counts from {path}: {harness.describe_error(error)}", flush=True)
            continue
        tests = counts if tests is None else {key: tests[key] + counts[key] for key in counts}

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_header(device, commit)
    ceilings = harness.measure_ceilings(device)
    print(f"ceilings: {ceilings}", flush=True)

    rows: list[harness.Row] = []
    total = len(cases) * len(args.backends)
    start = time.perf_counter()
    interrupted = False  # by Ctrl-C or `timeout --signal=INT`: the cases left are recorded, the file written
    for backend in args.backends:
        context = backend_context(backend)
        for case in cases:
            case_start = time.perf_counter()
            if interrupted:
                row = harness.skipped_row(case, "run interrupted")
            elif args.budget_s is not None and case_start - start > args.budget_s:
                row = harness.skipped_row(case, f"time budget of {args.budget_s:.0f} s spent")
            elif case.skip_reason:
                row = harness.skipped_row(case, case.skip_reason)
            else:
                try:
                    row = harness.run_case(case, device, context)
                    case.finish_row(row)
                except KeyboardInterrupt:
                    interrupted = True
                    row = harness.skipped_row(case, "run interrupted")
            if backend != "auto":
                row.notes.insert(0, f"backend {backend}")
            rows.append(row)
            print(harness.progress_line(len(rows), total, row, time.perf_counter() - case_start), flush=True)

    print()
    print(harness.format_table(rows, ceilings.get("copy_GBps")))
    if args.json:
        harness.write_results(args.json, rows, device, commit, ceilings, tests)
        print(f"results written to {args.json}")
    if args.plot:
        title = f"fastseg {commit} on {harness.device_name(device)}"
        if harness.write_speedup_plot(args.plot, rows, title):
            print(f"plot written to {args.plot}")
        else:
            print("no plot: matplotlib is not installed")
        for op in args.ops:
            write_plot = getattr(importlib.import_module(OP_GROUPS[op]), "write_plot", None)
            if write_plot is None:
                continue
            path = group_plot_path(args.plot, op)
            if write_plot(path, rows, title, device):
                print(f"{op} plot written to {path}")
            else:
                print(f"no {op} plot: matplotlib is not installed")
    failed = [row for row in rows if harness.row_failed(row)]
    if failed:
        print(f"{len(failed)} of {len(rows)} cases failed or mismatched", flush=True)
    if interrupted:
        print("interrupted: the cases not run are 'skipped' rows", flush=True)
    return 1 if failed or interrupted else 0
