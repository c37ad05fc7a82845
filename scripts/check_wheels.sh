#!/usr/bin/env bash
# Build the CPU wheel and a CUDA wheel (one architecture, to keep it quick), install each into a fresh virtual
# environment with only torch in it, and check the installed fastseg outside the source tree: it imports,
# `python -m fastseg info` reports the build it should (+cpu / +cuXY, cuda_kernels False / True), and every
# op runs on the CPU (scripts/wheel_smoke.py).
#
#   scripts/check_wheels.sh [--wheels DIR]   (DIR: check the wheels already there instead of building them)
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), CUDA_HOME
# (default /usr/local/cuda), KEEP=1 keeps the work directory.
# Each wheel gets its own fresh virtual environment holding only torch (the release installed for PYTHON,
# pip install torch==<its version>) and its dependencies, then the wheel with its dependencies. torch is
# installed once, into a template venv; each wheel's venv is a hard-linked copy of it (cp -al: nothing in
# it is modified, pip only adds files), which saves a ~5.5 GB torch install per wheel.
# Timing, 2-core CPU machine, torch 2.14.1 from local disk, shared with other builds and test runs: 15 min
# (sdist 24 s, CPU wheel 6 min, cu130 wheel for 9.0 6.5 min, torch venv 1 min, each wheel's check 15-20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

wheels=
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$(cd "$2" && pwd); shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "check_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

work=$(mktemp -d "${TMPDIR:-/tmp}/fastseg-check.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }

if [ -z "$wheels" ]; then
    scripts/build_wheels.sh --outdir "$work/dist"
    wheels=$work/dist
    echo "== wheels built at $(elapsed)"
fi

torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
cuda_tag=$("$PY" - <<'PYEOF'
import re, subprocess, os
out = subprocess.check_output([os.environ["CUDA_HOME"] + "/bin/nvcc", "--version"], text=True)
major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
print(f"cu{major}{minor}")
PYEOF
)
pip_quiet() {  # pip install, its output in a log shown only on failure (the local index warns a lot)
    local py=$1; shift
    "$py" -m pip install --disable-pip-version-check "$@" >"$work/pip.log" 2>&1 || { tail -30 "$work/pip.log"; return 1; }
}
template=$work/venv-torch
"$PY" -m venv "$template"
pip_quiet "$template/bin/python" "torch==$torch_version"
echo "== torch $torch_version installed in a template venv at $(elapsed)"

status=0
for variant in cpu "$cuda_tag"; do
    whl=$(ls "$wheels"/fastseg-*+"$variant"-*.whl 2>/dev/null | grep -v /raw/ | head -1 || true)
    if [ -z "$whl" ]; then echo "check_wheels.sh: no +$variant wheel in $wheels" >&2; status=1; continue; fi
    echo "== $variant: $(basename "$whl")"
    venv=$work/venv-$variant
    cp -al "$template" "$venv"
    pip_quiet "$venv/bin/python" "$whl"
    echo "   installed into a fresh venv (torch only) at $(elapsed)"
    cuda_kernels=$([ "$variant" = cpu ] && echo 0 || echo 1)
    # outside the source tree, so that `import fastseg` can only find the installed wheel
    (cd "$work" && "$venv/bin/python" "$ROOT/scripts/wheel_smoke.py" --variant "$variant" --cuda-kernels "$cuda_kernels") \
        | sed 's/^/   /' || status=1
    info=$(cd "$work" && "$venv/bin/python" -m fastseg info) || { echo "$info"; status=1; }
    expect_kernels=$([ "$variant" = cpu ] && echo False || echo True)
    for want in "fastseg 0.*+$variant" "cuda_kernels: $expect_kernels" "extension_loaded: True" "extension_error: None" \
                "torch_version: $torch_version"; do
        if echo "$info" | grep -q -- "$want"; then echo "   ok  python -m fastseg info: $want"
        else echo "   FAILED: python -m fastseg info lacks '$want':"; echo "$info" | sed 's/^/      /'; status=1; fi
    done
    rm -rf "$venv"
    echo "   done at $(elapsed)"
done
[ $status = 0 ] && echo "== check_wheels.sh: all ok in $(elapsed)" || echo "== check_wheels.sh: FAILED after $(elapsed)"
exit $status
