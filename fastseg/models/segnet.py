"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017).

The encoder is VGG-16-BN's 13 convolutions (3x3 conv -> BatchNorm -> ReLU) with a 2x2 stride-2 max-pool after
each of the 5 stages, keeping the pooling indices; no fully connected layers. The decoder mirrors it: each
stage upsamples with the max-unpooling of the matching encoder pool (nn.MaxUnpool2d with its indices: values
return to the positions of the maxima, zeros elsewhere, no learned upsampling), then the mirrored convolutions,
conv -> BN -> ReLU, except the last, a plain 3x3 convolution to the classes (the softmax is the loss's).
About 29.4 M parameters, half of them in the decoder.

The encoder's ``features`` has torchvision's ``vgg16_bn().features`` indices, so ImageNet VGG-16-BN weights
load into it (the paper initialises the encoder from VGG-16).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastseg.models.backbones import VGG16_STAGE_DEPTHS, VGG16_STAGE_WIDTHS, check_image_batch, vgg16_features


class SegNet(nn.Module):
    """SegNet. forward(x [N, in_channels, H, W]) -> scores [N, num_classes, H, W], for any H, W >= 32.

    Submodules: ``features`` (the encoder, pools with return_indices=True), ``unpool`` (the 2x2 MaxUnpool2d),
    ``decoder`` (5 Sequential stages, deepest first).
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 3, *, base_width: int = 64):
        super().__init__()
        self.in_channels = in_channels
        pools = [nn.MaxPool2d(2, stride=2, return_indices=True) for _ in VGG16_STAGE_DEPTHS]
        self.features = vgg16_features(in_channels, batch_norm=True, base_width=base_width, pools=pools)
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        # Stage widths from the deepest up; each decoder stage ends at the next shallower encoder width
        # (the first at num_classes), its other convolutions keep the stage's width.
        widths = [w * base_width for w in VGG16_STAGE_WIDTHS][::-1]
        depths = VGG16_STAGE_DEPTHS[::-1]
        out_widths = widths[1:] + [num_classes]
        self.decoder = nn.ModuleList()
        for stage_index, (width, depth, out_width) in enumerate(zip(widths, depths, out_widths)):
            layers: list[nn.Module] = []
            for i in range(depth):
                conv_out = out_width if i == depth - 1 else width
                layers.append(nn.Conv2d(width, conv_out, 3, padding=1))
                is_scorer = stage_index == len(widths) - 1 and i == depth - 1
                if not is_scorer:  # the class scorer feeds the softmax directly
                    layers += [nn.BatchNorm2d(conv_out), nn.ReLU(inplace=True)]
            self.decoder.append(nn.Sequential(*layers))
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch("SegNet", x, self.in_channels)
        if min(x.shape[-2:]) < 2 ** len(VGG16_STAGE_DEPTHS):
            raise ValueError(f"SegNet needs inputs of at least 32x32 (5 poolings), got {tuple(x.shape[-2:])}")
        pooled = []  # (indices, size before pooling) per encoder stage
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pooled.append((indices, size))
            else:
                x = layer(x)
        for stage, (indices, size) in zip(self.decoder, reversed(pooled)):
            # output_size restores odd sizes the 2x2 pool rounded down.
            x = stage(self.unpool(x, indices, output_size=size))
        return x


def segnet(num_classes: int = 11, in_channels: int = 3, *, base_width: int = 64) -> SegNet:
    """SegNet (Badrinarayanan et al. 2017): VGG-16-BN encoder, max-unpooling decoder with the encoder's
    indices, 29.4 M parameters at base_width 64 (the paper's 29.5 M). num_classes defaults to the 11 classes of
    CamVid, the paper's benchmark (void is ignored); base_width scales every channel count (64 = the paper's)."""
    return SegNet(num_classes, in_channels, base_width=base_width)
