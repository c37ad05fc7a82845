#!/usr/bin/env bash
# Stage what the lent GPU machines cannot install (no internet) for benchmarks/gpu_check.sh: copies this machine's
# installed pydensecrf (pip package pydensecrf2, built for this Python) and pytest-xdist with execnet (pure
# Python) into device_deps/, which git ignores. Pass it to the device tool as carry=["device_deps"];
# gpu_check.sh puts it on PYTHONPATH. Where the device's Python can import them, the CRF benchmark compares
# with pydensecrf itself (else with fastseg on the CPU), and the GPU tests run in several processes (the Triton
# compilations of the convolution tests are CPU-bound).
#
#   bash scripts/device_deps.sh
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=$REPO_ROOT/device_deps

package_dir=$("$PYTHON" -c 'import os, pydensecrf.densecrf as d; print(os.path.dirname(d.__file__))') || {
    echo "device_deps: pydensecrf is not installed here (pip install pydensecrf2)" >&2
    exit 1
}
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r "$package_dir" "$DEST/"
for module in xdist execnet; do
    module_dir=$("$PYTHON" -c "import os, $module; print(os.path.dirname($module.__file__))") || {
        echo "device_deps: $module is not installed here (pip install pytest-xdist)" >&2
        exit 1
    }
    cp -r "$module_dir" "$DEST/"
done
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
echo "device_deps: $(du -sh "$DEST" | cut -f1) in $DEST (pydensecrf for $("$PYTHON" -c 'import sys; print(sys.implementation.cache_tag)'), xdist, execnet)"
