"""pytest-benchmark: eager conv -> BatchNorm -> ReLU against fastseg's fused convolution (ConvBNAct, eval).

    pytest benchmarks/test_bench_conv.py                           # time them (tiny on CPU, network sizes on CUDA)
    pytest benchmarks/test_bench_conv.py --benchmark-disable -q    # run each once: fastseg checked against torch

Host-clock timings (on CUDA each call ends with a synchronize); the figures to quote come from
`python -m fastseg bench --ops conv`, which also times torch.compile(mode="max-autotune") and reports TFLOP/s.
"""

import pytest
import torch

from fastseg.bench import conv
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if DEVICE.type == "cuda":
    SHAPES = [conv.ASPP[0], conv.FC6[0], conv.RESNET[0], conv.RESNET[1], conv.UNET[1]]
else:
    SHAPES = list(conv.CPU_SHAPES)
IMPLEMENTATIONS = ("torch", "fastseg")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", ["channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_fused_conv2d(benchmark, shape, layout, implementation):
    workload = conv.conv_workload(shape, DTYPE, layout, DEVICE, conv.EAGER, False)
    benchmark.group = f"fused_conv2d {shape.label()} {layout}"
    benchmark.extra_info["flops"] = shape.flops()
    fn = workload.fastseg if implementation == "fastseg" else workload.reference
    result = run_benchmark(benchmark, fn, DEVICE)
    if implementation == "fastseg":
        workload.check(workload.reference(), result)
