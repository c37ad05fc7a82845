"""DeepLab v1 LargeFOV, v2 ASPP and v3 (Chen et al. 2015, 2017, 2017), with optional dense-CRF refinement.

- v1 LargeFOV (ICLR 2015): VGG-16 with pool4 and pool5 at stride 1 (3x3 pools, stride 2 for pool1-3, rounding
  up as Caffe), conv5 at dilation 2, fc6 a 3x3 convolution at dilation 12 with 1024 channels, fc7 1x1 1024,
  dropout 0.5 after each, fc8 the class scorer: output stride 8, bilinear upsampling to the input.
  The released model (DeepLab-LargeFOV prototxt) also has a 3x3 stride-1 average pool (pool5a) before fc6,
  kept here. 20.5 M parameters with 21 classes, the paper's count.
- v2 ASPP (TPAMI 2017), the ResNet-101 model: ResNet-101 at output stride 8 (layer3 dilation 2, layer4 4) and
  four parallel 3x3 class scorers at rates 6, 12, 18, 24 whose outputs are summed (ASPP-L).
- v3 (arXiv 1706.05587): ResNet-50/101 at output stride 8 (ASPP rates 12, 24, 36) or 16 (6, 12, 18), ASPP with
  a 1x1 branch, three 3x3 atrous branches and image-level pooling, each conv + BN + ReLU with 256 channels,
  concatenated and projected by 1x1 conv + BN + ReLU (+ dropout 0.5), then 3x3 conv + BN + ReLU and a 1x1
  scorer. Module and parameter names are torchvision's deeplabv3_resnet50/101 (``backbone.*``,
  ``classifier.0.convs.0..4``, ``classifier.0.project``, ``classifier.1..4``, ``aux_classifier.*``), so its
  state_dicts load as they are.

Dense-CRF refinement (v1/v2's post-processing; trainable as CRF-as-RNN with a learnable fastseg.nn.DenseCRF):
every DeepLab takes ``crf`` (a fastseg.nn.DenseCRF or None). forward(x, image=None) then runs the CRF on the
upsampled scores with ``image`` as the bilateral kernel's colours, and returns log Q (log-marginals), which
argmax and cross-entropy treat as scores. The CRF compares raw intensities (0..255 for 8-bit photographs, in
the units of its bilateral_srgb): pass the un-normalised image when x is mean/std normalised; image defaults
to x, right only when x is itself un-normalised. The CRF's weights are stored under ``crf.*``: attach it after
loading a checkpoint without them (``model.crf = DenseCRF(...)``) or load with strict=False.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from fastseg.models.backbones import ResNet, check_image_batch, resnet50, resnet101, upsample_to, vgg16_features
from fastseg.models.fcn import FCNHead, SegmentationModel


def refine_with_crf(crf: nn.Module, scores: Tensor, x: Tensor, image: Tensor | None) -> Tensor:
    """log Q of crf(scores, image) (image defaults to x), Q clamped away from 0 so the log stays finite."""
    if image is None:
        image = x
    if image.dim() != 4 or image.shape[0] != scores.shape[0] or image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"DeepLab CRF: image must be [N={scores.shape[0]}, C, {scores.shape[-2]}, "
                         f"{scores.shape[-1]}] like the input, got {tuple(image.shape)}")
    probabilities = crf(scores, image)
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


class DeepLabV1LargeFOV(nn.Module):
    """DeepLab v1 LargeFOV. forward(x, image=None) -> scores [N, num_classes, H, W] (log Q with a CRF)."""

    def __init__(self, num_classes: int = 21, in_channels: int = 3, *, base_width: int = 64,
                 fc_channels: int = 1024, crf: nn.Module | None = None):
        super().__init__()
        self.in_channels = in_channels
        # Caffe's 3x3/2 pools with padding 1 round up; pool4 and pool5 keep the resolution (stride 1), and
        # conv5 dilates by 2 to see what it saw behind a stride-2 pool4 (the "hole" algorithm).
        pools = [nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True) for _ in range(3)]
        pools += [nn.MaxPool2d(3, stride=1, padding=1) for _ in range(2)]
        self.features = vgg16_features(in_channels, base_width=base_width, pools=pools,
                                       dilations=(1, 1, 1, 1, 2))
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc6 = nn.Sequential(nn.Conv2d(8 * base_width, fc_channels, 3, padding=12, dilation=12),
                                 nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.fc7 = nn.Sequential(nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.fc8 = nn.Conv2d(fc_channels, num_classes, 1)
        # The paper's scorer initialisation: Gaussian, std 0.01, zero bias.
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        self.crf = crf

    def forward(self, x: Tensor, image: Tensor | None = None) -> Tensor:
        check_image_batch("DeepLabV1LargeFOV", x, self.in_channels)
        scores = self.fc8(self.fc7(self.fc6(self.pool5a(self.features(x)))))
        # DeepLab's Caffe Interp layer maps corners to corners ((H - 1) / 8 + 1 -> H).
        scores = upsample_to(scores, x.shape[-2:], align_corners=True)
        return scores if self.crf is None else refine_with_crf(self.crf, scores, x, image)


class ASPPSum(nn.ModuleList):
    """DeepLab v2's ASPP-L: parallel 3x3 class scorers at several atrous rates, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__(nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate) for rate in rates)
        for branch in self:
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self)


class DeepLabV2(nn.Module):
    """DeepLab v2 with ASPP-L on a dilated ResNet. forward(x, image=None) -> scores (log Q with a CRF).

    Submodules: ``backbone`` (ResNet, torchvision names), ``aspp`` (ASPPSum: ``aspp.0..3``), ``crf``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24),
                 crf: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPPSum(backbone.out_channels, num_classes, rates)
        self.crf = crf

    def forward(self, x: Tensor, image: Tensor | None = None) -> Tensor:
        check_image_batch("DeepLabV2", x, self.backbone.in_channels)
        scores = self.aspp(self.backbone(x)["out"])
        scores = upsample_to(scores, x.shape[-2:], align_corners=True)  # as v1: Caffe's Interp
        return scores if self.crf is None else refine_with_crf(self.crf, scores, x, image)


class ASPPConv(nn.Sequential):
    """A 3x3 atrous ASPP branch: conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """ASPP's image-level branch: global average pool, 1x1 conv, BatchNorm, ReLU, broadcast back to the map's
    size (bilinear from 1x1). In training its BatchNorm sees one value per image: use batches of 2 or more."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return upsample_to(super().forward(x), x.shape[-2:])


class ASPP(nn.Module):
    """DeepLab v3's ASPP: 1x1 branch, one 3x3 branch per rate, image pooling; concatenated, then 1x1 projection
    with BatchNorm, ReLU and dropout 0.5. Names as torchvision's (``convs.0..4``, ``project``)."""

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """DeepLab v3's head, torchvision's: ASPP, 3x3 conv + BN + ReLU, 1x1 class scorer."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 24, 36)):
        super().__init__(
            ASPP(in_channels, rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )


class DeepLabV3(SegmentationModel):
    """DeepLab v3, torchvision's layout (``backbone``, ``classifier``, ``aux_classifier``), plus ``crf``.

    forward(x, image=None) returns the scores, or {"out", "aux"} with an auxiliary head (torchvision's
    OrderedDict); with a CRF, "out" (or the scores) is log Q and "aux" stays the auxiliary head's scores.
    """

    def __init__(self, backbone: ResNet, classifier: nn.Module, aux_classifier: nn.Module | None = None,
                 crf: nn.Module | None = None):
        super().__init__(backbone, classifier, aux_classifier)
        self.crf = crf

    def forward(self, x: Tensor, image: Tensor | None = None) -> Tensor | "OrderedDict[str, Tensor]":
        result = super().forward(x)
        if self.crf is None:
            return result
        if isinstance(result, Tensor):
            return refine_with_crf(self.crf, result, x, image)
        result["out"] = refine_with_crf(self.crf, result["out"], x, image)
        return result


# DeepLab v3's ASPP rates by output stride (Chen et al. 2017, sec. 3.3: rates double when the stride halves).
V3_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# Which of layer2..4 trade their stride for dilation at each output stride.
V3_DILATED_STAGES = {8: (False, True, True), 16: (False, False, True)}


def _deeplabv3(make_backbone, num_classes: int, in_channels: int, output_stride: int, aux_loss: bool,
               multi_grid: Sequence[int] | None, crf: nn.Module | None, base_width: int) -> DeepLabV3:
    if output_stride not in V3_RATES:
        raise ValueError(f"deeplabv3: output_stride must be one of {sorted(V3_RATES)}, got {output_stride}")
    return_layers = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    backbone = make_backbone(in_channels=in_channels, base_width=base_width, multi_grid=multi_grid,
                             replace_stride_with_dilation=V3_DILATED_STAGES[output_stride],
                             return_layers=return_layers)
    classifier = DeepLabHead(backbone.out_channels, num_classes, V3_RATES[output_stride])
    aux_classifier = FCNHead(backbone.out_channels // 2, num_classes) if aux_loss else None
    return DeepLabV3(backbone, classifier, aux_classifier, crf)


def deeplab_v1_largefov(num_classes: int = 21, in_channels: int = 3, *, crf: nn.Module | None = None,
                        base_width: int = 64, fc_channels: int = 1024) -> DeepLabV1LargeFOV:
    """DeepLab v1 LargeFOV (Chen et al., ICLR 2015): atrous VGG-16 at output stride 8, fc6 3x3 at dilation 12
    with 1024 channels, fc7 1x1 1024; 20.5 M parameters with 21 classes.

    Args:
        num_classes: output score maps.
        in_channels: image channels.
        crf: optional fastseg.nn.DenseCRF run on the upsampled scores (see the module docstring for the image).
        base_width: VGG-16's first-stage channels (64); smaller values build a scaled-down copy.
        fc_channels: fc6/fc7 channels (1024).
    """
    return DeepLabV1LargeFOV(num_classes, in_channels, base_width=base_width, fc_channels=fc_channels, crf=crf)


def deeplab_v2_resnet101(num_classes: int = 21, in_channels: int = 3, *, rates: Sequence[int] = (6, 12, 18, 24),
                         crf: nn.Module | None = None, base_width: int = 64) -> DeepLabV2:
    """DeepLab v2 (Chen et al., TPAMI 2017), ResNet-101 with ASPP-L: output stride 8, four 3x3 class scorers at
    rates 6/12/18/24 summed. The paper's multi-scale input fusion (MSC) and COCO pretraining are training
    recipes, not part of the module. base_width scales the ResNet (64 = the paper's)."""
    backbone = resnet101(in_channels=in_channels, base_width=base_width,
                         replace_stride_with_dilation=(False, True, True))
    return DeepLabV2(backbone, num_classes, rates, crf)


def deeplabv3_resnet50(num_classes: int = 21, in_channels: int = 3, *, output_stride: int = 8,
                       aux_loss: bool = False, multi_grid: Sequence[int] | None = None,
                       crf: nn.Module | None = None, base_width: int = 64) -> DeepLabV3:
    """DeepLab v3 (Chen et al. 2017) on ResNet-50, torchvision's deeplabv3_resnet50 structure and names.

    Args:
        num_classes: output score maps.
        in_channels: image channels.
        output_stride: 8 (torchvision's; ASPP rates 12/24/36) or 16 (the paper's training setting; 6/12/18).
        aux_loss: add torchvision's auxiliary FCNHead on layer3; forward then returns {"out", "aux"}.
            42,004,074 parameters with it and 21 classes (torchvision's count).
        multi_grid: layer4's unit rates, e.g. (1, 2, 4), the paper's best; None is torchvision's dilation.
        crf: optional fastseg.nn.DenseCRF run on the upsampled scores (see the module docstring for the image).
        base_width: scales the ResNet (64 = torchvision).
    """
    return _deeplabv3(resnet50, num_classes, in_channels, output_stride, aux_loss, multi_grid, crf, base_width)


def deeplabv3_resnet101(num_classes: int = 21, in_channels: int = 3, *, output_stride: int = 8,
                        aux_loss: bool = False, multi_grid: Sequence[int] | None = None,
                        crf: nn.Module | None = None, base_width: int = 64) -> DeepLabV3:
    """DeepLab v3 on ResNet-101, torchvision's deeplabv3_resnet101 structure and names; arguments as
    deeplabv3_resnet50. 60,996,202 parameters with aux_loss=True and 21 classes."""
    return _deeplabv3(resnet101, num_classes, in_channels, output_stride, aux_loss, multi_grid, crf, base_width)
