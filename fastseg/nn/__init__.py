"""Drop-in nn.Module replacements backed by fastseg ops."""

from fastseg.nn.crf import DenseCRF
from fastseg.nn.pooling import MaxPool2d, MaxUnpool2d

__all__ = ["DenseCRF", "MaxPool2d", "MaxUnpool2d"]
