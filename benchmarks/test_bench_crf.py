"""pytest-benchmark: pydensecrf (or, without it on a GPU machine, fastseg on the CPU) against fastseg.dense_crf.

    pytest benchmarks/test_bench_crf.py                           # time them
    pytest benchmarks/test_bench_crf.py --benchmark-disable -q    # run each once, agreement checked

The README workload (21 labels, 10 iterations, Gaussian 3/3 + bilateral 80/13/10): 256x256 on the CPU,
256x256 and 512x512 on CUDA. Host-clock timings; the figures to quote come from `python -m fastseg bench`.
"""

import pytest
import torch

from fastseg.bench import crf
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (256, 512) if DEVICE.type == "cuda" else (256,)
if crf.pydensecrf_available():
    REFERENCE = crf.REFERENCE
elif DEVICE.type == "cuda":
    REFERENCE = "fastseg-cpu"
else:
    REFERENCE = None


@pytest.mark.skipif(REFERENCE is None, reason="pydensecrf is not installed (pip install pydensecrf2)")
@pytest.mark.parametrize("implementation", ["reference", "fastseg"])
@pytest.mark.parametrize("size", SIZES)
def test_dense_crf(benchmark, size, implementation):
    benchmark.group = f"dense_crf {size}x{size}, {crf.LABELS} labels, {crf.ITERATIONS} it"
    workload = crf.crf_workload(size, DEVICE, REFERENCE)
    result = run_benchmark(benchmark, workload.reference if implementation == "reference" else workload.fastseg, DEVICE)
    if implementation == "fastseg":
        workload.check(workload.reference(), result)
