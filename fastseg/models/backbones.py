"""Backbones for the reference networks: VGG-16 (Simonyan & Zisserman 2015) and ResNet-50/101 (He et al. 2016).

Built from torch.nn modules only, randomly initialised (nothing is downloaded), with torchvision's module and
parameter names so that torchvision checkpoints load as they are:

- ``vgg16_features`` is torchvision's ``vgg16().features`` / ``vgg16_bn().features`` (a flat nn.Sequential
  with the same indices), with the pooling, first-layer padding and dilations each network needs (those have
  no parameters, so the ImageNet weights still fit).
- ``ResNet`` is torchvision's ResNet trunk without ``avgpool`` and ``fc`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ..., ``layer1.0.downsample.0/1``), returning chosen stages the way torchvision's IntermediateLayerGetter does,
  with ``replace_stride_with_dilation`` for dense prediction.

Conv -> BatchNorm -> ReLU runs are consecutive children of an nn.Sequential (VGG) or attributes each applied
once, in that order, by a torch.fx-traceable forward (ResNet, whose names torchvision fixes): what fastseg's
converter needs to prove a chain and fuse it.

``base_width`` (64 in the papers) scales every channel count; small values build scaled-down copies for tests.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

# Convolutions per VGG-16 stage; each stage ends in a pooling layer.
VGG16_STAGE_DEPTHS = (2, 2, 3, 3, 3)
# Channels of each VGG-16 stage in units of base_width.
VGG16_STAGE_WIDTHS = (1, 2, 4, 8, 8)


def check_image_batch(model: str, x: Tensor, in_channels: int) -> None:
    """Raise a ValueError naming `model` unless x is an [N, in_channels, H, W] tensor."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{model} expects an input of shape [N, {in_channels}, H, W], got {got}")


def vgg16_features(in_channels: int = 3, *, batch_norm: bool = False, base_width: int = 64,
                   first_padding: int = 1, pools: Sequence[nn.Module] | None = None,
                   dilations: Sequence[int] = (1, 1, 1, 1, 1)) -> nn.Sequential:
    """The 13 convolutions of VGG-16 with a pooling layer after each of its 5 stages, as one nn.Sequential.

    Indices match torchvision's ``vgg16(...).features`` (``vgg16_bn`` with batch_norm=True): each 3x3
    convolution is followed by [BatchNorm2d,] ReLU, and the pools sit at the same positions.

    Args:
        in_channels: image channels (3 for RGB; 1 for most medical images).
        batch_norm: Conv2d -> BatchNorm2d -> ReLU instead of Conv2d -> ReLU (VGG-16-BN, as SegNet).
        base_width: channels of the first stage (64 in VGG-16); the stages have 1, 2, 4, 8, 8 times that.
        first_padding: zero padding of the very first convolution (FCN pads by 100 so that any input size
            survives the valid 7x7 fc6; 1 elsewhere).
        pools: the 5 pooling modules ending the stages; default nn.MaxPool2d(2, 2) each (VGG-16's).
        dilations: dilation of each stage's 3x3 convolutions (padding equals the dilation, keeping sizes).
    """
    if pools is None:
        pools = [nn.MaxPool2d(kernel_size=2, stride=2) for _ in VGG16_STAGE_DEPTHS]
    if len(pools) != len(VGG16_STAGE_DEPTHS) or len(dilations) != len(VGG16_STAGE_DEPTHS):
        raise ValueError(f"vgg16_features: need {len(VGG16_STAGE_DEPTHS)} pools and dilations, one per stage")
    layers: list[nn.Module] = []
    channels = in_channels
    for depth, width, dilation, pool in zip(VGG16_STAGE_DEPTHS, VGG16_STAGE_WIDTHS, dilations, pools):
        for _ in range(depth):
            padding = first_padding if not layers else dilation
            layers.append(nn.Conv2d(channels, width * base_width, 3, padding=padding, dilation=dilation))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width * base_width))
            layers.append(nn.ReLU(inplace=True))
            channels = width * base_width
        layers.append(pool)
    features = nn.Sequential(*layers)
    for module in features.modules():
        # torchvision's VGG initialisation, so that a network trained from scratch starts as VGG would.
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


def stage_end_indices(features: nn.Sequential) -> tuple[int, ...]:
    """Positions of the pooling layers that end the stages of a vgg16_features Sequential."""
    return tuple(i for i, m in enumerate(features) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))


class Bottleneck(nn.Module):
    """ResNet bottleneck block, torchvision's: 1x1 reduce, 3x3 (strided, dilated), 1x1 expand (x4), each
    followed by BatchNorm, a residual connection and a ReLU after the sum.

    The stride sits on the 3x3 convolution (torchvision's "ResNet v1.5"); He et al.'s original Caffe model
    strides in the first 1x1. The parameters have the same shapes either way.

    Each ReLU is its own module (relu1..3), where torchvision calls one ``relu`` three times: ReLUs have no
    state, so the state_dict is torchvision's, and each conv -> BN -> ReLU runs once, which fastseg's converter
    needs to fuse it.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet trunk (conv1 .. layer4, no avgpool/fc) returning the stages named in return_layers.

    forward(x) returns an OrderedDict {return_layers[name]: output of stage name}, as torchvision's
    IntermediateLayerGetter over a ResNet does (DeepLab v3 and FCN use {"layer4": "out", "layer3": "aux"}).

    Args:
        blocks: bottleneck blocks per stage: (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
        in_channels: image channels.
        base_width: stem channels and first-stage planes (64 in the paper); stage i has base_width * 2**i
            planes and 4 times that output channels.
        replace_stride_with_dilation: for layer2, layer3, layer4, keep the resolution and dilate instead of
            striding (torchvision's argument): (False, True, True) gives output stride 8, (False, False, True) 16.
        multi_grid: DeepLab v3's unit rates for layer4's blocks (Chen et al. 2017, sec. 3.2): block i gets
            dilation = layer4's rate * multi_grid[i], the first block included. None keeps torchvision's rule
            (the first block of a dilated stage uses the previous stage's dilation).
        return_layers: which stages forward returns, under which names.
    """

    def __init__(self, blocks: Sequence[int], *, in_channels: int = 3, base_width: int = 64,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 multi_grid: Sequence[int] | None = None,
                 return_layers: dict[str, str] | None = None):
        super().__init__()
        if len(blocks) != 4 or len(replace_stride_with_dilation) != 3:
            raise ValueError("ResNet: blocks needs 4 entries and replace_stride_with_dilation 3")
        if multi_grid is not None and len(multi_grid) != blocks[3]:
            raise ValueError(f"ResNet: multi_grid needs one rate per layer4 block ({blocks[3]}), got {multi_grid}")
        self.in_channels = in_channels
        self.return_layers = dict(return_layers or {"layer4": "out"})
        unknown = set(self.return_layers) - {"layer1", "layer2", "layer3", "layer4"}
        if unknown:
            raise ValueError(f"ResNet: return_layers names unknown stages {sorted(unknown)}")
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes = base_width
        self._dilation = 1
        self.layer1 = self._make_layer(base_width, blocks[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(base_width * 2, blocks[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(base_width * 4, blocks[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(base_width * 8, blocks[3], 2, replace_stride_with_dilation[2], multi_grid)
        self.out_channels = base_width * 8 * Bottleneck.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool,
                    multi_grid: Sequence[int] | None = None) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        if multi_grid is None:
            rates = [previous_dilation] + [self._dilation] * (blocks - 1)
        else:
            rates = [self._dilation * unit for unit in multi_grid]
        layers = [Bottleneck(self._inplanes, planes, stride, rates[0], downsample)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes, dilation=rate) for rate in rates[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        # No input check here (the networks check): it would stop torch.fx, and with it fastseg's converter,
        # from tracing this forward and fusing the stem's conv1 -> bn1 -> relu.
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name in self.return_layers:
                outputs[self.return_layers[name]] = x
            if len(outputs) == len(self.return_layers):
                break  # later stages would be computed for nothing
        return outputs


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 trunk (He et al. 2016): bottleneck blocks (3, 4, 6, 3). Keyword arguments as ResNet."""
    return ResNet((3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 trunk (He et al. 2016): bottleneck blocks (3, 4, 23, 3). Keyword arguments as ResNet."""
    return ResNet((3, 4, 23, 3), **kwargs)


def upsample_to(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of score maps to `size` (the input's H, W; passed on as given, so that torch.fx can
    trace a forward that takes it from x.shape)."""
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
