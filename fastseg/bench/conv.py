"""Fused convolution: eager conv -> BatchNorm -> ReLU (and torch.compile of it) against fastseg's one kernel.

Shapes (issue 4): DeepLab-v3 ASPP branches (2048->256, 3x3, dilation 12/24/36, 65x65 and 33x33, batch 8 and
16); DeepLab-v1 LargeFOV fc6 (512->1024, 3x3, dilation 12, 41x41: a 321x321 crop at output stride 8);
ResNet-101 layer3/layer4 dilated 3x3 at output stride 8 (256->256 d=2, 512->512 d=4, 65x65); U-Net's 3x3
convolutions (64 to 1024 channels, 570x570 down to 30x30 inputs, valid padding).

Passes:
- forward (inference): eager nn.Conv2d -> nn.BatchNorm2d (eval) -> nn.ReLU with cudnn.benchmark=True, and on
  CUDA torch.compile(mode="max-autotune") of the same block, each its own reference row, against
  fastseg.nn.ConvBNAct in eval mode (the BatchNorm folded into the kernel: one launch).
- train_step (forward + backward, training-mode BatchNorm) on a few shapes: the same blocks in training mode
  against ConvBNAct in training mode (fused conv without epilogue, torch's BatchNorm). The backward of the
  convolution follows the backend: torch's (cuDNN) under auto, the Triton backward kernels under triton. On
  CUDA each training shape has both rows (", Triton backward": the step under fastseg.backend("triton"),
  forward and backward kernels Triton's), so one run measures the hand-written backward against cuDNN's.

The first fastseg call of each forward case on CUDA (Triton compilation and autotuning, and under "auto" the
timing of the Triton kernel against cuDNN with the BatchNorm folded; cached per shape afterwards) is timed
apart and reported in the notes, with the implementation "auto" kept and the candidates' times it chose by
(``--backends triton`` times the Triton kernel alone). The target forward rows' notes also time the Triton
kernel alone in each loop order of its implicit GEMM (conv_kernels.taps_outer: the threshold is set from them).
TFLOP/s counts the convolution's 2*N*K*OH*OW*C*kh*kw floating-point operations (three times that for
train_step: forward, input gradient, weight gradient).
On a CPU only a tiny smoke set runs, against eager only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

import fastseg
from fastseg.bench import backend_context
from fastseg.bench.harness import Case, Workload
from fastseg.ops import conv as conv_ops

EAGER = "torch eager conv+bn+relu"
AUTO_NAMES = {"triton": "the Triton kernel", "cudnn": "cuDNN (BatchNorm folded)",
              "cudnn_fused": "cuDNN's conv+bias+ReLU fusion (BatchNorm folded)"}
COMPILED = "torch.compile max-autotune"
# Relative tolerance on max |fastseg - torch| / max |torch| (float16 / bfloat16 rounding, TF32 in float32).
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 5e-3, torch.float64: 1e-6}


@dataclass(frozen=True)
class ConvShape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int  # square input, H = W
    kernel: int = 3
    dilation: int = 1
    padding: int | None = None  # None: "same"-sized (dilation * (kernel - 1) / 2)

    @property
    def pad(self) -> int:
        return self.dilation * (self.kernel - 1) // 2 if self.padding is None else self.padding

    @property
    def out_size(self) -> int:
        return self.size + 2 * self.pad - self.dilation * (self.kernel - 1)

    def flops(self) -> int:
        return 2 * self.batch * self.out_channels * self.out_size**2 * self.in_channels * self.kernel**2

    def label(self) -> str:
        return (f"{self.name} {self.batch}x{self.in_channels}x{self.size}x{self.size} -> {self.out_channels}, "
                f"{self.kernel}x{self.kernel} d{self.dilation} p{self.pad}")


ASPP = tuple(ConvShape(f"aspp d{d}", b, 2048, 256, s, dilation=d)
             for b in (8, 16) for s in (65, 33) for d in (12, 24, 36))
FC6 = (ConvShape("deeplab-v1 fc6", 8, 512, 1024, 41, dilation=12),)
RESNET = (ConvShape("resnet layer3", 8, 256, 256, 65, dilation=2),
          ConvShape("resnet layer4", 8, 512, 512, 65, dilation=4))
UNET = tuple(ConvShape(f"unet {c}", 4, c, c, s, padding=0)
             for c, s in ((64, 570), (128, 282), (256, 138), (512, 66), (1024, 30)))
QUICK = {"aspp d12", "deeplab-v1 fc6", "resnet layer3", "unet 512"}
# torch.compile(max-autotune) takes tens of seconds to tune each shape: it is the reference for one shape per
# family (the first of each name here), eager for all.
COMPILED_SET = {"aspp d12", "deeplab-v1 fc6", "resnet layer3", "resnet layer4", "unet 256"}
TRAIN = {"aspp d12", "resnet layer3", "unet 128"}
# The rows issue 4's targets are judged on first (a GPU run's budget keeps them): bfloat16 channels_last against
# eager, one shape per family: an ASPP branch at 65x65 and at 33x33 (split-K), fc6, the dilated layer4, a U-Net
# layer; and one training step with the Triton backward kernels (the ASPP branch). About 5 s each (the first
# call compiles and autotunes; the training row's kernels about 15 s).
TARGETS = {ASPP[0], ASPP[3], FC6[0], RESNET[1], UNET[2]}
TARGET_TRAIN = ASPP[0]
TARGET_DTYPE = torch.bfloat16
TRITON_BACKWARD = ", Triton backward"
# CPU smoke set: small enough for `python -m fastseg bench` to stay fast.
CPU_SHAPES = (ConvShape("aspp-like d6", 1, 64, 32, 17, dilation=6),
              ConvShape("unet-like", 1, 32, 32, 30, padding=0))


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    if device.type != "cuda":
        shapes, references, layouts = CPU_SHAPES, (EAGER,), ("channels_last",)
        train = ()
    else:
        shapes = ASPP + FC6 + RESNET + UNET
        if quick:
            shapes = _first_of_each(shapes, QUICK)
        references, layouts = (EAGER, COMPILED), ("channels_last", "nchw")
        train = _first_of_each(shapes, TRAIN)
    found = []
    for dtype in dtypes:
        for layout in layouts:
            # NCHW only for the first ASPP shape: the targets are channels_last.
            layout_shapes = shapes if layout == "channels_last" else shapes[:1]
            for reference in references:
                if reference == COMPILED:
                    layout_shapes = _first_of_each(layout_shapes, COMPILED_SET)
                for shape in layout_shapes:
                    label = shape.label() + (", vs torch.compile" if reference == COMPILED else "")
                    target = (shape in TARGETS and dtype == TARGET_DTYPE and layout == "channels_last"
                              and reference == EAGER)
                    found.append(Case(op="fused_conv2d", case=label, dtype=dtype, layout=layout,
                                      pass_="forward", reference=reference,
                                      setup=functools.partial(conv_workload, shape, dtype, layout, device,
                                                              reference, False, loop_orders=target),
                                      target=target))
        for shape in train:
            for backend in ("auto", "triton"):
                label = shape.label() + ", training" + (TRITON_BACKWARD if backend == "triton" else "")
                found.append(Case(
                    op="fused_conv2d", case=label, dtype=dtype, layout="channels_last", pass_="train_step",
                    reference=EAGER, target=backend == "triton" and shape == TARGET_TRAIN and dtype == TARGET_DTYPE,
                    setup=functools.partial(conv_workload, shape, dtype, "channels_last", device, EAGER, True,
                                            backend)))
    return found


def _first_of_each(shapes: Sequence[ConvShape], names: set[str]) -> tuple[ConvShape, ...]:
    first: dict[str, ConvShape] = {}
    for shape in shapes:
        if shape.name in names:
            first.setdefault(shape.name, shape)
    return tuple(first.values())


def _block(shape: ConvShape, dtype: torch.dtype, device: torch.device, layout: str):
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, padding=shape.pad,
                     dilation=shape.dilation, bias=False)
    bn = nn.BatchNorm2d(shape.out_channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    torch_block = nn.Sequential(conv, bn, nn.ReLU()).to(device=device, dtype=dtype)
    if layout == "channels_last":
        torch_block = torch_block.to(memory_format=torch.channels_last)
    ours = copy.deepcopy(torch_block)
    fused = fastseg.nn.ConvBNAct.from_modules(ours[0], ours[1], ours[2])
    return torch_block, fused


def conv_workload(shape: ConvShape, dtype: torch.dtype, layout: str, device: torch.device, reference: str,
                  training: bool, backend: str = "auto", loop_orders: bool = False) -> Workload:
    """The case's callables; ``backend`` "triton" runs fastseg's side (a training step here) under
    fastseg.backend("triton"): the Triton forward and backward kernels instead of "auto"'s choice and cuDNN's
    backward. ``loop_orders`` (a forward case): the check also times the Triton kernel alone in each loop order
    of its implicit GEMM, into the notes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch_block, fused = _block(shape, dtype, device, layout)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if not training:
        torch_block.eval()
        fused.eval()
        run_torch = torch.compile(torch_block, mode="max-autotune") if reference == COMPILED else torch_block

        def reference_fn():
            with torch.no_grad():
                return run_torch(x)

        first_call_ms: list[float] = []
        problems_before = set(conv_ops.auto_choices())

        def fastseg_fn():
            with torch.no_grad():
                if first_call_ms:
                    return fused(x)
                # The first call compiles and autotunes (cached per shape afterwards): timed apart, in the notes.
                return _timed(lambda: fused(x), device, first_call_ms)

        def check(expected, actual):
            notes = [_check(dtype, expected, actual)]
            timings = conv_ops.auto_timings()
            for key, impl in conv_ops.auto_choices().items():
                if key not in problems_before:  # "auto" timed the Triton kernel against cuDNN and kept the fastest
                    timed = ", ".join(f"{name} {ms:.3g}" for name, ms in timings.get(key, {}).items())
                    notes.append(f"auto ran {AUTO_NAMES[impl]} (timed: {timed} ms)")
            if device.type == "cuda" and first_call_ms:
                notes.append(f"first call {first_call_ms[0]:.0f} ms (compile + autotune)")
            if loop_orders:
                notes.append(_loop_order_note(fused, x, device))
            return "; ".join(notes)

        return Workload(reference=reference_fn, fastseg=fastseg_fn, fastseg_bytes=_bytes(shape, dtype),
                        check=check, fastseg_flops=shape.flops())
    torch_block.train()
    fused.train()
    x.requires_grad_()
    grad = torch.randn(shape.batch, shape.out_channels, shape.out_size, shape.out_size, device=device, dtype=dtype)

    def step(block, context=contextlib.nullcontext):
        def run():
            with context():
                out = block(x)
                return torch.autograd.grad(out, (x, block.conv.weight if hasattr(block, "conv") else block[0].weight),
                                           grad)
        return run

    return Workload(reference=step(torch_block), fastseg=step(fused, backend_context(backend)),
                    fastseg_bytes=3 * _bytes(shape, dtype),
                    check=lambda expected, actual: "; ".join(
                        filter(None, (_check(dtype, e, a) for e, a in zip(expected, actual)))),
                    fastseg_flops=3 * shape.flops())


def auto_summary(problems_before: set) -> str:
    """What "auto" chose for the convolution problems it timed since ``problems_before`` (a set of
    conv_ops.auto_choices() keys), or "" if none: how many went to each implementation, and the sum over those
    distinct problems of the chosen candidates' times against cuDNN's (BatchNorm folded) and the Triton kernel's."""
    choices, timings = conv_ops.auto_choices(), conv_ops.auto_timings()
    new = [key for key in choices if key not in problems_before]
    if not new:
        return ""
    kept = {impl: sum(choices[key] == impl for key in new) for impl in AUTO_NAMES}
    sums = {impl: sum(timings[key].get(impl, float("nan")) for key in new) for impl in ("triton", "cudnn")}
    chosen = sum(timings[key][choices[key]] for key in new)
    return (f"auto: {len(new)} convolution problems, kept " + ", ".join(f"{n} {impl}" for impl, n in kept.items() if n)
            + f"; per call over them {chosen:.3g} ms chosen, {sums['cudnn']:.3g} ms cuDNN, {sums['triton']:.3g} ms "
            "Triton")


def _loop_order_note(fused: fastseg.nn.ConvBNAct, x: torch.Tensor, device: torch.device) -> str:
    """The Triton kernel alone (the block's BatchNorm as its scale and shift, ReLU) in each loop order of its
    implicit GEMM, the default (conv_kernels.taps_outer) marked: the measurements that set that threshold. Each
    order's first call compiles and autotunes it; the timing is the harness's."""
    from fastseg.bench.harness import time_ms
    from fastseg.ops import conv_kernels

    conv = fused.conv
    scale, shift = fused.folded_scale_shift()
    N, C, H, W = x.shape
    K, _, KH, KW = conv.weight.shape
    OH, OW = conv_ops.output_size(H, W, (KH, KW), conv.stride, [*conv.padding, *conv.padding], conv.dilation)
    out = torch.empty((N, K, OH, OW), dtype=x.dtype, device=device, memory_format=torch.channels_last)
    default = "taps_outer" if conv_kernels.taps_outer(C, KH * KW) else "flat"
    times = {}
    for order in ("taps_outer", "flat"):
        def run(order=order):
            conv_kernels.forward(x, conv.weight, conv.bias, scale, shift, None, out, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, True, conv_ops._allow_tf32(), loop_order=order)

        with torch.no_grad():
            run()
            times[order] = time_ms(run, device)
    return "Triton kernel alone: " + ", ".join(
        f"{order.replace('_', '-')} {ms:.3g} ms" + (" (default)" if order == default else "")
        for order, ms in times.items())


def _timed(fn, device: torch.device, record: list[float]):
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record.append((time.perf_counter() - start) * 1e3)
    return result


def _bytes(shape: ConvShape, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return size * (shape.batch * shape.in_channels * shape.size**2 + shape.out_channels * shape.in_channels
                   * shape.kernel**2 + shape.batch * shape.out_channels * shape.out_size**2)


def _check(dtype: torch.dtype, expected: torch.Tensor, actual: torch.Tensor) -> str:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{actual.dtype} {tuple(actual.shape)} where {expected.dtype} "
                             f"{tuple(expected.shape)} expected")
    scale = float(expected.double().abs().max()) or 1.0
    error = float((actual.double() - expected.double()).abs().max()) / scale
    if not error <= TOLERANCE[dtype]:
        raise AssertionError(f"max |diff| / max |torch| = {error:.3g} > {TOLERANCE[dtype]}")
    return f"max rel diff {error:.1e}"
