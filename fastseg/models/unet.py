"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015).

The paper's network: a contracting path of four steps, each two unpadded 3x3 convolutions + ReLU and a 2x2
max-pool of stride 2 doubling the channels (64, 128, 256, 512, 1024 at the bottom); an expansive path of four
steps, each a 2x2 up-convolution halving the channels, concatenation with the cropped feature map of the
same level, and two 3x3 convolutions + ReLU; a 1x1 convolution to the classes. 23 convolutions in total
(18 3x3, 4 up-convolutions, one 1x1), about 31 M parameters. Dropout at the end of the contracting path;
weights drawn from N(0, 2/N), N the number of inputs of a unit.

Two forms:
- valid (padding=False, the paper's): every 3x3 convolution loses a 2-pixel border, so a 572x572 tile gives
  a 388x388 map of the tile's centre (overlap-tile strategy); each pooled map must have even size
  (unet_output_size says which sizes work, and forward names the nearest valid sizes otherwise);
- padded (padding=True, common in practice): 3x3 convolutions padded by 1, output size = input size for any
  input of at least 16x16 (an odd map loses its last row/column to pooling; the up-convolution's output
  is zero-padded at the bottom/right, where that row was, back to the skip's size).

Optional BatchNorm after each 3x3 convolution (conv -> BN -> ReLU; not in the paper, common in practice).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.models.backbones import check_image_batch

# Max-pools in the contracting path (the paper's four).
DEPTH = 4


def unet_output_size(size: int, padding: bool = False) -> int:
    """U-Net's output size along one axis for an input of `size` pixels (572 -> 388 in the valid form).

    Raises ValueError when the valid form cannot take the size (a pooled map of odd size, or a map shrinking
    to nothing) or when the padded form's input is smaller than 2**4 (the bottom map would be empty).
    """
    if padding:
        if size < 2 ** DEPTH:
            raise ValueError(f"padded U-Net needs inputs of at least {2 ** DEPTH} pixels per axis, got {size}")
        return size
    s = size
    for _ in range(DEPTH):
        s -= 4  # two unpadded 3x3 convolutions
        if s < 2 or s % 2:
            raise ValueError(f"valid U-Net cannot take {size} pixels: a 2x2 max-pool would see {s} (must be "
                             "even and >= 2)")
        s //= 2
    s -= 4
    for _ in range(DEPTH):
        if s < 1:
            break
        s = 2 * s - 4  # up-convolution doubles, two unpadded 3x3 convolutions
    if s < 1:
        raise ValueError(f"valid U-Net cannot take {size} pixels: a feature map shrinks to nothing")
    return s


def _nearest_valid_sizes(size: int) -> tuple[int | None, int]:
    """The largest valid-form input size below `size` (None if there is none) and the smallest above.

    Valid sizes are 16 b + 60 for a bottom map of b >= 8 pixels (each level adds 4 for its convolutions and
    doubles for its pool: b -> 2 b + 4, four times; b >= 8 keeps every expanding-path map non-empty).
    """
    below = 16 * ((size - 61) // 16) + 60
    above = 16 * max(8, (size - 60) // 16 + 1) + 60
    return (below if below >= 188 else None), above


def _conv_block(in_channels: int, out_channels: int, padding: bool, batch_norm: bool) -> list[nn.Module]:
    """Two (3x3 conv [-> BN] -> ReLU) as a flat module list."""
    layers: list[nn.Module] = []
    for channels in (in_channels, out_channels):
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=int(padding), bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return layers


class UNet(nn.Module):
    """U-Net. forward(x [N, in_channels, H, W]) -> scores [N, num_classes, H', W'] (H' = unet_output_size(H)).

    Submodules: ``encoder`` (4 Sequential conv blocks), ``pool`` (the 2x2 max-pool), ``bottom`` (the deepest
    conv block and the dropout), ``upconvs`` (4 ConvTranspose2d), ``decoder`` (4 Sequential conv blocks),
    ``classifier`` (1x1 conv).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, base_width: int = 64,
                 padding: bool = False, batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        self.in_channels = in_channels
        self.padding = padding
        widths = [base_width * 2 ** level for level in range(DEPTH + 1)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoder.append(nn.Sequential(*_conv_block(channels, width, padding, batch_norm)))
            channels = width
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bottom = nn.Sequential(*_conv_block(channels, widths[-1], padding, batch_norm), nn.Dropout(dropout))
        self.upconvs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upconvs.append(nn.ConvTranspose2d(2 * width, width, 2, stride=2))
            self.decoder.append(nn.Sequential(*_conv_block(2 * width, width, padding, batch_norm)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # The paper: N(0, sqrt(2 / N)), N = inputs of one unit: k*k*C_in for a convolution, C_in for the 2x2
        # stride-2 up-convolution (each output pixel sees one tap of each input channel).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_channels))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def _check_size(self, x: Tensor) -> None:
        for size in x.shape[-2:]:
            try:
                unet_output_size(size, self.padding)
            except ValueError as error:
                if self.padding:
                    raise
                below, above = _nearest_valid_sizes(size)
                raise ValueError(f"{error}; nearest valid input sizes: {below} and {above}") from None

    def _align(self, skip: Tensor, up: Tensor) -> Tensor:
        """skip and up side by side at up's (valid) or skip's (padded) size, concatenated: [skip, up]."""
        if self.padding:
            # Pooling dropped skip's last odd row/column; up covers the rest from the top-left.
            up = F.pad(up, (0, skip.shape[-1] - up.shape[-1], 0, skip.shape[-2] - up.shape[-2]))
        else:
            # The paper's crop: skip's centre, as the unpadded convolutions trimmed the border symmetrically.
            top = (skip.shape[-2] - up.shape[-2]) // 2
            left = (skip.shape[-1] - up.shape[-1]) // 2
            skip = skip[..., top:top + up.shape[-2], left:left + up.shape[-1]]
        return torch.cat([skip, up], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch("UNet", x, self.in_channels)
        self._check_size(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upconv, block, skip in zip(self.upconvs, self.decoder, reversed(skips)):
            x = block(self._align(skip, upconv(x)))
        return self.classifier(x)


def unet(in_channels: int = 1, num_classes: int = 2, *, base_width: int = 64, padding: bool = False,
         batch_norm: bool = False, dropout: float = 0.5) -> UNet:
    """U-Net (Ronneberger et al. 2015): 23 convolutions, 31.0 M parameters at base_width 64.

    Args:
        in_channels: image channels (1 for the paper's microscopy images).
        num_classes: output score maps (2 in the paper: cell, background).
        base_width: channels of the first level (64); each level below doubles them.
        padding: False for the paper's unpadded convolutions (572 -> 388), True for same-size output.
        batch_norm: BatchNorm after each 3x3 convolution (not in the paper).
        dropout: dropout probability at the end of the contracting path (the paper uses dropout there).
    """
    return UNet(in_channels, num_classes, base_width=base_width, padding=padding, batch_norm=batch_norm,
                dropout=dropout)
