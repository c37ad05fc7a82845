"""Reference segmentation networks in plain PyTorch (torch.nn modules only, randomly initialised).

FCN-8s, FCN-ResNet50/101, U-Net, DeepLab v1 LargeFOV / v2 ASPP / v3, SegNet, each as its paper describes it;
the ResNet-based FCN and DeepLab v3 with torchvision's module and parameter names. They are the networks
fastseg's kernels are measured on, and the input of fastseg's converter (conv -> BN -> ReLU runs sit in
nn.Sequential containers, pools are nn.MaxPool2d / nn.MaxUnpool2d).

    model = fastseg.models.get_model("unet", in_channels=1, num_classes=2, padding=True)

Also here: the U-Net paper's weight map and weighted loss (``losses``) and elastic deformation (``augment``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fastseg.models.augment import elastic_deform
from fastseg.models.deeplab import (
    DeepLabV1LargeFOV,
    DeepLabV2,
    DeepLabV3,
    deeplab_v1_largefov,
    deeplab_v2_resnet101,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
)
from fastseg.models.fcn import FCN, FCN8s, fcn8s, fcn_resnet50, fcn_resnet101
from fastseg.models.losses import unet_weight_map, weighted_cross_entropy
from fastseg.models.segnet import SegNet, segnet
from fastseg.models.unet import UNet, unet, unet_output_size

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fcn8s": fcn8s,
    "fcn_resnet50": fcn_resnet50,
    "fcn_resnet101": fcn_resnet101,
    "unet": unet,
    "deeplab_v1_largefov": deeplab_v1_largefov,
    "deeplab_v2_resnet101": deeplab_v2_resnet101,
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_resnet101": deeplabv3_resnet101,
    "segnet": segnet,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """MODELS[name](**kwargs): a freshly built (randomly initialised) network."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None
    return constructor(**kwargs)


__all__ = [
    "FCN",
    "FCN8s",
    "MODELS",
    "DeepLabV1LargeFOV",
    "DeepLabV2",
    "DeepLabV3",
    "SegNet",
    "UNet",
    "deeplab_v1_largefov",
    "deeplab_v2_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "elastic_deform",
    "fcn8s",
    "fcn_resnet50",
    "fcn_resnet101",
    "get_model",
    "segnet",
    "unet",
    "unet_output_size",
    "unet_weight_map",
    "weighted_cross_entropy",
]
