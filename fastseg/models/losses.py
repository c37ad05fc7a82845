"""The U-Net paper's training loss (Ronneberger et al. 2015, sec. 3): a pixel-wise weighted softmax cross-entropy
whose weight map balances the class frequencies and stresses the thin background borders between touching
cells:

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)),

d1, d2 the distances to the nearest and the second-nearest cell (the paper: w0 = 10, sigma ~ 5 pixels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def unet_weight_map(labels, w0: float = 10.0, sigma: float = 5.0,
                    class_weights: Sequence[float] | None = None):
    """The U-Net weight map of one instance-labelled image.

    Args:
        labels: an integer instance label image, [H, W] (or a [D, H, W] volume): 0 background, k > 0 the
            pixels of cell k. A numpy array or a torch tensor.
        w0: the border term's weight (10 in the paper).
        sigma: the border term's width in pixels (5 in the paper).
        class_weights: (background, cell) weights w_c; None balances the two classes' frequencies:
            w_c = number of pixels / (number of classes present * pixels of the class), so that both classes
            weigh the same in total.

    Returns:
        float32 weights of labels' shape: a numpy array for a numpy input, a tensor on labels' device for a
        tensor. The border term is added on background pixels only, the borders the paper stresses; it is 0
        where there are fewer than two cells. d1, d2 are Euclidean distances (pixels) to the nearest pixel of
        the nearest / second-nearest cell, computed with scipy.ndimage.distance_transform_edt.
    """
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError as error:
        raise ImportError("unet_weight_map needs scipy (pip install scipy)") from error
    as_tensor = isinstance(labels, Tensor)
    array = labels.detach().cpu().numpy() if as_tensor else np.asarray(labels)
    if array.dtype.kind not in "iub":
        raise TypeError(f"unet_weight_map: labels must be integer instance labels, got dtype {array.dtype}")
    if sigma <= 0:
        raise ValueError(f"unet_weight_map: sigma must be positive, got {sigma}")

    background = array == 0
    if class_weights is None:
        counts = np.array([background.sum(), (~background).sum()], dtype=np.float64)
        present = counts > 0
        balanced = np.where(present, array.size / (present.sum() * np.maximum(counts, 1)), 0.0)
        weights = np.where(background, balanced[0], balanced[1])
    else:
        if len(class_weights) != 2:
            raise ValueError(f"unet_weight_map: class_weights must be (background, cell), got {class_weights}")
        weights = np.where(background, float(class_weights[0]), float(class_weights[1]))

    # Two smallest distances over all cells, one distance transform per cell, O(pixels) memory.
    nearest = np.full(array.shape, np.inf)
    second = np.full(array.shape, np.inf)
    for cell in np.unique(array[~background]):
        distance = distance_transform_edt(array != cell)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma ** 2))
    weights = (weights + np.where(background, border, 0.0)).astype(np.float32)
    return torch.from_numpy(weights).to(labels.device) if as_tensor else weights


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight_map, reduction: str = "mean") -> Tensor:
    """Pixel-wise softmax cross-entropy weighted by a map: sum_x w(x) * -log softmax(logits)[target(x)](x).

    Args:
        logits: [N, C, H, W] scores.
        target: [N, H, W] class indices (int64).
        weight_map: [N, H, W] or [H, W] weights (a tensor or numpy array, e.g. from unet_weight_map). For the
            valid U-Net, crop target and weight map to the output's centre first.
        reduction: "mean" (over pixels), "sum" (the paper's energy) or "none" ([N, H, W]).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"weighted_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    weight_map = torch.as_tensor(weight_map, device=logits.device)
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"weighted_cross_entropy: logits [N, C, H, W] and target [N, H, W] must agree, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if weight_map.shape not in (target.shape, target.shape[1:]):
        raise ValueError(f"weighted_cross_entropy: weight_map must be [N, H, W] or [H, W] like the target "
                         f"{tuple(target.shape)}, got {tuple(weight_map.shape)}")
    loss = F.cross_entropy(logits, target, reduction="none") * weight_map.to(logits.dtype)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
