"""Fully convolutional networks: FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) and FCN-ResNet50/101 (torchvision).

FCN-8s follows the paper and its reference Caffe model (voc-fcn8s):
- VGG-16's 13 convolutions, the first padded by 100 pixels, 2x2 max-pools rounding up (Caffe's pooling);
- fc6 and fc7 as convolutions: fc6 7x7 (valid) with 4096 channels, fc7 1x1 with 4096, each with ReLU and
  dropout 0.5; score_fr, a 1x1 class scorer;
- "skip" fusion: score_fr upsampled x2 plus a 1x1 score of pool4, upsampled x2 plus a 1x1 score of pool3,
  upsampled x8; every upsampling is a transposed convolution initialised to bilinear interpolation and
  learnable, as in the paper (the released models freeze them at bilinear: set requires_grad=False);
- the class scorers start at zero (the paper: random initialisation gave neither better results nor faster
  convergence, and zero-initialised skip scorers leave the coarser net's predictions unchanged at first);
- the fused maps are cropped at the offsets the padding implies (5 for pool4, 9 for pool3, 31 for the output),
  so any input H x W (H, W >= 1) gives H x W scores aligned with the input.

FCN-ResNet50/101 are torchvision's ``fcn_resnet50``/``fcn_resnet101``: a ResNet at output stride 8 (layer3 and
layer4 dilated), an FCNHead (3x3 conv, BN, ReLU, dropout 0.1, 1x1 conv) and an optional auxiliary FCNHead on
layer3, bilinear upsampling. Module and parameter names are torchvision's (``backbone.*``, ``classifier.*``,
``aux_classifier.*``), so its state_dicts load as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fastseg.models.backbones import (
    ResNet,
    check_image_batch,
    resnet50,
    resnet101,
    stage_end_indices,
    upsample_to,
    vgg16_features,
)


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """[channels, channels, k, k] weights making ConvTranspose2d(stride=factor, kernel_size=2*factor - factor % 2)
    a per-channel bilinear upsampling (FCN's upsampling initialisation): the separable tent filter on the
    diagonal, zero across channels."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
    return weight.float()


class FCN8s(nn.Module):
    """FCN-8s on VGG-16 (Long et al. 2015). forward(x [N, C, H, W]) -> class scores [N, num_classes, H, W].

    Submodules: ``features`` (torchvision's vgg16().features indices, so ImageNet VGG-16 conv weights load
    into it), ``fc6``/``fc7`` (Sequential conv, ReLU, dropout; torchvision's classifier.0/3 Linear weights
    reshape into them), ``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore2``, ``upscore_pool4``,
    ``upscore8`` (the Caffe model's layer names).
    """

    # Crop offsets of the reference model: where each coarser map's first pixel lands in the finer one,
    # given the 100-pixel padding of conv1_1 (from composing every layer's coordinate map).
    POOL4_OFFSET = 5
    POOL3_OFFSET = 9
    OUTPUT_OFFSET = 31

    def __init__(self, num_classes: int = 21, in_channels: int = 3, *, base_width: int = 64,
                 fc_channels: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        # Caffe's pooling rounds up; with the 100-pixel padding that keeps pool5 at least 7x7 for any input.
        pools = [nn.MaxPool2d(2, stride=2, ceil_mode=True) for _ in range(5)]
        self.features = vgg16_features(in_channels, base_width=base_width, first_padding=100, pools=pools)
        pool_positions = stage_end_indices(self.features)
        self._pool3_index, self._pool4_index = pool_positions[2], pool_positions[3]
        self.fc6 = nn.Sequential(nn.Conv2d(8 * base_width, fc_channels, 7), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout))
        self.fc7 = nn.Sequential(nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout))
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(8 * base_width, num_classes, 1)
        self.score_pool3 = nn.Conv2d(4 * base_width, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        with torch.no_grad():
            for scorer in (self.score_fr, self.score_pool4, self.score_pool3):
                scorer.weight.zero_()
                scorer.bias.zero_()
            for up in (self.upscore2, self.upscore_pool4, self.upscore8):
                up.weight.copy_(bilinear_kernel(num_classes, up.kernel_size[0]))

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch("FCN8s", x, self.in_channels)
        height, width = x.shape[-2:]
        h = x
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == self._pool3_index:
                pool3 = h
            elif index == self._pool4_index:
                pool4 = h
        h = self.score_fr(self.fc7(self.fc6(h)))
        h = self.upscore2(h)  # 1/16
        h = h + _crop(self.score_pool4(pool4), self.POOL4_OFFSET, h.shape[-2:])
        h = self.upscore_pool4(h)  # 1/8
        h = h + _crop(self.score_pool3(pool3), self.POOL3_OFFSET, h.shape[-2:])
        return _crop(self.upscore8(h), self.OUTPUT_OFFSET, (height, width))


def _crop(x: Tensor, offset: int, size) -> Tensor:
    """x[..., offset:offset + size[0], offset:offset + size[1]] (Caffe's Crop layer)."""
    return x[..., offset:offset + size[0], offset:offset + size[1]]


class FCNHead(nn.Sequential):
    """torchvision's FCN head: 3x3 conv to in_channels // 4, BatchNorm, ReLU, dropout 0.1, 1x1 class scorer."""

    def __init__(self, in_channels: int, num_classes: int):
        inter_channels = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )


class SegmentationModel(nn.Module):
    """torchvision's _SimpleSegmentationModel layout: ``backbone`` (a ResNet returning {"out"[, "aux"]}),
    ``classifier`` on "out", optional ``aux_classifier`` on "aux", both upsampled bilinearly to the input size.

    forward(x) returns the [N, num_classes, H, W] scores, or, when there is an aux_classifier, torchvision's
    OrderedDict {"out": scores, "aux": auxiliary scores} (train the auxiliary head with its own loss term).
    """

    def __init__(self, backbone: ResNet, classifier: nn.Module, aux_classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> Tensor | "OrderedDict[str, Tensor]":
        check_image_batch(type(self).__name__, x, self.backbone.in_channels)
        features = self.backbone(x)
        out = upsample_to(self.classifier(features["out"]), x.shape[-2:])
        if self.aux_classifier is None:
            return out
        aux = upsample_to(self.aux_classifier(features["aux"]), x.shape[-2:])
        return OrderedDict(out=out, aux=aux)


class FCN(SegmentationModel):
    """FCN with a dilated ResNet backbone (torchvision's FCN)."""


def _resnet_fcn(make_backbone, num_classes: int, in_channels: int, aux_loss: bool, base_width: int) -> FCN:
    return_layers = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    backbone = make_backbone(in_channels=in_channels, base_width=base_width,
                             replace_stride_with_dilation=(False, True, True), return_layers=return_layers)
    stage3_channels = backbone.out_channels // 2
    aux_classifier = FCNHead(stage3_channels, num_classes) if aux_loss else None
    return FCN(backbone, FCNHead(backbone.out_channels, num_classes), aux_classifier)


def fcn8s(num_classes: int = 21, in_channels: int = 3, *, base_width: int = 64, fc_channels: int = 4096,
          dropout: float = 0.5) -> FCN8s:
    """FCN-8s, VGG-16 backbone (Long et al. 2015): fc6 7x7/4096, fc7 1x1/4096, pool3 + pool4 skips, bilinear-
    initialised transposed-convolution upsampling, output the input's size. About 134 M parameters at the
    paper's widths with 21 classes.

    Args:
        num_classes: output score maps.
        in_channels: image channels.
        base_width: VGG-16's first-stage channels (64); smaller values build a scaled-down copy.
        fc_channels: fc6/fc7 channels (4096).
        dropout: dropout probability after fc6 and fc7 (0.5).
    """
    return FCN8s(num_classes, in_channels, base_width=base_width, fc_channels=fc_channels, dropout=dropout)


def fcn_resnet50(num_classes: int = 21, in_channels: int = 3, *, aux_loss: bool = False,
                 base_width: int = 64) -> FCN:
    """torchvision's fcn_resnet50 structure and names: ResNet-50 at output stride 8, FCNHead(2048), optional
    auxiliary FCNHead(1024) on layer3. 35,322,218 parameters with aux_loss=True and 21 classes (torchvision's
    count). base_width scales the ResNet (64 = torchvision)."""
    return _resnet_fcn(resnet50, num_classes, in_channels, aux_loss, base_width)


def fcn_resnet101(num_classes: int = 21, in_channels: int = 3, *, aux_loss: bool = False,
                  base_width: int = 64) -> FCN:
    """torchvision's fcn_resnet101 structure and names (as fcn_resnet50 with ResNet-101). 54,314,346
    parameters with aux_loss=True and 21 classes."""
    return _resnet_fcn(resnet101, num_classes, in_channels, aux_loss, base_width)
