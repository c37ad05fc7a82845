#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100 / H200, no internet, no git metadata): build fastseg._C in place,
# run the GPU tests, run the side-by-side benchmark, and leave in $OUT:
#   gpu_check.log                   everything printed
#   gpu-tests-cuda-kernels.xml, gpu-tests.xml   pytest's junit reports of the GPU tests (two processes)
#   <YYYY-MM-DD>-<card>-<commit>.json / .png   the results file (shared/notes/results-format.md) and its plot
#   <YYYY-MM-DD>-<card>-<commit>-crf.png       the dense CRF's time against image size and number of labels
# The last lines printed are a short summary: a lent device's reply carries only the end of the output.
#
#   FASTSEG_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# (first, on the machine that sends it: bash scripts/device_deps.sh, and carry device_deps: see below.)
#
# Every step runs even when an earlier one failed; the script exits non-zero if any step failed.
# To add a check, add one `run_step NAME COMMAND...` line to main, with a `timeout` that keeps the sum of the
# limits inside the lease (about 8 minutes for the whole script on an H100, leaving time to start a machine).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
OUT=${OUT:-$REPO_ROOT/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

export CUDA_HOME=/usr/local/cuda FASTSEG_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
# The lent machines set CC/CXX to /opt/gcc wrappers that link libstdc++ statically: an extension built that
# way crashes (SIGSEGV) on its first error instead of raising, and setup.py refuses it. Their /usr/bin/g++
# (the same GCC 13.3) links it dynamically.
if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
export PYTHONUNBUFFERED=1 # progress lines reach the log as they happen, and survive a killed step
# References the lent machines cannot install (no internet), staged by scripts/device_deps.sh and carried with
# the working tree (the device tool's carry=["device_deps"]): pydensecrf for the CRF benchmark.
if [[ -d $REPO_ROOT/device_deps ]]; then
    export PYTHONPATH="$REPO_ROOT/device_deps${PYTHONPATH:+:$PYTHONPATH}"
fi

# Wall-clock limits per step, in seconds: a hung step is stopped and recorded, and the later steps still run.
# pytest and the benchmark get SIGINT first, so they still write their junit report / partial results file.
BUILD_LIMIT_S=${BUILD_LIMIT_S:-120}
INFO_LIMIT_S=${INFO_LIMIT_S:-60}
# A whole run takes about 8 minutes (a lent device runs one command for at most 10); the limits cap hung steps.
CUDA_TESTS_LIMIT_S=${CUDA_TESTS_LIMIT_S:-80} # the compiled CUDA kernels' tests (lattice, CRF)
TESTS_LIMIT_S=${TESTS_LIMIT_S:-90}           # every other GPU test
BENCH_LIMIT_S=${BENCH_LIMIT_S:-220}
# The whole script's deadline (the device call's timeout_s is 560): the bench's limit and budget shrink to what
# the earlier steps left, so that a slow step costs bench rows, not the results file and the summary (the steps
# before the bench take about 5 minutes: the bench gets the rest).
TOTAL_LIMIT_S=${TOTAL_LIMIT_S:-540}
SUMMARY_RESERVE_S=25 # the summary, after the bench's SIGINT and its results file
BENCH_WRAP_UP_S=40   # from the budget's end to the limit: the case in flight, the table, the file and the plots
# The benchmark starts no case after this many seconds; the cases left become 'skipped' rows.
BENCH_BUDGET_S=${BENCH_BUDGET_S:-180}
# Groups in order of what a run most needs measured: the CUDA dense CRF (its build and mean field are the
# newest GPU code), the networks (never measured on a GPU yet), then the kernels measured before.
BENCH_GROUPS=(crf models max_pool conv)

COMMIT=${FASTSEG_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
CUDA_TESTS_XML=$OUT/gpu-tests-cuda-kernels.xml
TESTS_XML=$OUT/gpu-tests.xml
STEP_LINES=()
FAILED_STEPS=0

# run_step NAME COMMAND...: run COMMAND, record its exit status and duration, never stop the script.
run_step() {
    local name=$1 start=$SECONDS rc=0
    shift
    echo
    echo "=== [$name] $*"
    "$@" || rc=$?
    local status=ok
    if ((rc != 0)); then
        status="FAILED (exit $rc)"
        FAILED_STEPS=$((FAILED_STEPS + 1))
    fi
    STEP_LINES+=("$(printf '%-12s %-18s %5ds' "$name" "$status" $((SECONDS - start)))")
    echo "=== [$name] $status after $((SECONDS - start))s"
}

print_environment() { # each line printed even when another fails; the step fails if any did
    local rc=0
    nvidia-smi -L || rc=$?
    "$PYTHON" -c 'import sys, torch, triton
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, device {torch.cuda.get_device_name()}")' || rc=$?
    "$CUDA_HOME/bin/nvcc" --version | tail -n 2 || rc=$?
    "$PYTHON" -c 'import pydensecrf.densecrf; print("pydensecrf: importable (the CRF reference)")' 2>/dev/null ||
        echo "pydensecrf: not importable (carry device_deps from scripts/device_deps.sh): fastseg CPU is the reference"
    return "$rc"
}

build_extension() {
    timeout "$BUILD_LIMIT_S" "$PYTHON" setup.py build_ext --inplace
}

show_info() {
    timeout "$INFO_LIMIT_S" "$PYTHON" -m fastseg info
}

# An extension built by the lent machines' /opt/gcc wrapper crashed (SIGSEGV) on its first TORCH_CHECK failure:
# the wrapper links libstdc++ statically (see the CC/CXX choice above; setup.py now refuses such a build).
# Each probe runs in a child process (faulthandler on): a valid and a failing call, on CPU and CUDA.
probe_call() { # probe_call DEVICE valid|invalid: one call of ext_max_pool2d_out
    (cd "$REPO_ROOT" && timeout "$INFO_LIMIT_S" "$PYTHON" -X faulthandler - "$1" "$2" <<'PY'
import sys, torch, fastseg
device, kind = sys.argv[1], sys.argv[2]
print(f"{device} {kind}: fastseg from {fastseg.__file__}", flush=True)
x = torch.randn(1, 1, 4, 4, device=device)
size = 2 if kind == "valid" else 3  # a 2x2/2 pool of 4x4 is 2x2
out = torch.empty(1, 1, size, size, device=device)
argmax = torch.empty(1, 1, size, size, dtype=torch.int8, device=device)
try:
    torch.ops.fastseg.ext_max_pool2d_out(x, out, argmax, [2, 2], [2, 2], [0, 0], [1, 1])
    print(f"{device} {kind}: returned", flush=True)
    sys.exit(0 if kind == "valid" else 1)
except RuntimeError as err:
    print(f"{device} {kind}: raised: {str(err).splitlines()[0]}", flush=True)
    sys.exit(0 if kind == "invalid" else 1)
PY
    )
}

probe_error_path() {
    local rc=0 device kind status
    echo "CC=${CC:-unset} CXX=${CXX:-unset}: $(${CXX:-c++} --version | head -n 1)"
    for device in cpu cuda; do
        for kind in valid invalid; do
            status=0
            probe_call "$device" "$kind" || status=$?
            echo "probe $device $kind: exit $status"
            ((status == 0)) || rc=1
        done
    done
    return "$rc"
}

# The GPU tests run in two pytest processes: first those of the compiled CUDA kernels that no CPU test can run
# (the lattice and the dense CRF), so that a run cut by its time limit still reports them, and so that a fault
# in them (an illegal memory access leaves the process's CUDA context unusable) cannot fail the other tests;
# then every other test file.
CUDA_KERNEL_TESTS=(tests/test_lattice.py tests/test_crf.py tests/test_crf_fused.py)
GPU_TEST_ORDER=(tests/test_max_pool.py tests/test_conv.py)

other_test_files() {
    local file
    printf '%s\n' "${GPU_TEST_ORDER[@]}"
    for file in tests/test_*.py; do
        [[ " ${CUDA_KERNEL_TESTS[*]} ${GPU_TEST_ORDER[*]} " == *" $file "* ]] || echo "$file"
    done
}

# pytest-xdist, where the device has it (its image does): the GPU tests in GPU_TEST_WORKERS processes (their
# time goes mostly to Triton compilations, which are CPU-bound; each process has its own CUDA context, so a
# fault in one worker fails its tests, not the others').
GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-4}
xdist_args() {
    # grep without -q reads the whole help: -q would exit at the first match, pytest would die of SIGPIPE, and
    # pipefail would count that as no match.
    if "$PYTHON" -m pytest --help 2>/dev/null | grep -- '--numprocesses' >/dev/null; then
        echo "-n $GPU_TEST_WORKERS"
    fi
}

# run_pytest LIMIT JUNIT FILES...: the GPU-marked tests of FILES (named one by one: given the tests folder as
# well, pytest runs everything in the folder's order).
run_pytest() {
    local limit=$1 junit=$2 parallel
    shift 2
    rm -f "$junit" # a report left by an earlier run must not be counted as this one's
    parallel=$(xdist_args)
    echo "pytest workers: ${parallel:-none (pytest-xdist not importable)}"
    # shellcheck disable=SC2086 # $parallel is a list of options
    timeout --signal=INT --kill-after=15 "$limit" \
        "$PYTHON" -m pytest -m gpu $parallel "$@" -q -rs --continue-on-collection-errors --junitxml="$junit"
}

run_gpu_tests() {
    local files rc=0
    run_pytest "$CUDA_TESTS_LIMIT_S" "$CUDA_TESTS_XML" "${CUDA_KERNEL_TESTS[@]}" || rc=$?
    mapfile -t files < <(other_test_files)
    run_pytest "$TESTS_LIMIT_S" "$TESTS_XML" "${files[@]}" || rc=$?
    return "$rc"
}

# Short lower-case card name (h100, h200) for the results file name; "gpu" if fastseg cannot be imported.
card_name() {
    "$PYTHON" -c 'from fastseg.bench.harness import card_name; print(card_name("cuda"))' 2>/dev/null || echo gpu
}

run_benchmark() {
    local tests_args=() junit
    for junit in "$CUDA_TESTS_XML" "$TESTS_XML"; do
        [[ -f $junit ]] && tests_args+=("$junit")
    done
    ((${#tests_args[@]} == 0)) || tests_args=(--tests-junit "${tests_args[@]}")
    local limit=$BENCH_LIMIT_S budget=$BENCH_BUDGET_S left=$((TOTAL_LIMIT_S - SECONDS - SUMMARY_RESERVE_S))
    if ((left < limit)); then # at least the target rows' worth, even late
        limit=$((left > 2 * BENCH_WRAP_UP_S ? left : 2 * BENCH_WRAP_UP_S))
    fi
    if ((limit - BENCH_WRAP_UP_S < budget)); then
        budget=$((limit - BENCH_WRAP_UP_S))
    fi
    echo "bench: limit ${limit}s, budget ${budget}s (${SECONDS}s of the script's ${TOTAL_LIMIT_S}s spent)"
    timeout --signal=INT --kill-after=15 "$limit" \
        "$PYTHON" -m fastseg bench --ops "${BENCH_GROUPS[@]}" --budget-s "$budget" --commit "$COMMIT" \
        --json "$RESULTS_STEM.json" --plot "$RESULTS_STEM.png" "${tests_args[@]}"
}

print_summary() {
    echo
    echo "===================================== gpu_check summary ====================================="
    if [[ -f $RESULTS_STEM.json ]]; then
        "$PYTHON" -m fastseg.bench.summary "$RESULTS_STEM.json" || echo "(could not summarize the results file)"
        echo "results file: $RESULTS_STEM.json"
        echo "  -> commit it as benchmarks/results/$(basename "$RESULTS_STEM.json")"
    else
        echo "no results file was written"
    fi
    echo "logs: $OUT/gpu_check.log, tests: $CUDA_TESTS_XML $TESTS_XML"
    printf '%-12s %-18s %6s\n' step status time
    printf '%s\n' "${STEP_LINES[@]}"
    if ((FAILED_STEPS > 0)); then
        echo "gpu_check: $FAILED_STEPS step(s) FAILED"
    else
        echo "gpu_check: all steps passed"
    fi
}

main() {
    echo "gpu_check of fastseg commit $COMMIT in $REPO_ROOT, output in $OUT"
    run_step environment print_environment
    run_step build build_extension
    run_step info show_info
    run_step error-path probe_error_path
    run_step overhead env PYTHONPATH="$REPO_ROOT" timeout "$INFO_LIMIT_S" "$PYTHON" benchmarks/host_overhead.py
    run_step gpu-tests run_gpu_tests
    RESULTS_STEM=$OUT/$(date -u +%F)-$(card_name)-$COMMIT
    run_step bench run_benchmark
    print_summary
    ((FAILED_STEPS == 0))
}

status=0
main 2>&1 | tee "$OUT/gpu_check.log" || status=$?
exit "$status"
