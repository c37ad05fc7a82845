#!/usr/bin/env bash
# Stage what the lent GPU machines cannot install (no internet) for benchmarks/gpu_check.sh: pydensecrf (pip
# package pydensecrf2), the CRF reference, into device_deps/, which git ignores. Pass it to the device tool as
# carry=["device_deps"]; gpu_check.sh puts it on PYTHONPATH, and where the device's Python imports it the CRF
# benchmark and the DeepLab + CRF pipeline compare with pydensecrf itself (else with fastseg on the CPU).
#
# The device's python3 is 3.12 (/work/.library/device/KINDS.md), this machine's 3.11: the package is this
# machine's install plus its extension modules built for the device's Python (DEVICE_PYTHON, found here through
# pyenv), side by side (each Python loads the .so of its own ABI tag). pytest-xdist is not staged: the device
# has its own, matched to its pytest.
#
#   bash scripts/device_deps.sh
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE_PYTHON=${DEVICE_PYTHON:-python3.12}
PYDENSECRF=pydensecrf2==1.1
DEST=$REPO_ROOT/device_deps

package_dir=$("$PYTHON" -c 'import os, pydensecrf.densecrf as d; print(os.path.dirname(d.__file__))') || {
    echo "device_deps: pydensecrf is not installed here (pip install $PYDENSECRF)" >&2
    exit 1
}
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r "$package_dir" "$DEST/"

# The first interpreter for the device's version that runs here (a pyenv shim is on PATH but may not run).
device_python=
for candidate in "$DEVICE_PYTHON" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    if "$candidate" -c pass >/dev/null 2>&1; then
        device_python=$candidate
        break
    fi
done
device_tag=none
if [[ -n $device_python ]]; then
    DEVICE_PYTHON=$device_python
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    echo "device_deps: building $PYDENSECRF for $DEVICE_PYTHON (about a minute)"
    if "$DEVICE_PYTHON" -m pip wheel -q --no-deps "$PYDENSECRF" -w "$build" >"$build/log" 2>&1; then
        (cd "$build" && "$PYTHON" -m zipfile -e ./*.whl unpacked)
        cp "$build"/unpacked/pydensecrf/*.so "$DEST/pydensecrf/"
        device_tag=$("$DEVICE_PYTHON" -c 'import sys; print(sys.implementation.cache_tag)')
    else
        tail -5 "$build/log" >&2
        echo "device_deps: the build for $DEVICE_PYTHON failed: the device will use fastseg's CPU CRF as reference" >&2
    fi
else
    echo "device_deps: no $DEVICE_PYTHON here: pydensecrf is staged for this Python only" >&2
fi
# Debug sections are most of the extensions' size (the working tree that travels is limited to 64 MiB).
strip --strip-debug "$DEST"/pydensecrf/*.so 2>/dev/null || true
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
echo "device_deps: $(du -sh "$DEST" | cut -f1) in $DEST (pydensecrf for" \
    "$("$PYTHON" -c 'import sys; print(sys.implementation.cache_tag)') and $device_tag)"
