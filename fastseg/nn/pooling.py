"""MaxPool2d / MaxUnpool2d: torch.nn's modules (same arguments, attributes, state) running fastseg's kernels."""

from __future__ import annotations

import torch

from fastseg.ops.max_pool import max_pool2d, max_unpool2d


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by fastseg.max_pool2d.

    Without return_indices, training saves only a narrow window offset per output for the backward.
    """

    def forward(self, input: torch.Tensor):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MaxUnpool2d(torch.nn.MaxUnpool2d):
    """torch.nn.MaxUnpool2d computed by fastseg.max_unpool2d."""

    def forward(self, input: torch.Tensor, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        return max_unpool2d(input, indices, self.kernel_size, self.stride, self.padding, output_size)
