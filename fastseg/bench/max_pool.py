"""Max pooling and unpooling: torch.nn.functional against fastseg, on segmentation-network activations.

Shapes are the pooled activations of U-Net (572x572 input, valid convolutions), SegNet's VGG-16 encoder on
360x480 CamVid frames, and a ResNet stem (3x3 stride 2 padding 1) on 512x512 crops. Each is measured in
inference (with and without the int64 indices SegNet's decoder needs) and in training (forward+backward,
where fastseg saves an int8 window offset instead of torch's input + int64 indices), in NCHW and
channels_last, and max_unpool2d with the indices of SegNet's pools.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

import fastseg
from fastseg.bench.harness import Case, Workload
from fastseg.ops.max_pool import window_offset_dtype

REFERENCE = "torch"
LAYOUTS = ("nchw", "channels_last")
# Tolerances for gradients where overlapping windows sum several values (order may differ from torch's).
GRADIENT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


@dataclass(frozen=True)
class Activation:
    """One pooling layer's input, per image."""

    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Window:
    kernel_size: int
    stride: int
    padding: int = 0

    def __str__(self) -> str:
        text = f"{self.kernel_size}x{self.kernel_size}/{self.stride}"
        return text + (f" pad {self.padding}" if self.padding else "")

    @property
    def fastseg_offset_bytes(self) -> int:
        """Bytes per output of the window offset fastseg saves for backward instead of int64 indices."""
        return window_offset_dtype(self.kernel_size * self.kernel_size).itemsize


UNET_POOLS = (
    Activation("unet pool1", 64, 568, 568),
    Activation("unet pool2", 128, 280, 280),
    Activation("unet pool3", 256, 136, 136),
    Activation("unet pool4", 512, 64, 64),
)
SEGNET_POOLS = (
    Activation("segnet pool1", 64, 360, 480),
    Activation("segnet pool2", 128, 180, 240),
    Activation("segnet pool3", 256, 90, 120),
    Activation("segnet pool4", 512, 45, 60),
)
RESNET_STEM_POOL = Activation("resnet stem pool", 64, 256, 256)
HALVING = Window(2, 2)
RESNET_STEM = Window(3, 2, 1)
QUICK_SUBSET = {"unet pool1", "segnet pool4", "resnet stem pool"}

# Pooling modes: how the case is named, and which results-format pass it is.
FORWARD = "forward"
FORWARD_WITH_INDICES = "forward_with_indices"
FORWARD_BACKWARD = "forward_backward"
MODE_SUFFIX = {FORWARD: "", FORWARD_WITH_INDICES: ", with indices", FORWARD_BACKWARD: ", fwd+bwd"}
MODE_PASS = {FORWARD: "forward", FORWARD_WITH_INDICES: "forward", FORWARD_BACKWARD: "backward"}


@dataclass(frozen=True)
class Sizing:
    """How big the run is: full-size batches on a GPU; fewer images and smaller planes on a CPU or --quick."""

    batch: int
    spatial_divisor: int
    quick: bool

    @classmethod
    def for_run(cls, device: torch.device, quick: bool) -> "Sizing":
        if device.type == "cuda":
            return cls(batch=2 if quick else 16, spatial_divisor=1, quick=quick)
        return cls(batch=1 if quick else 2, spatial_divisor=8 if quick else 4, quick=quick)

    def shape(self, activation: Activation) -> tuple[int, int, int, int]:
        return (
            self.batch,
            activation.channels,
            max(activation.height // self.spatial_divisor, 2),
            max(activation.width // self.spatial_divisor, 2),
        )

    def selected(self, activations: Sequence[Activation]) -> list[Activation]:
        return [a for a in activations if not self.quick or a.name in QUICK_SUBSET]


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    sizing = Sizing.for_run(device, quick)
    pools = [(a, HALVING) for a in sizing.selected(UNET_POOLS + SEGNET_POOLS)]
    pools += [(a, RESNET_STEM) for a in sizing.selected((RESNET_STEM_POOL,))]
    found = []
    for mode in (FORWARD, FORWARD_WITH_INDICES, FORWARD_BACKWARD):
        for activation, window in pools:
            shape = sizing.shape(activation)
            for layout in LAYOUTS:
                for dtype in dtypes:
                    found.append(Case(
                        op="max_pool2d",
                        case=f"{activation.name} {format_shape(shape)}, {window}{MODE_SUFFIX[mode]}",
                        dtype=dtype, layout=layout, pass_=MODE_PASS[mode], reference=REFERENCE,
                        setup=functools.partial(max_pool_workload, shape, dtype, layout, device, window, mode),
                    ))
    for activation in sizing.selected(SEGNET_POOLS):
        shape = sizing.shape(activation)
        pooled = pooled_shape(shape, HALVING)
        for layout in LAYOUTS:
            for dtype in dtypes:
                found.append(Case(
                    op="max_unpool2d",
                    case=f"{activation.name} indices, {format_shape(pooled)} -> {shape[2]}x{shape[3]}",
                    dtype=dtype, layout=layout, pass_="forward", reference=REFERENCE,
                    setup=functools.partial(max_unpool_workload, shape, dtype, layout, device),
                ))
    return found


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def pooled_shape(shape: Sequence[int], window: Window) -> tuple[int, ...]:
    return tuple(F.max_pool2d(torch.empty(shape, device="meta"), window.kernel_size, window.stride, window.padding).shape)


def random_activation(shape: Sequence[int], dtype: torch.dtype, layout: str, device: torch.device) -> torch.Tensor:
    # Random normal data: zeros would hide unwritten outputs and can time faster than real activations.
    tensor = torch.randn(shape, device=device, dtype=dtype)
    return tensor.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else tensor


def max_pool_workload(
    shape: Sequence[int], dtype: torch.dtype, layout: str, device: torch.device, window: Window, mode: str
) -> Workload:
    k, s, p = window.kernel_size, window.stride, window.padding
    x = random_activation(shape, dtype, layout, device)
    out_shape = pooled_shape(shape, window)
    out_elements = torch.Size(out_shape).numel()
    x_bytes, out_bytes = x.numel() * x.element_size(), out_elements * x.element_size()

    if mode == FORWARD:
        return Workload(
            reference=lambda: F.max_pool2d(x, k, s, p),
            fastseg=lambda: fastseg.max_pool2d(x, k, s, p),
            fastseg_bytes=x_bytes + out_bytes,
            check=lambda expected, actual: assert_equal("output", expected, actual),
        )
    if mode == FORWARD_WITH_INDICES:
        return Workload(
            reference=lambda: F.max_pool2d(x, k, s, p, return_indices=True),
            fastseg=lambda: fastseg.max_pool2d_with_indices(x, k, s, p),
            fastseg_bytes=x_bytes + out_bytes + out_elements * torch.int64.itemsize,
            check=check_output_and_indices,
        )
    if mode == FORWARD_BACKWARD:
        x.requires_grad_()
        grad_out = random_activation(out_shape, dtype, layout, device)

        def reference() -> torch.Tensor:
            return torch.autograd.grad(F.max_pool2d(x, k, s, p), x, grad_out)[0]

        def fastseg_step() -> torch.Tensor:
            return torch.autograd.grad(fastseg.max_pool2d(x, k, s, p), x, grad_out)[0]

        # Forward: read x, write out and the offsets; backward: read grad_out and offsets, write grad_in.
        offset_bytes = out_elements * window.fastseg_offset_bytes
        return Workload(
            reference=reference,
            fastseg=fastseg_step,
            fastseg_bytes=2 * (x_bytes + out_bytes + offset_bytes),
            check=lambda expected, actual: assert_close("grad_input", expected, actual),
            reference_forward_for_backward=lambda: F.max_pool2d(x, k, s, p),
            fastseg_forward_for_backward=lambda: fastseg.max_pool2d(x, k, s, p),
        )
    raise ValueError(f"unknown max-pool mode {mode!r}")


def max_unpool_workload(shape: Sequence[int], dtype: torch.dtype, layout: str, device: torch.device) -> Workload:
    """SegNet's decoder step: scatter pooled values back to the positions torch's max_pool2d picked."""
    x = random_activation(shape, dtype, layout, device)
    pooled, indices = F.max_pool2d(x, HALVING.kernel_size, HALVING.stride, return_indices=True)
    output_size = tuple(shape[-2:])
    k, s = HALVING.kernel_size, HALVING.stride
    return Workload(
        reference=lambda: F.max_unpool2d(pooled, indices, k, s, output_size=output_size),
        fastseg=lambda: fastseg.max_unpool2d(pooled, indices, k, s, output_size=output_size),
        # Read the pooled values and their int64 indices; write every element of the output once.
        fastseg_bytes=(pooled.numel() * (pooled.element_size() + indices.element_size())
                       + x.numel() * x.element_size()),
        check=lambda expected, actual: assert_equal("output", expected, actual),
    )


def check_output_and_indices(expected: Any, actual: Any) -> None:
    assert_equal("output", expected[0], actual[0])
    assert_equal("indices", expected[1], actual[1])


def assert_equal(name: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    """Max pooling picks elements, so fastseg must match torch bit for bit (inputs hold no NaN)."""
    _assert_same_kind(name, expected, actual)
    if not torch.equal(expected, actual):
        differing = int((expected != actual).sum())
        raise AssertionError(f"{name}: {differing} of {expected.numel()} elements differ")


def assert_close(name: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    _assert_same_kind(name, expected, actual)
    rtol, atol = GRADIENT_TOLERANCES[expected.dtype]
    close = torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if not bool(close.all()):
        largest = float((actual.double() - expected.double()).abs().max())
        raise AssertionError(
            f"{name}: {int((~close).sum())} of {expected.numel()} elements differ, max abs diff {largest:.3g}"
        )


def _assert_same_kind(name: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name}: got {type(actual).__name__}, not a tensor")
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name}: {actual.dtype} {tuple(actual.shape)} where {expected.dtype} {tuple(expected.shape)} expected"
        )
