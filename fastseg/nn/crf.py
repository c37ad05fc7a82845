"""DenseCRF: fastseg.dense_crf as a module, optionally learnable (CRF as RNN, Zheng et al. 2015)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastseg.ops.crf import dense_crf


class DenseCRF(torch.nn.Module):
    """Mean-field dense-CRF refinement of segmentation logits: forward(logits, image) -> probabilities.

    Arguments as fastseg.dense_crf. With learnable=True the two kernel weights and an [num_labels, num_labels]
    compatibility matrix are nn.Parameters that training updates through the unrolled iterations (CRF as RNN);
    the matrix starts as Potts in pydensecrf's convention, -I (kernel k adds -w_k * 0.5 (M + M^T) Ktilde_k Q to
    the logits, so M = -I reproduces Potts exactly; the textbook penalty 1 - I gives the same marginals, since
    softmax ignores the per-pixel constant it adds). The sigmas stay fixed: the lattice is not differentiated
    with respect to its features.

    Args:
        num_labels: L; needed when learnable (the matrix's size) or when compatibility is given.
        compatibility: an initial [L, L] matrix (a buffer, or the parameter's initial value when learnable).
    """

    def __init__(self, num_labels: int | None = None, *, iterations: int = 10, gaussian_sxy=3.0,
                 gaussian_weight: float = 3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                 bilateral_weight: float = 10.0, compatibility: Tensor | None = None, spacing=None,
                 learnable: bool = False):
        super().__init__()
        if compatibility is not None:
            compatibility = torch.as_tensor(compatibility, dtype=torch.float32).clone()
            if num_labels is None:
                num_labels = compatibility.shape[0]
            if compatibility.shape != (num_labels, num_labels):
                raise ValueError(f"DenseCRF: compatibility must be [{num_labels}, {num_labels}], got "
                                 f"{tuple(compatibility.shape)}")
        elif learnable:
            if num_labels is None:
                raise ValueError("DenseCRF: learnable=True needs num_labels (the compatibility matrix's size)")
            compatibility = -torch.eye(num_labels)
        self.num_labels = num_labels
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.spacing = spacing
        self.learnable = learnable
        weights = torch.tensor(float(gaussian_weight)), torch.tensor(float(bilateral_weight))
        if learnable:
            self.gaussian_weight = torch.nn.Parameter(weights[0])
            self.bilateral_weight = torch.nn.Parameter(weights[1])
            self.compatibility = torch.nn.Parameter(compatibility)
        else:
            self.register_buffer("gaussian_weight", weights[0])
            self.register_buffer("bilateral_weight", weights[1])
            self.register_buffer("compatibility", compatibility)

    def forward(self, logits: Tensor, image: Tensor) -> Tensor:
        return dense_crf(logits, image, iterations=self.iterations, gaussian_sxy=self.gaussian_sxy,
                         gaussian_weight=self.gaussian_weight, bilateral_sxy=self.bilateral_sxy,
                         bilateral_srgb=self.bilateral_srgb, bilateral_weight=self.bilateral_weight,
                         compatibility=self.compatibility, spacing=self.spacing)

    def extra_repr(self) -> str:
        return (f"num_labels={self.num_labels}, iterations={self.iterations}, gaussian_sxy={self.gaussian_sxy}, "
                f"bilateral_sxy={self.bilateral_sxy}, bilateral_srgb={self.bilateral_srgb}, "
                f"spacing={self.spacing}, learnable={self.learnable}")
