"""2-D max-pooling with indices, its backward, and max-unpooling.

Semantics are PyTorch's (torch.nn.functional.max_pool2d / max_unpool2d): values, int64 indices flattened per
(n, c) plane, NaN propagation, ties, ceil_mode output sizes and the errors for invalid arguments.

Going past PyTorch: when the caller does not ask for indices, the forward saves for its backward only the
argmax's offset within the window in the narrowest integer type that holds it (int8 for windows of up to 128
taps), where PyTorch saves the input and int64 indices.

Layers: the public functions validate and allocate; the registered custom ops (torch.ops.fastseg.*) carry
autograd and fake implementations (torch.compile); eager calls on CPU and CUDA tensors run the same
implementation directly, through a torch.autograd.Function when a gradient is needed, without the op's dispatch
layers (ops/_eager.py: forward + backward of a 4x4 pool took 165 us through the op, 80 us this way, torch's own
25 us, on the CI machine); each op's kernels come from one backend (Triton, the
compiled extension or the plain-PyTorch reference below), all following CONTRACT_max_pool.md; max_unpool2d's
forward on the CPU is torch's own kernel ("aten": one pass, several times faster than the reference's scatter),
its backward the reference's gather.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastseg import _backend
from fastseg.ops._eager import backward_of, needs_grad, skips_dispatch

_backend.register_op("max_pool2d", {"triton", "extension", "reference"})
_backend.register_op("max_unpool2d", {"triton", "aten", "reference"})


# --- argument handling, as torch does it ----------------------------------------------------------


def _pair(value, what: str, *, allow_empty: bool = False) -> tuple[int, int] | None:
    """An int or a 1-/2-sequence of ints as an (h, w) pair; None for an empty sequence when allowed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if len(value) == 0 and allow_empty:
            return None
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return (value[0], value[1])
    raise RuntimeError(f"max_pool2d: {what}, but got {value!r}")


def _pool_params(kernel_size, stride, padding, dilation):
    k = _pair(kernel_size, "kernel_size must either be a single int, or a tuple of two ints")
    s = None if stride is None else _pair(
        stride, "stride must either be omitted, a single int, or a tuple of two ints", allow_empty=True)
    p = _pair(padding, "padding must either be a single int, or a tuple of two ints")
    d = _pair(dilation, "dilation must be either a single int, or a tuple of two ints")
    return k, (k if s is None else s), p, d


def _pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling_output_shape: with ceil_mode the last window must start inside the input or the
    left padding."""
    numerator = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = numerator // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _check_pool(x: Tensor, k, s, p, d, ceil_mode: bool) -> tuple[int, int]:
    """Raise as PyTorch does for invalid pooling arguments; return the output size (OH, OW)."""
    if k[0] <= 0 or k[1] <= 0:
        raise RuntimeError(f"max_pool2d: kernel size should be greater than zero, but got kH: {k[0]} kW: {k[1]}")
    if s[0] <= 0 or s[1] <= 0:
        raise RuntimeError(f"max_pool2d: stride should be greater than zero, but got dH: {s[0]} dW: {s[1]}")
    if d[0] <= 0 or d[1] <= 0:
        raise RuntimeError(
            f"max_pool2d: dilation should be greater than zero, but got dilationH: {d[0]} dilationW: {d[1]}")
    if x.dim() != 4 or x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise RuntimeError(
            "max_pool2d: Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
            f"but got: {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"max_pool2d: expected a floating-point input, but got {x.dtype}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise RuntimeError(
            "max_pool2d: pad should be smaller than or equal to half of kernel size, but got "
            f"padW = {p[1]}, padH = {p[0]}, kW = {k[1]}, kH = {k[0]}")
    if p[0] < 0 or p[1] < 0:
        raise RuntimeError(f"max_pool2d: pad must be non-negative, but got padH = {p[0]}, padW = {p[1]}")
    H, W = x.shape[2], x.shape[3]
    OH = _pooled_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    OW = _pooled_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"max_pool2d: Given input size: ({x.shape[1]}x{H}x{W}). Calculated output size: "
            f"({x.shape[1]}x{OH}x{OW}). Output size is too small")
    return OH, OW


def window_offset_dtype(window: int) -> torch.dtype:
    """The narrowest integer type that holds a tap offset r*kw + c within a window of `window` taps."""
    if window <= 128:
        return torch.int8
    if window <= 32768:
        return torch.int16
    return torch.int32


def _suggested_memory_format(t: Tensor) -> torch.memory_format:
    """torch's suggest_memory_format for a 4-D tensor (ATen's is_channels_last_strides_2d_s4).

    With plain int sizes and strides (eager calls) the test runs here: torch._prims_common's version wraps
    every comparison in symbolic-shape guards and was a quarter of a small max_pool2d call's host time.
    Symbolic shapes (torch.compile) go to that version.
    """
    sizes, strides = t.shape, t.stride()
    if not all(type(v) is int for v in (*sizes, *strides)):
        return suggest_memory_format(t)
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return torch.channels_last


def _empty_like_layout(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=_suggested_memory_format(like))


# --- the plain-PyTorch reference --------------------------------------------------------------------


def _window_taps(size: int, out_size: int, k: int, s: int, p: int, d: int, device) -> tuple[Tensor, Tensor]:
    """Input coordinates of every tap of every window along one axis, (out_size, k), and their validity."""
    taps = (torch.arange(out_size, device=device) * s - p)[:, None] + torch.arange(k, device=device) * d
    return taps, (taps >= 0) & (taps < size)


def _first_tap(out_size: int, k: int, s: int, p: int, d: int, device) -> Tensor:
    """Per window, the first tap at or after coordinate 0: where PyTorch's scan starts (its initial argmax)."""
    start = torch.arange(out_size, device=device) * s - p
    return ((-start).clamp(min=0) + d - 1) // d


def reference_max_pool2d(x: Tensor, kernel_size, stride, padding, dilation, output_size) -> tuple[Tensor, Tensor]:
    """Max-pool in plain PyTorch, differentiable: returns (out, window offset r*kw + c as int64).

    Follows CONTRACT_max_pool.md: a row-major scan where a tap replaces the max when it is greater or NaN.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (OH, OW) = kernel_size, stride, padding, dilation, output_size
    N, C, H, W = x.shape
    taps_h, valid_h = _window_taps(H, OH, kh, sh, ph, dh, x.device)
    taps_w, valid_w = _window_taps(W, OW, kw, sw, pw, dw, x.device)
    # (N, C, OH, kh, OW, kw) -> (N, C, OH, OW, kh*kw), taps in row-major window order
    windows = x[:, :, taps_h.clamp(0, H - 1)[:, :, None, None], taps_w.clamp(0, W - 1)[None, None]]
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(N, C, OH, OW, kh * kw)
    valid = (valid_h[:, :, None, None] & valid_w[None, None]).permute(0, 2, 1, 3).reshape(OH, OW, kh * kw)
    compare = windows.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)

    first = _first_tap(OH, kh, sh, ph, dh, x.device)[:, None] * kw + _first_tap(OW, kw, sw, pw, dw, x.device)
    offset = first.expand(N, C, OH, OW).clone()
    best = torch.full((N, C, OH, OW), float("-inf"), dtype=compare.dtype, device=x.device)
    for t in range(kh * kw):
        value = compare[..., t]
        take = valid[..., t] & ((value > best) | value.isnan())
        best = torch.where(take, value, best)
        offset = torch.where(take, t, offset)
    any_valid = valid.any(-1)
    out = windows.gather(-1, offset.clamp(max=kh * kw - 1).unsqueeze(-1)).squeeze(-1)
    out = torch.where(any_valid, out, torch.full_like(out, float("-inf")))
    return out, offset


def _offset_to_plane(offset: Tensor, input_size, kernel_size, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    """Window offsets -> (plane indices ih*W + iw, whether that tap is inside the input)."""
    (H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = input_size, kernel_size, stride, padding, dilation
    OH, OW = offset.shape[-2:]
    offset = offset.long()
    ih = (torch.arange(OH, device=offset.device) * sh - ph)[:, None] + (offset // kw) * dh
    iw = (torch.arange(OW, device=offset.device) * sw - pw) + (offset % kw) * dw
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return ih * W + iw, inside


def _reference_forward_into(x, out, argmax, kernel_size, stride, padding, dilation):
    values, offset = reference_max_pool2d(x, kernel_size, stride, padding, dilation, out.shape[-2:])
    out.copy_(values)
    if argmax.dtype == torch.int64:
        offset = _offset_to_plane(offset, x.shape[-2:], kernel_size, stride, padding, dilation)[0]
    argmax.copy_(offset)


def _reference_backward_into(grad_out, argmax, grad_in, kernel_size, stride, padding, dilation):
    N, C, H, W = grad_in.shape
    if argmax.dtype == torch.int64:
        plane = argmax
        inside = (plane >= 0) & (plane < H * W)
    else:
        plane, inside = _offset_to_plane(argmax, (H, W), kernel_size, stride, padding, dilation)
    _scatter_planes(grad_out.to(torch.float64 if grad_out.dtype == torch.float64 else torch.float32),
                    plane, inside, grad_in, accumulate=True)


def _scatter_planes(values: Tensor, plane: Tensor, inside: Tensor, out: Tensor, *, accumulate: bool) -> None:
    """out[n, c].flat[plane] = (or +=) values, skipping entries not `inside` (an extra dump slot takes them)."""
    N, C, H, W = out.shape
    index = torch.where(inside, plane, H * W).reshape(N, C, -1)
    flat = torch.zeros(N, C, H * W + 1, dtype=values.dtype, device=out.device)
    if accumulate:
        flat.scatter_add_(2, index, values.reshape(N, C, -1))
    else:
        flat.scatter_(2, index, values.reshape(N, C, -1))
    out.copy_(flat[:, :, : H * W].reshape(N, C, H, W))


def _reference_unpool_into(x, indices, out):
    OH, OW = out.shape[-2:]
    _scatter_planes(x, indices, (indices >= 0) & (indices < OH * OW), out, accumulate=False)


def _reference_unpool_backward_into(grad_out, indices, grad_in):
    N, C, OH, OW = grad_out.shape
    inside = (indices >= 0) & (indices < OH * OW)
    flat = torch.cat([grad_out.reshape(N, C, -1), grad_out.new_zeros(N, C, 1)], dim=2)
    grad_in.copy_(flat.gather(2, torch.where(inside, indices, OH * OW).reshape(N, C, -1)).view(indices.shape))


# --- dispatch to one backend ------------------------------------------------------------------------


def _triton_kernels():
    from fastseg.ops import max_pool_kernels  # imports triton: only when a Triton kernel runs

    return max_pool_kernels


def _forward_into(x, out, argmax, k, s, p, d):
    impl = _backend.select("max_pool2d", x.device)
    if impl == "triton":
        _triton_kernels().forward(x, out, argmax, k, s, p, d)
    elif impl == "extension":
        torch.ops.fastseg.ext_max_pool2d_out(x, out, argmax, k, s, p, d)
    else:
        _reference_forward_into(x, out, argmax, k, s, p, d)


def _backward_into(grad_out, argmax, grad_in, k, s, p, d):
    impl = _backend.select("max_pool2d", grad_out.device)
    if impl == "triton":
        _triton_kernels().backward(grad_out, argmax, grad_in, k, s, p, d)
    elif impl == "extension":
        torch.ops.fastseg.ext_max_pool2d_backward_out(grad_out, argmax, grad_in, k, s, p, d)
    else:
        _reference_backward_into(grad_out, argmax, grad_in, k, s, p, d)


def _unpool_into(x, indices, out):
    if _backend.select("max_unpool2d", x.device) == "triton":
        _triton_kernels().unpool(x, indices, out)
    else:
        _reference_unpool_into(x, indices, out)


def _unpool_backward_into(grad_out, indices, grad_in):
    if _backend.select("max_unpool2d", grad_out.device) == "triton":
        _triton_kernels().unpool_backward(grad_out, indices, grad_in)
    else:
        _reference_unpool_backward_into(grad_out, indices, grad_in)


# --- registered ops: autograd and fake implementations ----------------------------------------------


def _pool_outputs(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    k, s, p, d = (tuple(v) for v in (kernel_size, stride, padding, dilation))
    OH, OW = _check_pool(x, k, s, p, d, ceil_mode)
    shape = (x.shape[0], x.shape[1], OH, OW)
    index_dtype = torch.int64 if return_indices else window_offset_dtype(k[0] * k[1])
    memory_format = _suggested_memory_format(x)  # once for both outputs (host time of small calls)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    return out, torch.empty(shape, dtype=index_dtype, device=x.device, memory_format=memory_format), (k, s, p, d)


def _max_pool2d(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], ceil_mode: bool, return_indices: bool) -> tuple[Tensor, Tensor]:
    """(out, argmax) of a 4-D input; argmax is int64 plane indices when return_indices, else window offsets."""
    out, argmax, (k, s, p, d) = _pool_outputs(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if out.numel():
        _forward_into(x, out, argmax, k, s, p, d)
    return out, argmax


_max_pool2d_op = torch.library.custom_op("fastseg::max_pool2d", _max_pool2d, mutates_args=())


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    out, argmax, _ = _pool_outputs(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return out, argmax


def _max_pool2d_backward(grad_out: Tensor, argmax: Tensor, input_size: Sequence[int], kernel_size: Sequence[int],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Gradient of max_pool2d w.r.t. its input, from the argmax the forward returned (either encoding)."""
    grad_in = _empty_like_layout((*grad_out.shape[:2], *input_size), argmax, grad_out.dtype)
    if grad_in.numel():
        _backward_into(grad_out, argmax, grad_in, tuple(kernel_size), tuple(stride), tuple(padding),
                       tuple(dilation))
    return grad_in


_max_pool2d_backward_op = torch.library.custom_op("fastseg::max_pool2d_backward", _max_pool2d_backward,
                                                  mutates_args=())


@_max_pool2d_backward_op.register_fake
def _(grad_out, argmax, input_size, kernel_size, stride, padding, dilation):
    return _empty_like_layout((*grad_out.shape[:2], *input_size), argmax, grad_out.dtype)


def _max_pool2d_setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, _, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.params = (list(x.shape[-2:]), kernel_size, stride, padding, dilation)
    ctx.backend = _backend.current_backend()


# The backward runs on the backend its forward ran on: autograd runs CUDA backwards on its own thread,
# where the caller's `fastseg.backend(...)` block is not active.
def _max_pool2d_grad(ctx, grad_out, _grad_argmax, *, eager: bool = False):
    """The input gradient; ``eager`` from _MaxPool2dFunction (see ops._eager.backward_of)."""
    (argmax,) = ctx.saved_tensors
    backward = backward_of(_max_pool2d_backward, torch.ops.fastseg.max_pool2d_backward, eager)
    with _backend.backend(ctx.backend):
        grad_in = backward(grad_out, argmax, *ctx.params)
    return grad_in, None, None, None, None, None, None


_max_pool2d_op.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup_context)


class _MaxPool2dFunction(torch.autograd.Function):
    """fastseg::max_pool2d's forward and autograd for eager calls that need a gradient (ops._eager): the same
    implementation, setup and backward as the registered op's."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        inputs = (x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        output = _max_pool2d(*inputs)
        ctx.mark_non_differentiable(output[1])
        _max_pool2d_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_argmax):
        return _max_pool2d_grad(ctx, grad_out, grad_argmax, eager=True)


def _max_unpool2d(x: Tensor, indices: Tensor, output_size: Sequence[int]) -> Tensor:
    """Scatter a 4-D input into zeros of spatial size output_size at its plane indices."""
    if _backend.select("max_unpool2d", x.device) == "aten":
        if x.device.type != "cpu":  # torch's CPU kernel raises for an index out of range; its CUDA kernel asserts
            _check_unpool_indices(indices, output_size)
        return torch.ops.aten.max_unpool2d(x, indices, list(output_size))
    out = _empty_like_layout((*x.shape[:2], *output_size), x, x.dtype).zero_()
    if x.numel():
        if x.device.type == "cpu":
            _check_unpool_indices(indices, output_size)
        _unpool_into(x, indices, out)
    return out


_max_unpool2d_op = torch.library.custom_op("fastseg::max_unpool2d", _max_unpool2d, mutates_args=())


@_max_unpool2d_op.register_fake
def _(x, indices, output_size):
    return _empty_like_layout((*x.shape[:2], *output_size), x, x.dtype)


def _max_unpool2d_backward(grad_out: Tensor, indices: Tensor) -> Tensor:
    """Gradient of max_unpool2d w.r.t. its input: grad_out gathered at the indices."""
    grad_in = _empty_like_layout(indices.shape, indices, grad_out.dtype)
    if grad_in.numel():
        _unpool_backward_into(grad_out, indices, grad_in)
    return grad_in


_max_unpool2d_backward_op = torch.library.custom_op("fastseg::max_unpool2d_backward", _max_unpool2d_backward,
                                                    mutates_args=())


@_max_unpool2d_backward_op.register_fake
def _(grad_out, indices):
    return _empty_like_layout(indices.shape, indices, grad_out.dtype)


def _max_unpool2d_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.backend = _backend.current_backend()


def _max_unpool2d_grad(ctx, grad_out, *, eager: bool = False):
    """The input gradient; ``eager`` from _MaxUnpool2dFunction (see ops._eager.backward_of)."""
    (indices,) = ctx.saved_tensors
    backward = backward_of(_max_unpool2d_backward, torch.ops.fastseg.max_unpool2d_backward, eager)
    with _backend.backend(ctx.backend):
        grad_in = backward(grad_out, indices)
    return grad_in, None, None


_max_unpool2d_op.register_autograd(_max_unpool2d_grad, setup_context=_max_unpool2d_setup_context)


class _MaxUnpool2dFunction(torch.autograd.Function):
    """fastseg::max_unpool2d for eager calls, as _MaxPool2dFunction."""

    @staticmethod
    def forward(ctx, x, indices, output_size):
        out = _max_unpool2d(x, indices, output_size)
        _max_unpool2d_setup_context(ctx, (x, indices, output_size), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _max_unpool2d_grad(ctx, grad_out, eager=True)


def _register_extension_fakes() -> None:
    """Fake implementations of the extension's out-style ops, for opcheck and torch.compile."""
    if _backend.extension() is None:
        return
    for name in ("fastseg::ext_max_pool2d_out", "fastseg::ext_max_pool2d_backward_out"):
        torch.library.register_fake(name)(lambda *args: None)


_register_extension_fakes()


# --- public functions ---------------------------------------------------------------------------------


def _as_batch(x: Tensor, what: str) -> tuple[Tensor, bool]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor input, but got {type(x).__name__}")
    if x.dim() == 3:
        return x.unsqueeze(0), True
    return x, False


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """2-D max pooling over a (C, H, W) or (N, C, H, W) input, as torch.nn.functional.max_pool2d.

    Args:
        input: float16, bfloat16, float32 or float64; NCHW, channels_last or any strides.
        kernel_size, stride, padding, dilation: int or (h, w); stride defaults to kernel_size.
        ceil_mode: round the output size up, as PyTorch does.
        return_indices: also return the argmax as int64 indices flattened per (n, c) plane.

    Returns:
        The pooled tensor (in the memory format PyTorch gives), and the indices when return_indices.
        Without indices, autograd saves only a narrow window offset (int8 for windows up to 128 taps).
    """
    x, unbatched = _as_batch(input, "max_pool2d")
    k, s, p, d = _pool_params(kernel_size, stride, padding, dilation)
    args = (x, k, s, p, d, bool(ceil_mode), bool(return_indices))
    if not skips_dispatch(x):
        out, argmax = torch.ops.fastseg.max_pool2d(*args)
    else:
        out, argmax = _MaxPool2dFunction.apply(*args) if needs_grad(x) else _max_pool2d(*args)
    if unbatched:
        out, argmax = out.squeeze(0), argmax.squeeze(0)
    return (out, argmax) if return_indices else out


def max_pool2d_with_indices(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                            ceil_mode: bool = False) -> tuple[Tensor, Tensor]:
    """max_pool2d(..., return_indices=True): (out, int64 indices flattened per plane), exactly as PyTorch."""
    return max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def _check_unpool_indices(indices: Tensor, output_size) -> None:
    """PyTorch's CPU check: an index outside the output plane is an error, not a silent skip."""
    plane = output_size[0] * output_size[1]
    bad = (indices < 0) | (indices >= plane)
    if bool(bad.any()):
        raise RuntimeError(
            f"max_unpool2d: Found an invalid max index: {int(indices[bad][0])} (output volumes are of size "
            f"{output_size[0]}x{output_size[1]})")


def _unpool_output_size(x: Tensor, kernel_size, stride, padding, output_size) -> tuple[int, int]:
    k = _pair(kernel_size, "kernel_size must either be a single int, or a tuple of two ints")
    s = k if stride is None else _pair(stride, "stride must either be omitted, a single int, or a tuple of two ints",
                                       allow_empty=True) or k
    p = _pair(padding, "padding must either be a single int, or a tuple of two ints")
    default = tuple((x.shape[-2 + i] - 1) * s[i] + k[i] - 2 * p[i] for i in range(2))
    if output_size is None:
        return default
    size = tuple(output_size)
    if len(size) == x.dim():
        size = size[-2:]
    if len(size) != 2:
        raise ValueError(f"max_unpool2d: output_size must have 2 or {x.dim()} elements (got {len(size)})")
    for i in range(2):
        low, high = default[i] - s[i], default[i] + s[i]
        if not low < size[i] < high:
            raise ValueError(f"max_unpool2d: invalid output_size {list(size)} (dim {i} must be between {low} and {high})")
    return size


def max_unpool2d(input: Tensor, indices: Tensor, kernel_size, stride=None, padding=0, output_size=None) -> Tensor:
    """Partial inverse of max_pool2d, as torch.nn.functional.max_unpool2d.

    Places each input value at its index (int64, flattened per plane, as max_pool2d_with_indices returns)
    in a zero tensor of size output_size (default: the size the pooling came from, without ceil_mode).
    On CPU an out-of-range index raises, as in PyTorch; on CUDA it is skipped (never written out of bounds).
    """
    x, unbatched = _as_batch(input, "max_unpool2d")
    if not isinstance(indices, Tensor) or indices.shape != input.shape:
        raise RuntimeError(
            "max_unpool2d: Expected shape of indices to be same as that of the input tensor "
            f"({list(input.shape)}) but got indices tensor with shape: "
            f"{list(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise RuntimeError(f"max_unpool2d: elements in indices should be type int64 but got: {indices.dtype}")
    if x.dim() != 4 or x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise RuntimeError(
            f"max_unpool2d: Expected 3D or 4D tensor, with optional 0 dim batch size, but got {list(input.shape)}")
    size = _unpool_output_size(x, kernel_size, stride, padding, output_size)
    args = (x, indices.unsqueeze(0) if unbatched else indices, list(size))
    if not skips_dispatch(x):
        out = torch.ops.fastseg.max_unpool2d(*args)
    else:
        out = _MaxUnpool2dFunction.apply(*args) if needs_grad(x) else _max_unpool2d(*args)
    return out.squeeze(0) if unbatched else out
