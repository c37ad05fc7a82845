"""pydensecrf.utils's helpers (same arguments, same float32 results), for scripts moving to fastseg.

Unaries are energies: [nlabels, npoints] float32, -log of a probability. Features are [d, npoints] float32,
coordinates in the array's axis order (ij indexing), divided by the given standard deviations.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax", "create_pairwise_gaussian", "create_pairwise_bilateral"]


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energy of a label map trusted with probability gt_prob (the rest spread evenly over the other
    labels). With zero_unsure, label 0 means "unknown" (uniform) and labels 1..n_labels map to rows 0..n-1."""
    assert 0 < gt_prob < 1, "`gt_prob must be in (0,1)."
    labels = np.asarray(labels).ravel()
    energy = np.full((n_labels, labels.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    rows = labels - 1 if zero_unsure else labels
    energy[rows, np.arange(labels.size)] = -np.log(gt_prob)
    if zero_unsure:
        energy[:, labels == 0] = -np.log(1.0 / n_labels)
    return energy


def unary_from_softmax(sm, scale=None, clip=1e-5) -> np.ndarray:
    """-log of class probabilities sm [n_classes, ...] as [n_classes, npoints] float32. scale in (0, 1] mixes
    sm with the uniform distribution (scale * sm + (1 - scale) / n); clip bounds probabilities below."""
    sm = np.asarray(sm)
    n = sm.shape[0]
    if scale is not None:
        assert 0 < scale <= 1, "`scale` needs to be in (0,1]"
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / n)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([n, -1]).astype(np.float32)


def _grid(shape, sdims) -> np.ndarray:
    mesh = np.array(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        mesh[axis] /= s
    return mesh


def create_pairwise_gaussian(sdims, shape) -> np.ndarray:
    """Features [len(sdims), prod(shape)]: each axis's index divided by its sdims entry."""
    return _grid(shape, sdims).reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1) -> np.ndarray:
    """Features [len(sdims) + channels, npoints]: coordinates / sdims, then channels / schan (a number or one
    per channel). chdim is img's channel axis, -1 for an image without one."""
    img = np.asarray(img)
    channels = img[np.newaxis].astype(np.float32) if chdim == -1 else np.moveaxis(img, chdim, 0).astype(np.float32)
    if isinstance(schan, numbers.Number):
        channels /= schan
    else:
        for c, s in enumerate(schan):
            channels[c] /= s
    features = np.concatenate([_grid(channels.shape[1:], sdims), channels])
    return features.reshape([features.shape[0], -1])
