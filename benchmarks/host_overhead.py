"""Where a small op's time goes on CUDA: host microseconds per call, and a profiler table (a gpu_check step);
then the kernels of one dense CRF call (the README workload) by device time.

The side-by-side benchmark times each call with CUDA events (triton.testing.do_bench). When an op's host work
(Python, dispatch, kernel launch) outlasts its kernel, the events measure the host; this script separates
the two so that the benchmark's small-shape rows can be read:

  host us/call   time to enqueue one call, no synchronization (the CPU side)
  total us/call  the same loop including the final synchronization (max of host and device)
  graph us/call  CUDA-graph replay of the same call: the device time alone

Run: python benchmarks/host_overhead.py   (needs a CUDA device)
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastseg

CALLS = 200


def per_call_us(fn) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return host / CALLS * 1e6, total / CALLS * 1e6


def graph_us(fn) -> float | None:
    """Device time per call from a CUDA graph of CALLS calls (None when the call cannot be captured)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / CALLS
    except Exception as error:  # e.g. a host synchronization inside the call
        print(f"    (no CUDA graph: {type(error).__name__}: {str(error).splitlines()[0][:120]})")
        return None


def grad_mode(case: str):
    return torch.enable_grad() if "f+b" in case else torch.no_grad()


def main() -> None:
    device = torch.device("cuda")
    x = torch.randn(16, 512, 45, 60, device=device, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    grad = torch.randn(16, 512, 22, 30, device=device, dtype=torch.bfloat16)
    conv_x = torch.randn(8, 256, 65, 65, device=device, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=2, dilation=2, bias=False)
    bn = torch.nn.BatchNorm2d(256)
    block = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).to(device, torch.bfloat16, memory_format=torch.channels_last).eval()
    fused = fastseg.nn.ConvBNAct.from_modules(block[0], block[1], block[2]).eval()
    w = block[0].weight.detach()
    from fastseg.ops import max_pool_kernels

    out = torch.empty(16, 512, 22, 30, device=device, dtype=torch.bfloat16)
    offsets = torch.empty(out.shape, device=device, dtype=torch.int8)

    def extension_pool(t):
        with fastseg.backend("extension"):
            return fastseg.max_pool2d(t, 2)

    cases = {
        "max_pool fwd   torch": lambda: F.max_pool2d(x, 2),
        "max_pool fwd   fastseg": lambda: fastseg.max_pool2d(x, 2),
        # H100, 0cad134: at 16x512x45x60 this no-indices call took 0.27 ms, the with-indices one 0.08 ms
        "max_pool fwd   fastseg indices": lambda: fastseg.max_pool2d_with_indices(x, 2),
        "max_pool fwd   custom op": lambda: torch.ops.fastseg.max_pool2d(x, (2, 2), (2, 2), (0, 0), (1, 1), False, False),
        "max_pool fwd   kernel launch": lambda: max_pool_kernels.forward(x, out, offsets, (2, 2), (2, 2), (0, 0), (1, 1)),
        # the same op on the extension's CUDA kernel (a C++ launch instead of Triton's Python launcher)
        "max_pool fwd   extension": lambda: extension_pool(x),
        "max_pool fwd   extension op": lambda: torch.ops.fastseg.ext_max_pool2d_out(
            x, out, offsets, [2, 2], [2, 2], [0, 0], [1, 1]),
        "max_pool f+b   torch": lambda: torch.autograd.grad(F.max_pool2d(xg, 2), xg, grad),
        "max_pool f+b   fastseg": lambda: torch.autograd.grad(fastseg.max_pool2d(xg, 2), xg, grad),
        "conv fwd       torch conv2d": lambda: F.conv2d(conv_x, w, padding=2, dilation=2),
        "conv fwd       fastseg fused_conv2d": lambda: fastseg.fused_conv2d(conv_x, w, None, 1, 2, 2),
        "conv+bn+relu   torch eval": lambda: block(conv_x),
        "conv+bn+relu   fastseg ConvBNAct": lambda: fused(conv_x),
    }
    print(f"{'case':38s} {'host us':>9s} {'total us':>9s} {'graph us':>9s}")
    for name, fn in cases.items():
        with grad_mode(name):
            host, total = per_call_us(fn)
            graphed = graph_us(fn) if "f+b" not in name else None
        print(f"{name:38s} {host:9.1f} {total:9.1f} {graphed if graphed is None else round(graphed, 1)!s:>9s}",
              flush=True)
    for name in ("max_pool f+b   fastseg", "conv+bn+relu   fastseg ConvBNAct"):
        with grad_mode(name):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    cases[name]()
                torch.cuda.synchronize()
        print(f"\nprofile of 10 calls: {name}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    profile_dense_crf(device)


def profile_dense_crf(device: torch.device) -> None:
    """Where one dense CRF call's time goes (the README workload's size: 512x512, 21 labels, 10 iterations):
    wall time, then the kernels by device time."""
    from fastseg.bench.crf import CPU_REFERENCE, PHOTO_KERNELS, crf_workload

    workload = crf_workload(512, device, CPU_REFERENCE)
    workload.fastseg()
    torch.cuda.synchronize()
    start = time.perf_counter()
    workload.fastseg()
    torch.cuda.synchronize()
    print(f"\ndense_crf 512x512, 21 labels, {PHOTO_KERNELS.label}: {(time.perf_counter() - start) * 1e3:.2f} ms "
          "wall (lattice builds included)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        workload.fastseg()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
