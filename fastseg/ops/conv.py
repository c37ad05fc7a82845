"""Fused 2-D convolution: act((conv2d(x, weight) + bias) * scale + shift + residual) in one kernel.

scale and shift are per output channel (a folded eval-mode BatchNorm: scale = gamma / sqrt(var + eps),
shift = beta - mean * scale); residual is a tensor of the output's shape (a ResNet shortcut); the activation
is None or "relu". The convolution's semantics are torch.nn.functional.conv2d's: any kernel size, stride,
padding (int, pair, "valid" or "same") and dilation; groups 1 or depthwise (groups == in_channels).

Layers: ``fused_conv2d`` validates and resolves the arguments; the registered custom op
``torch.ops.fastseg.fused_conv2d`` carries the fake implementation (torch.compile) and autograd, and eager calls on
CPU and CUDA tensors run its implementation directly, through a torch.autograd.Function when a gradient is needed
(ops/_eager.py: without the op's dispatch layers a small call's host time drops from about 60 to 30 us on the CI
machine), or, where it runs torch's own ops only ("aten" on the CPU), under torch's autograd of those ops, whose
backward needs no Python; the forward runs on one backend: the Triton implicit-GEMM kernel (``conv_kernels.py``) or
the plain-PyTorch reference below. "auto" on CUDA times the Triton kernel against cuDNN with the affine folded into
the weights (``folded_conv2d``: torch's convolution, then the residual and ReLU in place; and, when the epilogue
ends in a ReLU, cuDNN's fused cudnn_convolution_(add_)relu as a third candidate) on the first call of each problem,
and keeps the fastest (``auto_choices()`` lists what it kept, ``auto_timings()`` the times it chose by);
``fastseg.backend("triton")`` forces the kernel. On the CPU "auto" runs ATen (``folded_conv2d`` through oneDNN's
convolution, which adds the folded bias itself): a pass fewer than eager conv -> BatchNorm -> ReLU; float16 and
bfloat16 CPU tensors run on the reference, which computes in float32 (torch's CPU half-precision convolutions may
accumulate in half). The Triton backward kernels are registered ops too (``fused_conv2d_input_grad``,
``fused_conv2d_weight_grad``), so torch.compile traces the backward.

Backward: it runs on the backend the forward ran under (saved in the autograd context), and picks the
gradients of x and weight by that backend:

- ``fastseg.backend("triton")`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), groups == 1: the
  Triton kernels of ``conv_backward_kernels.py``, an implicit GEMM for the input gradient and one for the weight
  gradient, each applying the epilogue's chain rule (ReLU mask from the saved output, times scale) as it loads
  grad_out, so the gradient at the convolution's output never materialises.
- ``"auto"`` (on CUDA too, whichever forward it runs), ``"aten"``, ``"reference"``, depthwise and float64:
  torch's own convolution backward (``aten.convolution_backward``: cuDNN on CUDA) applied to the gradient at
  the convolution's output, computed in plain PyTorch from the same chain rule. "auto" keeps cuDNN until GPU
  measurements (``python -m fastseg bench --ops conv --backends auto triton``, the train_step rows) show the Triton
  backward faster.

Either way the bias, scale, shift and residual gradients are reductions in plain PyTorch.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastseg import _backend
from fastseg.ops._eager import needs_grad, skips_dispatch

_backend.register_op("fused_conv2d", {"triton", "aten", "reference"})

ACTIVATIONS = (None, "relu")


# --- argument handling, as torch does it ----------------------------------------------------------


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return (value[0], value[1])
    raise TypeError(f"fused_conv2d: {what} must be an int or a tuple of two ints, but got {value!r}")


def _resolve_padding(padding, kernel_size, stride, dilation) -> list[int]:
    """padding as [top, left, bottom, right]. "same" puts the odd pixel at the bottom/right, as F.conv2d."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise ValueError(f"fused_conv2d: Invalid padding string {padding!r}, should be one of ['valid', 'same']")
        if stride != (1, 1):
            raise ValueError("fused_conv2d: padding='same' is not supported for strided convolutions")
        total = [dilation[i] * (kernel_size[i] - 1) for i in range(2)]
        return [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
    p = _pair(padding, "padding")
    if p[0] < 0 or p[1] < 0:
        raise RuntimeError("fused_conv2d: negative padding is not supported")
    return [p[0], p[1], p[0], p[1]]


def output_size(H: int, W: int, kernel_size, stride, padding4, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel_size, stride, padding4, dilation
    return ((H + pt + pb - dh * (kh - 1) - 1) // sh + 1, (W + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def _output_memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """F.conv2d's choice: channels_last when the input or the weight is channels_last."""
    for t in (x, weight):
        if t.dim() == 4 and t.size(1) > 1 and not t.is_contiguous() and t.is_contiguous(
                memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _check(x: Tensor, weight: Tensor, bias, scale, shift, residual, stride, padding4, dilation, groups,
           activation) -> tuple[int, int]:
    """Raise as F.conv2d does for invalid arguments; return (OH, OW)."""
    if x.dim() != 4:
        raise RuntimeError(
            f"fused_conv2d: Expected 3D (unbatched) or 4D (batched) input, but got input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"fused_conv2d: weight must be 4-dimensional, but got size {list(weight.shape)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"fused_conv2d: expected a floating-point input, but got {x.dtype}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"fused_conv2d: Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    if weight.device != x.device:
        raise RuntimeError(f"fused_conv2d: input on {x.device} and weight on {weight.device}")
    if groups < 1:
        raise RuntimeError("fused_conv2d: non-positive groups is not supported")
    if min(stride) < 1:
        raise RuntimeError("fused_conv2d: non-positive stride is not supported")
    if min(dilation) < 1:
        raise RuntimeError("fused_conv2d: dilation should be greater than zero")
    C, K = x.shape[1], weight.shape[0]
    if C != weight.shape[1] * groups:
        raise RuntimeError(
            f"fused_conv2d: Given groups={groups}, weight of size {list(weight.shape)}, expected input"
            f"{list(x.shape)} to have {weight.shape[1] * groups} channels, but got {C} channels instead")
    if K % groups != 0:
        raise RuntimeError(
            f"fused_conv2d: Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead")
    if groups != 1 and groups != C:
        raise NotImplementedError(
            f"fused_conv2d: groups={groups} with {C} input channels: only groups=1 and depthwise "
            "(groups == in_channels) are implemented")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_conv2d: activation must be None or 'relu', but got {activation!r}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != K:
            raise RuntimeError(
                f"fused_conv2d: Given weight of size {list(weight.shape)}, expected {name} to be 1-dimensional "
                f"with {K} elements, but got {name} of size {list(t.shape)} instead")
        if t.device != x.device:
            raise RuntimeError(f"fused_conv2d: input on {x.device} and {name} on {t.device}")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"fused_conv2d: Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise RuntimeError(f"fused_conv2d: {name} must be {x.dtype} or float32, but got {t.dtype}")
    kh, kw = weight.shape[2:]
    H, W = x.shape[2:]
    OH, OW = output_size(H, W, (kh, kw), stride, padding4, dilation)
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"fused_conv2d: Calculated padded input size per channel: ({H + padding4[0] + padding4[2]} x "
            f"{W + padding4[1] + padding4[3]}). Kernel size: ({dilation[0] * (kh - 1) + 1} x "
            f"{dilation[1] * (kw - 1) + 1}). Kernel size can't be greater than actual input size")
    if residual is not None:
        expected = (x.shape[0], K, OH, OW)
        if tuple(residual.shape) != expected:
            raise RuntimeError(
                f"fused_conv2d: residual must have the output's shape {list(expected)}, but got {list(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise RuntimeError(
                f"fused_conv2d: residual must be {x.dtype} on {x.device}, but got {residual.dtype} on {residual.device}")
    return OH, OW


def _empty_output(x: Tensor, weight: Tensor, OH: int, OW: int) -> Tensor:
    return torch.empty((x.shape[0], weight.shape[0], OH, OW), dtype=x.dtype, device=x.device,
                       memory_format=_output_memory_format(x, weight))


# --- the plain-PyTorch reference --------------------------------------------------------------------


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def reference_conv(x: Tensor, weight: Tensor, bias, stride, padding4, dilation, groups) -> Tensor:
    """conv2d(x, weight) + bias with [top, left, bottom, right] padding, in plain PyTorch (differentiable)."""
    pt, pl, pb, pr = padding4
    if (pt, pl) != (pb, pr):
        x = F.pad(x, (pl, pr, pt, pb))
        pt = pl = 0
    return F.conv2d(x, weight, bias, tuple(stride), (pt, pl), tuple(dilation), groups)


def reference_fused_conv2d(x: Tensor, weight: Tensor, bias=None, scale=None, shift=None, residual=None,
                           stride=(1, 1), padding4=(0, 0, 0, 0), dilation=(1, 1), groups=1,
                           activation=None) -> Tensor:
    """act((conv2d(x, weight) + bias) * scale + shift + residual) in plain PyTorch: the specification.

    float16 / bfloat16 are computed in float32 (as the kernel accumulates) and rounded once at the end;
    differentiable, so gradcheck can run on it in float64.
    """
    dtype = x.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def up(t):
        return t if t is None or t.dtype == compute else t.to(compute)

    y = reference_conv(up(x), up(weight), up(bias), stride, padding4, dilation, groups)
    if scale is not None:
        y = y * _channel(up(scale))
    if shift is not None:
        y = y + _channel(up(shift))
    if residual is not None:
        y = y + up(residual)
    if activation == "relu":
        y = torch.relu(y)
    return y.to(dtype)


# --- dispatch to one backend ------------------------------------------------------------------------


def _triton_kernels():
    from fastseg.ops import conv_kernels  # imports triton: only when a Triton kernel runs

    return conv_kernels


def _triton_backward_kernels():
    from fastseg.ops import conv_backward_kernels

    return conv_backward_kernels


def _allow_tf32() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def _forward_into(out, x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation):
    """The Triton kernel, into ``out``."""
    _triton_kernels().forward(x, weight, bias, scale, shift, residual, out, tuple(stride), tuple(padding4[:2]),
                              tuple(dilation), groups, activation == "relu", _allow_tf32())


# --- "auto" on CUDA: per problem, the fastest of the Triton kernel and cuDNN ------------------------------
#
# Measured on an H100 (benchmarks/results/2026-11-27-h100-0cad134.json), the Triton kernel beat eager cuDNN
# conv -> BatchNorm -> ReLU on one network shape of fifteen. So that "auto" (and fastseg.optimize) never trades
# a fast cuDNN convolution for a slower kernel, it times the candidates on the first call of each problem
# (shapes, layout, dtype, convolution parameters, epilogue) and keeps the fastest, as cudnn.benchmark does for
# cuDNN's algorithms.


def folded_conv2d(x: Tensor, weight: Tensor, bias, scale, shift, residual, stride, padding4, dilation, groups,
                  activation, *, cudnn_fusion: bool = False, triton_epilogue: bool | None = None) -> Tensor:
    """The fused op through torch's convolution (cuDNN on CUDA, oneDNN on the CPU), the affine folded into the
    weights and bias (weight * scale and bias * scale + shift, computed in float32 or wider and rounded once to
    x's dtype), then the residual and ReLU in place. With ``triton_epilogue`` (default: on CUDA, outside CUDA-graph
    capture; True runs it on CPU tensors under Triton's interpreter) F.conv2d without bias, then bias, residual
    and ReLU in one pass of a Triton kernel where the output is channels_last; else F.conv2d with the bias, and
    torch's in-place ops, a pass each.
    With ``cudnn_fusion`` (CUDA tensors and an epilogue ending in a ReLU; anything else raises) cuDNN's fused
    convolution + bias (+ residual) + ReLU instead (torch.cudnn_convolution_relu / cudnn_convolution_add_relu):
    one call, but its kernels can be many times slower than the plain convolution's (pytorch#68506:
    channels_last, 7x7), so "auto" times both. The result has F.conv2d's memory format."""
    if cudnn_fusion and not (activation == "relu" and x.is_cuda):
        raise ValueError("folded_conv2d: cuDNN's fusion needs CUDA tensors and an epilogue ending in a ReLU")
    memory_format = _output_memory_format(x, weight)
    compute = torch.promote_types(x.dtype, torch.float32)
    if scale is not None:
        weight = (weight.to(compute) * scale.to(compute).view(-1, 1, 1, 1)).to(x.dtype)
    if scale is not None or shift is not None:
        folded = torch.zeros(weight.shape[0], dtype=compute, device=x.device) if bias is None else bias.to(compute)
        if scale is not None:
            folded = folded * scale.to(compute)
        if shift is not None:
            folded = folded + shift.to(compute)
        bias = folded.to(x.dtype)
    pt, pl, pb, pr = padding4
    if (pt, pl) != (pb, pr):
        x = F.pad(x, (pl, pr, pt, pb))
        pt = pl = 0
    stride, padding, dilation = list(stride), [pt, pl], list(dilation)
    if cudnn_fusion:
        if residual is None:
            y = torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        else:
            y = torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)
    else:
        # On CUDA torch adds a convolution's bias in a pass of its own (cuDNN's convolution takes none), then the
        # residual and the ReLU in one pass each. One Triton pass over a channels_last output does all three, with
        # 16-byte accesses (an NCHW one would be read 2 bytes at a time: torch's passes stay there). Not while a
        # CUDA graph is captured: "auto" runs untimed problems here then, and the pass could be compiling for the
        # first time.
        if triton_epilogue is None:
            triton_epilogue = x.is_cuda and not torch.cuda.is_current_stream_capturing()
        y = F.conv2d(x, weight, None if triton_epilogue else bias, stride, padding, dilation, groups)
        if (triton_epilogue and y.is_contiguous(memory_format=torch.channels_last)
                and (bias is not None or residual is not None or activation == "relu")):
            _triton_kernels().bias_residual_relu_(y, bias, residual, activation == "relu")
        else:
            if triton_epilogue and bias is not None:
                y = y.add_(bias.view(1, -1, 1, 1))
            if residual is not None:
                y = y.add_(residual)
            if activation == "relu":
                y = y.relu_()
    return y.contiguous(memory_format=memory_format)


# problem key -> "triton", "cudnn" or "cudnn_fused", the implementation "auto" runs for it on CUDA
_auto_choices: dict[tuple, str] = {}
# problem key -> {candidate: its mean time in ms} from the timing that made the choice
_auto_timings: dict[tuple, dict[str, float]] = {}
_AUTO_TIMING_CALLS = 5


def auto_choices() -> dict[tuple, str]:
    """What "auto" chose per problem so far (key: x's shape, dtype, layout, then the op's parameters)."""
    return dict(_auto_choices)


def auto_timings() -> dict[tuple, dict[str, float]]:
    """The times behind those choices: per problem (auto_choices' keys), each candidate that ran and its mean time
    in ms over a few calls (the benchmark reports them: the Triton kernel's time also where cuDNN won)."""
    return {key: dict(times) for key, times in _auto_timings.items()}


def _problem_key(x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation) -> tuple:
    return (tuple(x.shape), x.dtype, x.device, _output_memory_format(x, weight), tuple(weight.shape), x.stride(),
            weight.stride(), tuple(None if t is None else t.dtype for t in (bias, scale, shift, residual)),
            tuple(stride), tuple(padding4), tuple(dilation), groups, activation, _allow_tf32())


def _mean_ms(fn) -> float:
    """Mean time of one call of `fn` on the current CUDA stream, after one warm-up call (which compiles and
    autotunes the Triton kernel)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_AUTO_TIMING_CALLS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _AUTO_TIMING_CALLS


def _auto_impl(x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation) -> str:
    """The implementation "auto" runs on CUDA: the one timed fastest for this problem. A candidate that raises
    (e.g. a cuDNN fusion this dtype lacks, a Triton kernel that does not compile) drops out with a warning;
    under CUDA-graph capture, where nothing can be timed (or compiled), an untimed problem runs on cuDNN."""
    key = _problem_key(x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation)
    choice = _auto_choices.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        return "cudnn"
    args = (x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation)
    out = _empty_output(x, weight, *output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding4, dilation))
    candidates = {
        "triton": lambda: _forward_into(out, *args),
        "cudnn": lambda: folded_conv2d(*args),
    }
    if activation == "relu":
        candidates["cudnn_fused"] = lambda: folded_conv2d(*args, cudnn_fusion=True)
    times, errors = {}, {}
    for name, run in candidates.items():
        try:
            times[name] = _mean_ms(run)
        except Exception as error:  # noqa: BLE001 (a Triton compilation error is no RuntimeError): it drops out
            errors[name] = error
    if not times:
        raise errors["triton"]
    for name, error in errors.items():
        warnings.warn(f"fastseg.fused_conv2d: the {name} implementation failed for this problem and is not used "
                      f"by backend 'auto': {str(error).splitlines()[0]}", RuntimeWarning, stacklevel=3)
    _auto_timings[key] = times
    choice = _auto_choices[key] = min(times, key=times.get)
    return choice


def _implementation(x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation) -> str:
    """"triton", "cudnn", "cudnn_fused", "aten" or "reference": what runs the forward now. "aten" and "cudnn" are
    both folded_conv2d ("cudnn": among "auto"'s CUDA candidates). float64 has no Triton kernel (and no float64
    tensor cores): under "triton" it runs on the reference; so do float16 and bfloat16 CPU tensors under "aten"
    (see the module doc)."""
    impl = _backend.select("fused_conv2d", x.device)
    if impl == "aten":
        return "reference" if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else "aten"
    if impl != "triton" or x.dtype == torch.float64:
        return "reference"
    if _backend.current_backend() == "auto" and x.is_cuda:
        return _auto_impl(x, weight, bias, scale, shift, residual, stride, padding4, dilation, groups, activation)
    return "triton"


# --- registered op: autograd and fake implementation --------------------------------------------------


def _fused_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                  shift: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int,
                  activation: Optional[str]) -> Tensor:
    """act((conv2d(x, weight) + bias) * scale + shift + residual); padding is [top, left, bottom, right]."""
    OH, OW = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if x.shape[0] * weight.shape[0] * OH * OW == 0:
        return _empty_output(x, weight, OH, OW)
    args = (x, weight, bias, scale, shift, residual, stride, padding, dilation, groups, activation)
    impl = _implementation(*args)
    if impl in ("aten", "cudnn", "cudnn_fused"):  # they allocate their own output
        return folded_conv2d(*args, cudnn_fusion=impl == "cudnn_fused")
    if impl == "reference":  # its result is the output (in F.conv2d's memory format): no copy into another
        return reference_fused_conv2d(*args).contiguous(memory_format=_output_memory_format(x, weight))
    out = _empty_output(x, weight, OH, OW)
    _forward_into(out, *args)
    return out


_fused_conv2d_op = torch.library.custom_op("fastseg::fused_conv2d", _fused_conv2d, mutates_args=())


@_fused_conv2d_op.register_fake
def _(x, weight, bias, scale, shift, residual, stride, padding, dilation, groups, activation):
    OH, OW = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return _empty_output(x, weight, OH, OW)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, residual, stride, padding, dilation, groups, activation = inputs
    ctx.save_for_backward(x, weight, bias, scale, output if activation == "relu" else None)
    ctx.params = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation
    ctx.has = (bias is not None, scale is not None, shift is not None, residual is not None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (scale, shift))
    ctx.backend = _backend.current_backend()


def _conv_backward(grad_conv: Tensor, x: Tensor, weight: Tensor, stride, padding4, dilation, groups,
                   need_x: bool, need_w: bool, need_sum: bool):
    """(grad_x, grad_weight, grad_conv summed over all but the channel dimension) of conv2d(x, weight) with
    [top, left, bottom, right] padding, by torch's own convolution backward (cuDNN on CUDA); None where not
    needed. The sum is a bias's gradient: torch computes it with the others (oneDNN in the same pass)."""
    pt, pl, pb, pr = padding4
    asymmetric = (pt, pl) != (pb, pr)
    xin = F.pad(x, (pl, pr, pt, pb)) if asymmetric else x
    pad = [0, 0] if asymmetric else [pt, pl]
    grad_x, grad_w, grad_sum = torch.ops.aten.convolution_backward(
        grad_conv, xin, weight, [weight.shape[0]] if need_sum else None, list(stride), pad, list(dilation), False,
        [0, 0], groups, [need_x, need_w, need_sum])
    if asymmetric and grad_x is not None:
        grad_x = grad_x[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
    return grad_x, grad_w, grad_sum


# The Triton backward kernels as ops of their own, so that torch.compile traces the backward through their fake
# implementations. Each applies the epilogue's chain rule to grad_out itself: ``out`` is the op's saved output
# when it ends in a ReLU, else None; padding is [top, left, bottom, right]; groups == 1.


@torch.library.custom_op("fastseg::fused_conv2d_input_grad", mutates_args=())
def _input_grad_op(grad_out: Tensor, out: Optional[Tensor], scale: Optional[Tensor], x: Tensor, weight: Tensor,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The fused op's gradient with respect to x, in x's dtype and memory format (Triton kernel)."""
    grad_x = torch.empty_like(x)
    _triton_backward_kernels().input_grad(grad_out, out, scale, weight, grad_x, tuple(stride), tuple(padding[:2]),
                                          tuple(dilation), _allow_tf32())
    return grad_x


@_input_grad_op.register_fake
def _(grad_out, out, scale, x, weight, stride, padding, dilation):
    return torch.empty_like(x)


@torch.library.custom_op("fastseg::fused_conv2d_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: Tensor, out: Optional[Tensor], scale: Optional[Tensor], x: Tensor, weight: Tensor,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The fused op's gradient with respect to the weight, in the weight's dtype and memory format (Triton
    kernel; deterministic)."""
    grad_w = torch.empty_like(weight)
    _triton_backward_kernels().weight_grad(grad_out, out, scale, x, grad_w, tuple(stride), tuple(padding[:2]),
                                           tuple(dilation), _allow_tf32())
    return grad_w


@_weight_grad_op.register_fake
def _(grad_out, out, scale, x, weight, stride, padding, dilation):
    return torch.empty_like(weight)


def _fused_conv2d_grad(ctx, grad_out):
    """The epilogue's chain rule and the convolution's backward, on the forward's backend (see the module doc)."""
    x, weight, bias, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.params
    has_bias, has_scale, has_shift, has_residual = ctx.has
    needs = ctx.needs_input_grad
    grad_scale = grad_shift = grad_residual = grad_bias = grad_x = grad_w = None
    need_conv = needs[0] or needs[1]
    triton_conv = need_conv and ctx.backend == "triton" and groups == 1 and x.dtype != torch.float64
    if triton_conv:
        conv_args = (grad_out, out, scale, x, weight, stride, padding, dilation)
        grad_x = torch.ops.fastseg.fused_conv2d_input_grad(*conv_args) if needs[0] else None
        grad_w = torch.ops.fastseg.fused_conv2d_weight_grad(*conv_args) if needs[1] else None
    torch_conv = need_conv and not triton_conv
    need_bias, need_scale = has_bias and needs[2], has_scale and needs[3]
    need_shift, need_residual = has_shift and needs[4], has_residual and needs[5]
    if not (torch_conv or need_bias or need_scale or need_shift or need_residual):
        return (grad_x, grad_w, None, None, None, None, None, None, None, None, None)
    # g: the gradient at the epilogue's sum (conv + bias) * scale + shift + residual, in grad_out's dtype (the
    # ReLU mask selects, it does not round); torch's ReLU backward, so a NaN output passes its gradient on.
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if ctx.activation == "relu" else grad_out
    compute = torch.promote_types(grad_out.dtype, torch.float32)
    if need_residual:
        grad_residual = g
    if need_scale:
        # d out / d scale = conv(x, w) + bias, recomputed (not saved): one more forward, training of scale only.
        with _backend.backend(ctx.backend):
            pre = torch.ops.fastseg.fused_conv2d(x, weight, bias, None, None, None, stride, padding, dilation,
                                                 groups, None)
        grad_scale = (g.to(compute) * pre.to(compute)).sum((0, 2, 3)).to(ctx.dtypes[0])
    # sum(g) over everything but the channel: the shift's gradient, and scale times it the bias's. torch's
    # convolution backward computes it along with the others where g's dtype is the compute dtype.
    sum_in_backward = torch_conv and (need_bias or need_shift) and g.dtype == compute
    sum_g = None
    if (need_bias or need_shift) and not sum_in_backward:
        sum_g = g.sum((0, 2, 3), dtype=compute)
    if torch_conv:
        # The convolution's gradient is that of g * scale: scale folded into the weight for grad_x (a pass over
        # the weights instead of one over g) and applied to grad_w after, which does not depend on the weight.
        # CPU half-precision convolutions may accumulate in half: there they run in float32 and round once.
        upcast = x.device.type == "cpu" and compute != x.dtype
        conv_weight = weight.to(compute) if upcast else weight
        if has_scale:
            conv_weight = conv_weight.to(compute) * scale.to(compute).view(-1, 1, 1, 1)
            conv_weight = conv_weight if upcast else conv_weight.to(weight.dtype)
        if upcast:
            grad_x, grad_w, _ = _conv_backward(g.to(compute), x.to(compute), conv_weight, stride, padding, dilation,
                                               groups, needs[0], needs[1], False)
        else:
            grad_x, grad_w, sum_out = _conv_backward(g.to(x.dtype), x, conv_weight, stride, padding, dilation,
                                                     groups, needs[0], needs[1], sum_in_backward)
            if sum_in_backward:
                sum_g = sum_out
        if grad_w is not None and has_scale:
            grad_w = grad_w.to(compute) * scale.to(compute).view(-1, 1, 1, 1)
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    if need_shift:
        grad_shift = sum_g.to(ctx.dtypes[1])
    if need_bias:
        grad_bias = (sum_g * scale.to(compute) if has_scale else sum_g).to(bias.dtype)
    return (grad_x, grad_w, grad_bias, grad_scale, grad_shift, grad_residual, None, None, None, None, None)


_fused_conv2d_op.register_autograd(_fused_conv2d_grad, setup_context=_setup_context)


def _torch_autograd_differentiates(x: Tensor, weight: Tensor, OH: int, OW: int) -> bool:
    """Whether an eager call that needs a gradient may run the implementation without the op's autograd: "aten"
    on CPU tensors (float32, float64) is torch's own differentiable ops only (the fold, oneDNN's convolution, the
    in-place residual and ReLU), and torch's autograd runs their backward in C++: the same formulas as the op's
    backward (the ReLU's threshold_backward, torch's convolution backward) without its Python, which cost more
    than a small layer's kernels. Not for an empty output, which the implementation returns detached."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] * weight.shape[0] * OH * OW > 0 and _backend.select("fused_conv2d", x.device) == "aten")


class _FusedConv2dFunction(torch.autograd.Function):
    """fastseg::fused_conv2d's forward and autograd for eager calls that need a gradient (ops._eager): the same
    implementation, setup and backward as the registered op's."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _fused_conv2d(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _fused_conv2d_grad(ctx, grad_out)


# --- public function ----------------------------------------------------------------------------------


def fused_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, scale: Tensor | None = None, shift: Tensor | None = None,
                 activation: str | None = None, residual: Tensor | None = None) -> Tensor:
    """act((conv2d(x, weight, bias) * scale + shift + residual)), one kernel on CUDA.

    Args:
        x: (N, C, H, W) or (C, H, W); float16, bfloat16 or float32 (float64 runs on the reference);
            NCHW, channels_last or any strides. The output takes F.conv2d's memory format (channels_last
            when x or weight is channels_last).
        weight: (K, C / groups, kh, kw), x's dtype. bias: (K,) or None, x's dtype.
        stride, padding, dilation, groups: as F.conv2d; padding an int, a pair, "valid" or "same"
            ("same" only with stride 1); groups 1 or C (depthwise).
        scale, shift: (K,) per-output-channel affine (a folded BatchNorm), x's dtype or float32, or None.
        activation: None or "relu".
        residual: a tensor of the output's shape added before the activation, or None.

    On CUDA, "auto" runs the Triton kernel or cuDNN (the affine folded into the weights and bias; with or
    without cuDNN's own ReLU fusion), whichever it timed fastest on the first call with these shapes and
    parameters; ``fastseg.backend("triton")`` forces the kernel. On the CPU "auto" runs torch's convolution
    with the affine folded into the weights (float32 and float64; half types on the reference).
    float32 uses TF32 tensor cores only when torch.backends.cudnn.allow_tf32 is set, as F.conv2d on CUDA.
    Under torch.autocast x, weight, bias and residual are cast to the autocast dtype, as F.conv2d's inputs are.
    Differentiable in x, weight, bias, scale, shift and residual. The backward runs on the forward's backend:
    under ``fastseg.backend("triton")`` (groups 1) the gradients of x and weight come from Triton kernels that
    apply the ReLU mask and scale as they read the output gradient; under "auto" (CUDA included), "aten" and
    "reference", and for depthwise or float64, from torch's convolution backward (cuDNN on CUDA), which "auto"
    keeps until GPU measurements show the Triton backward faster. The other gradients are PyTorch reductions.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fused_conv2d: x and weight must be tensors")
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: no autocast (it raises)
        # As F.conv2d under autocast: the convolution's inputs in the autocast dtype (scale and shift may stay
        # float32, as the kernel takes them); the residual too, so the output keeps that dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, residual = (t.to(dtype) if t is not None and t.is_floating_point() else t
                                     for t in (x, weight, bias, residual))
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
        if residual is not None:
            residual = residual.unsqueeze(0)
    if weight.dim() != 4:
        raise RuntimeError(f"fused_conv2d: weight must be 4-dimensional, but got size {list(weight.shape)}")
    s = _pair(stride, "stride")
    d = _pair(dilation, "dilation")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"fused_conv2d: groups must be an int, but got {groups!r}")
    padding4 = _resolve_padding(padding, tuple(weight.shape[2:]), s, d)
    OH, OW = _check(x, weight, bias, scale, shift, residual, s, padding4, d, groups, activation)
    args = (x, weight, bias, scale, shift, residual, list(s), padding4, list(d), groups, activation)
    if not skips_dispatch(x):
        out = torch.ops.fastseg.fused_conv2d(*args)
    elif needs_grad(x, weight, bias, scale, shift, residual) and not _torch_autograd_differentiates(x, weight, OH, OW):
        out = _FusedConv2dFunction.apply(*args)
    else:
        out = _fused_conv2d(*args)
    return out.squeeze(0) if unbatched else out
