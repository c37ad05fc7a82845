"""FusedConv2d and ConvBNAct: torch.nn's convolution blocks running fastseg.fused_conv2d.

- ``FusedConv2d`` is an ``nn.Conv2d`` (same constructor, attributes, parameters and state_dict) whose forward
  runs the fused kernel; groups other than 1 and depthwise fall back to nn.Conv2d's forward.
- ``ConvBNAct`` wraps an existing conv -> BatchNorm2d -> ReLU triple (``from_modules``), keeping them as its
  submodules ``conv``, ``bn`` and ``act`` so that the state_dict keys are those of a module holding them under
  these names. In eval mode the BatchNorm's running statistics are folded into the kernel's per-channel scale
  and shift (scale = gamma / sqrt(var + eps), shift = beta - mean * scale) and the ReLU into its epilogue:
  one kernel. In training mode (or when the BatchNorm tracks no running statistics) the convolution runs
  through the fused op without its epilogue and the BatchNorm module itself runs next, so batch statistics,
  running statistics, momentum and num_batches_tracked are exactly nn.BatchNorm2d's: fusion never changes
  training results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.ops.conv import fused_conv2d


def _fusable_groups(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 or conv.groups == conv.in_channels


def _run_conv(conv: nn.Conv2d, x: torch.Tensor, **epilogue) -> torch.Tensor:
    """conv's convolution of x through fused_conv2d (with the epilogue), honouring padding_mode."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return fused_conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups, **epilogue)


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
    statistics on every call, so edits to the BatchNorm take effect). Training: conv (fused op, no epilogue),
    then the BatchNorm module, then the activation: exactly torch's results and running-statistics updates.
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
        scale, shift = self.folded_scale_shift()
        if scale is not None and x.dtype == torch.float64:
            scale, shift = scale.double(), shift.double()
        return _run_conv(conv, x, scale=scale, shift=shift, residual=residual, activation=self.activation)
