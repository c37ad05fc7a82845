"""Lets `pytest benchmarks/` import fastseg from this source tree (an in-place build) without installing it;
an editable install (`pip install -e .`) resolves to the same directory."""

import sys
from pathlib import Path

import torch

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)



def run_benchmark(benchmark, fn, device: torch.device):
    """Time fn under pytest-benchmark and return its result. The first call (compilation, autotuning) is not
    timed; on CUDA every timed call ends with a synchronize, so the host clock sees the device's work."""
    fn()
    if device.type != "cuda":
        return benchmark(fn)

    def synchronized():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return benchmark(synchronized)
