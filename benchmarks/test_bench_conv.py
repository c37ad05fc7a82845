"""pytest-benchmark: eager conv -> BatchNorm -> ReLU against fastseg's fused convolution (ConvBNAct, eval).

    pytest benchmarks/test_bench_conv.py                           # time them (tiny on CPU, network sizes on CUDA)
    pytest benchmarks/test_bench_conv.py --benchmark-disable -q    # run each once: fastseg checked against torch

Host-clock timings (on CUDA each call ends with a synchronize); the figures to quote come from
`python -m fastseg bench --ops conv`, which also times torch.compile(mode="max-autotune") and reports TFLOP/s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _run_interpreted(source: str, tmp_path: Path):
    """Run `source` in a child process under Triton's interpreter (this folder's tests run without it) and return
    the JSON its last output line holds."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(conv.__file__).parents[2]), env.get("PYTHONPATH")]))
    script = tmp_path / "script.py"  # a file: @triton.jit reads its functions' source
    script.write_text(source)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


TRITON_TRAIN_STEP = r"""
import json, torch
from fastseg.bench import conv
from fastseg.ops import conv_backward_kernels, conv_kernels

calls = []
for module, name in ((conv_kernels, "forward"), (conv_backward_kernels, "input_grad"),
                     (conv_backward_kernels, "weight_grad")):
    kernel = getattr(module, name)
    setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
shape = conv.ConvShape("tiny", 1, 8, 8, 9, dilation=2)
results = {}
for backend in ("auto", "triton"):
    calls.clear()
    workload = conv.conv_workload(shape, torch.float32, "channels_last", torch.device("cpu"), conv.EAGER, True, backend)
    note = workload.check(workload.reference(), workload.fastseg())
    results[backend] = {"calls": sorted(set(calls)), "note": note}
print(json.dumps(results))
"""


def test_training_rows_run_the_triton_backward_under_its_backend(tmp_path):
    """The ", Triton backward" training rows time the Triton forward and backward kernels, the plain training rows
    "auto"'s (on the CPU: the reference, torch's backward); both check against eager. Under Triton's
    interpreter, in a child process."""
    results = _run_interpreted(TRITON_TRAIN_STEP, tmp_path)
    assert results["triton"]["calls"] == ["forward", "input_grad", "weight_grad"], results
    assert results["auto"]["calls"] == [], results
    assert all(r["note"].startswith("max rel diff") for r in results.values()), results


LOOP_ORDERS = r"""
import json, torch
from fastseg.bench import conv
from fastseg.ops import conv_kernels

orders = []
kernel = conv_kernels.forward
conv_kernels.forward = lambda *a, **kw: orders.append(kw.get("loop_order")) or kernel(*a, **kw)
shape = conv.ConvShape("tiny", 1, 8, 8, 9, dilation=2)
workload = conv.conv_workload(shape, torch.float32, "channels_last", torch.device("cpu"), conv.EAGER, False,
                              loop_orders=True)
note = workload.check(workload.reference(), workload.fastseg())
print(json.dumps({"orders": sorted(set(orders)), "note": note}))
"""


def test_target_rows_time_both_loop_orders(tmp_path):
    """The target forward rows' notes give the Triton kernel's time in each loop order of its implicit GEMM (the
    data behind conv_kernels.taps_outer), the default marked. Under Triton's interpreter, in a child process."""
    result = _run_interpreted(LOOP_ORDERS, tmp_path)
    assert result["orders"] == ["flat", "taps_outer"], result
    assert "; Triton kernel alone: taps-outer " in result["note"], result
    assert " ms, flat " in result["note"] and result["note"].endswith(" ms (default)"), result  # 8 channels: flat
    timed = [case for case in conv.cases(torch.device("cuda"), [torch.bfloat16], quick=False)
             if case.setup.keywords.get("loop_orders")]
    assert {case.setup.args[0] for case in timed} == conv.TARGETS and all(case.target for case in timed)


def test_auto_summary(monkeypatch):
    """What "auto" chose for the problems timed since a snapshot of its choices: counts and summed times."""
    from fastseg.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_auto_choices", {"a": "cudnn", "b": "triton", "c": "cudnn_fused"})
    monkeypatch.setattr(conv_ops, "_auto_timings", {"a": {"triton": 2.0, "cudnn": 1.0, "cudnn_fused": 3.0},
                                                    "b": {"triton": 0.5, "cudnn": 0.75},
                                                    "c": {"triton": 4.0, "cudnn": 5.0, "cudnn_fused": 2.0}})
    assert conv.auto_summary({"a"}) == ("auto: 2 convolution problems, kept 1 triton, 1 cudnn_fused; per call over "
                                        "them 2.5 ms chosen, 5.75 ms cuDNN, 4.5 ms Triton")
    assert conv.auto_summary({"a", "b", "c"}) == ""
