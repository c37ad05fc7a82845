"""pytest-benchmark: torch.nn.functional against fastseg for max_pool2d and max_unpool2d.

    pytest benchmarks/                           # time them (small sizes on CPU, network sizes on CUDA)
    pytest benchmarks/ --benchmark-disable -q    # run each once: a smoke test, fastseg checked against torch

torch and fastseg of one case share a benchmark group, so pytest-benchmark prints them side by side.
These are host-clock timings (on CUDA each call ends with a synchronize); the figures to quote come from
`python -m fastseg bench`, which times on the device with the L2 cache flushed and measures the ceilings.
"""

import pytest
import torch

from fastseg.bench import max_pool
from fastseg.bench.max_pool import FORWARD, FORWARD_BACKWARD, FORWARD_WITH_INDICES, HALVING, RESNET_STEM
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if DEVICE.type == "cuda":
    # U-Net's first pool, SegNet's last (odd height), a ResNet stem on a 512x512 crop.
    POOLS = [((16, 64, 568, 568), HALVING), ((16, 512, 45, 60), HALVING), ((16, 64, 256, 256), RESNET_STEM)]
    UNPOOL_SHAPES = [(16, 64, 360, 480), (16, 512, 45, 60)]
else:
    POOLS = [((2, 64, 64, 64), HALVING), ((2, 512, 11, 15), HALVING), ((2, 64, 32, 32), RESNET_STEM)]
    UNPOOL_SHAPES = [(2, 64, 64, 64), (2, 512, 11, 15)]
IMPLEMENTATIONS = ("torch", "fastseg")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", [FORWARD, FORWARD_WITH_INDICES, FORWARD_BACKWARD])
@pytest.mark.parametrize("layout", max_pool.LAYOUTS)
@pytest.mark.parametrize("shape, window", POOLS, ids=[f"{max_pool.format_shape(s)}-{w}" for s, w in POOLS])
def test_max_pool2d(benchmark, shape, window, layout, mode, implementation):
    workload = max_pool.max_pool_workload(shape, DTYPE, layout, DEVICE, window, mode)
    benchmark.group = f"max_pool2d {max_pool.format_shape(shape)} {window} {layout} {mode}"
    benchmark.extra_info["fastseg_min_bytes"] = workload.fastseg_bytes
    fn = workload.fastseg if implementation == "fastseg" else workload.reference
    result = run_benchmark(benchmark, fn, DEVICE)
    if implementation == "fastseg":
        workload.check(workload.reference(), result)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", max_pool.LAYOUTS)
@pytest.mark.parametrize("shape", UNPOOL_SHAPES, ids=max_pool.format_shape)
def test_max_unpool2d(benchmark, shape, layout, implementation):
    workload = max_pool.max_unpool_workload(shape, DTYPE, layout, DEVICE)
    benchmark.group = f"max_unpool2d {max_pool.format_shape(shape)} {layout}"
    benchmark.extra_info["fastseg_min_bytes"] = workload.fastseg_bytes
    fn = workload.fastseg if implementation == "fastseg" else workload.reference
    result = run_benchmark(benchmark, fn, DEVICE)
    if implementation == "fastseg":
        workload.check(workload.reference(), result)
