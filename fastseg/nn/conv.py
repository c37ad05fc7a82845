"""FusedConv2d and ConvBNAct: torch.nn's convolution blocks running fastseg.fused_conv2d.

- ``FusedConv2d`` is an ``nn.Conv2d`` (same constructor, attributes, parameters and state_dict) whose forward
  runs the fused kernel; groups other than 1 and depthwise fall back to nn.Conv2d's forward.
- ``ConvBNAct`` wraps an existing conv -> BatchNorm2d -> ReLU triple (``from_modules``), keeping them as its
  submodules ``conv``, ``bn`` and ``act`` so that the state_dict keys are those of a module holding them under
  these names. In eval mode the BatchNorm's running statistics are folded into the kernel's per-channel scale
  and shift (scale = gamma / sqrt(var + eps), shift = beta - mean * scale) and the ReLU into its epilogue:
  one kernel. Inference (eval mode with autograd off, eagerly) goes one step further, as torch.fx's
  fuse_conv_bn_eval does: the scale and shift are folded into a copy of the convolution's weight and bias, made
  once and kept until a parameter or running statistic changes, so that each call is the convolution alone
  (folding on every call would cost a pass over the weights and a dozen small launches per layer, more than the
  BatchNorm it removes on a network's small layers). In training mode (or when the BatchNorm tracks no running
  statistics) the convolution runs through the fused op without its epilogue and the BatchNorm module itself
  runs next, so batch statistics, running statistics, momentum and num_batches_tracked are exactly
  nn.BatchNorm2d's: fusion never changes training results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.ops.conv import fused_conv2d


def _fusable_groups(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 or conv.groups == conv.in_channels


def _run_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              **epilogue) -> torch.Tensor:
    """conv's convolution of x through fused_conv2d (with the epilogue), honouring padding_mode; with `weight`,
    that weight and `bias` instead of conv's own."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    if weight is None:
        weight, bias = conv.weight, conv.bias
    return fused_conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups, **epilogue)


def _state_of(tensors) -> tuple | None:
    """What must stay the same for values computed from `tensors` to stay valid: each one's identity, version
    (in-place updates: load_state_dict, optimizer steps, edits under no_grad), storage, dtype and device (.to(),
    .half() swap a parameter's data); None when some tensor has no version counter (an inference tensor)."""
    state = []
    for t in tensors:
        if t is None:
            state.append(None)
            continue
        if t.is_inference():
            return None
        state.append((id(t), t._version, t.data_ptr(), t.dtype, t.device))
    return tuple(state)


class FusedConv2d(nn.Conv2d):
    """torch.nn.Conv2d computed by fastseg.fused_conv2d (a drop-in: same arguments, attributes, state_dict)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _fusable_groups(self):
            return super().forward(input)
        return _run_conv(self, input)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConv2d":
        """A FusedConv2d sharing conv's parameters (no copy)."""
        fused = cls.__new__(cls)
        fused.__dict__ = conv.__dict__.copy()
        fused._parameters = conv._parameters.copy()
        fused._buffers = conv._buffers.copy()
        fused._modules = conv._modules.copy()
        return fused


def _activation_name(act: nn.Module | None) -> str | None:
    if act is None or isinstance(act, nn.Identity):
        return None
    if isinstance(act, nn.ReLU):
        return "relu"
    raise ValueError(f"ConvBNAct: activation must be nn.ReLU, nn.Identity or None, but got {type(act).__name__}")


class ConvBNAct(nn.Module):
    """act(bn(conv(x)) [+ residual]) with submodules ``conv``, ``bn`` (or None) and ``act``.

    Eval mode: one fused kernel, the BatchNorm folded into scale/shift (computed in float32 from the running
    statistics, so gradients reach the BatchNorm's parameters). With autograd off (torch.no_grad, inference_mode)
    and outside torch.compile and CUDA-graph capture, the scale and shift are folded further into a copy of the
    convolution's weight and bias (rounded once to the weight's dtype), made on the first call and reused until
    one of the six tensors is changed, replaced or moved (edits take effect on the next call): one extra copy of
    the weights in memory, no per-call folding. Training: conv (fused op, no epilogue), then the BatchNorm
    module, then the activation: exactly torch's results and running-statistics updates.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: nn.Module | None = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvBNAct: conv must be an nn.Conv2d, but got {type(conv).__name__}")
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"ConvBNAct: bn must be an nn.BatchNorm2d or None, but got {type(bn).__name__}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"ConvBNAct: bn has {bn.num_features} features, conv {conv.out_channels} outputs")
        self.activation = _activation_name(act)
        self.conv = conv
        self.bn = bn
        self.act = act if act is not None else nn.Identity()
        self._folded: tuple | None = None  # (sources' state, folded weight, folded bias, sources): folded_weights

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                     act: nn.Module | None = None) -> "ConvBNAct":
        """Wrap existing modules (shared, not copied): the parameters and buffers stay theirs."""
        return cls(conv, bn, act)

    def folded_scale_shift(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) of the eval-mode BatchNorm, in float32 (or the BatchNorm's dtype if wider)."""
        bn = self.bn
        if bn is None:
            return None, None
        dtype = torch.promote_types(bn.running_var.dtype, torch.float32)
        inv_std = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        scale = inv_std * bn.weight.to(dtype) if bn.affine else inv_std
        shift = -bn.running_mean.to(dtype) * scale
        if bn.affine:
            shift = shift + bn.bias.to(dtype)
        return scale, shift

    def _batch_statistics(self) -> bool:
        bn = self.bn
        return bn is not None and (bn.training or bn.running_mean is None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if not _fusable_groups(conv) or self._batch_statistics():
            y = conv(x) if not _fusable_groups(conv) else _run_conv(conv, x)
            if self.bn is not None:
                y = self.bn(y)
            if residual is not None:
                y = y + residual
            return self.act(y)
        if self.bn is not None and self._reuses_folded_weights():
            weight, bias = self.folded_weights()
            return _run_conv(conv, x, weight, bias, residual=residual, activation=self.activation)
        scale, shift = self.folded_scale_shift()
        if scale is not None and x.dtype == torch.float64:
            scale, shift = scale.double(), shift.double()
        return _run_conv(conv, x, scale=scale, shift=shift, residual=residual, activation=self.activation)

    @staticmethod
    def _reuses_folded_weights() -> bool:
        """Whether a call may use (and keep) weights folded ahead: nothing needs their gradient, and nothing
        traces the call (torch.compile sees the fold itself) or records it (a CUDA graph would capture the
        fold's allocations)."""
        return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * scale, bias * scale + shift): the eval-mode BatchNorm folded into the convolution, computed
        in float32 (or wider) and rounded once to the weight's dtype, in the weight's memory format. Made on the
        first call and kept until conv.weight, conv.bias or the BatchNorm's parameters, running statistics or
        eps change (in place, replaced or moved); computed afresh when some of them are inference tensors."""
        conv, bn = self.conv, self.bn
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        state = _state_of(sources)
        if state is not None:
            state = (state, bn.eps, torch.is_inference_mode_enabled())
            if self._folded is not None and self._folded[0] == state:
                return self._folded[1], self._folded[2]
        with torch.no_grad():
            scale, shift = self.folded_scale_shift()
            weight = conv.weight
            compute = torch.promote_types(weight.dtype, scale.dtype)
            folded_weight = (weight.to(compute) * scale.to(compute).view(-1, 1, 1, 1)).to(weight.dtype)
            folded_bias = shift.to(compute)
            if conv.bias is not None:
                folded_bias = folded_bias + conv.bias.to(compute) * scale.to(compute)
            folded_bias = folded_bias.to(weight.dtype)
        # The sources themselves are held (not copied) with the state: their ids stay theirs.
        self._folded = None if state is None else (state, folded_weight, folded_bias, sources)
        return folded_weight, folded_bias

    def __getstate__(self):
        return dict(super().__getstate__(), _folded=None)  # derived: not pickled (torch.save of the module)
