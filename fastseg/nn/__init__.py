"""Drop-in nn.Module replacements backed by fastseg ops."""

from fastseg.nn.conv import ConvBNAct, FusedConv2d
from fastseg.nn.crf import DenseCRF
from fastseg.nn.pooling import MaxPool2d, MaxUnpool2d

__all__ = ["ConvBNAct", "DenseCRF", "FusedConv2d", "MaxPool2d", "MaxUnpool2d"]
