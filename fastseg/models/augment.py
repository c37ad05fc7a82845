"""Elastic deformation augmentation, the U-Net paper's key augmentation for small biomedical training sets.

Two ways to draw a smooth random displacement field u (pixels), the sample being read at p + alpha * u(p):
- the U-Net paper's (Ronneberger et al. 2015, sec. 3.1; grid=3): displacement vectors drawn from a Gaussian of
  standard deviation sigma (10 pixels in the paper) at the nodes of a coarse grid x grid lattice spanning the
  image, interpolated bicubically to every pixel;
- Simard et al.'s (ICDAR 2003; grid=None): uniform random displacements in [-1, 1] at every pixel, smoothed by a
  Gaussian of standard deviation sigma (Simard: sigma ~ 4, alpha ~ 34).

The image is resampled bilinearly, the mask (labels) with nearest neighbour, so its values stay in its label
set; both with the same field, reflecting at the borders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _gaussian_smooth(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] with zero padding, truncated at 4 sigma (scipy's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-taps ** 2 / (2.0 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    field = F.conv2d(field, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, radius),
                     groups=channels)
    return F.conv2d(field, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(radius, 0),
                    groups=channels)


def _random(shape, generator: torch.Generator | None, device, dtype, uniform: bool) -> Tensor:
    """Standard normal (or uniform [-1, 1]) draws from generator (or the global RNG of `device`)."""
    draw_device = generator.device if generator is not None else device
    if uniform:
        values = torch.rand(shape, generator=generator, device=draw_device, dtype=dtype) * 2 - 1
    else:
        values = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return values.to(device)


def elastic_deform(image: Tensor, mask: Tensor | None = None, *, alpha: float, sigma: float,
                   grid: int | tuple[int, int] | None = None, generator: torch.Generator | None = None):
    """Deform image (and mask) by one smooth random displacement field (one per sample of a batch).

    Args:
        image: floating-point [H, W], [C, H, W] (one field) or [N, C, H, W] (a field per sample).
        mask: optional labels (any integer or bool dtype) of the image's spatial shape: [H, W] for a 2-D or 3-D
            image, [N, H, W] for a batch. Resampled with nearest neighbour.
        alpha: factor on the displacement field; 0 leaves the inputs as they are.
        sigma: in pixels, the standard deviation of the displacements at the grid nodes (grid mode; the paper:
            10) or of the Gaussian smoothing the per-pixel random field (grid=None, Simard's).
        grid: nodes per axis of the coarse displacement grid (int or (rows, cols), >= 2; the paper: 3), or None
            for Simard's smoothed field.
        generator: torch.Generator for the draws; the same generator state gives the same deformation.

    Returns:
        The deformed image (image's shape and dtype), or (image, mask) when a mask is given.
    """
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() not in (2, 3, 4):
        raise TypeError("elastic_deform: image must be a floating-point tensor [H, W], [C, H, W] or [N, C, H, W]")
    if sigma <= 0:
        raise ValueError(f"elastic_deform: sigma must be positive, got {sigma}")
    batch = image.reshape(-1, *image.shape[-3:]) if image.dim() == 4 else image.reshape(1, -1, *image.shape[-2:])
    n, _, height, width = batch.shape
    if mask is not None:
        expected = (n, height, width) if image.dim() == 4 else (height, width)
        if tuple(mask.shape) != expected:
            raise ValueError(f"elastic_deform: mask must have shape {expected} for an image of shape "
                             f"{tuple(image.shape)}, got {tuple(mask.shape)}")

    # Displacements in float64: the sampling positions stay exact to well below a pixel at any image size.
    dtype, device = torch.float64, image.device
    if grid is None:
        field = _random((n, 2, height, width), generator, device, dtype, uniform=True)
        displacement = _gaussian_smooth(field, sigma)
    else:
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        if rows < 2 or cols < 2:
            raise ValueError(f"elastic_deform: grid needs at least 2 nodes per axis, got {grid}")
        nodes = sigma * _random((n, 2, rows, cols), generator, device, dtype, uniform=False)
        # Nodes at the image's corners and evenly between: align_corners=True.
        displacement = F.interpolate(nodes, size=(height, width), mode="bicubic", align_corners=True)
    displacement = alpha * displacement  # [n, (dy, dx), H, W]

    ys = torch.arange(height, dtype=dtype, device=device).view(1, height, 1)
    xs = torch.arange(width, dtype=dtype, device=device).view(1, 1, width)
    # grid_sample's normalised coordinates with align_corners=True: -1 and 1 are the first and last pixels.
    sample_y = 2 * (ys + displacement[:, 0]) / max(height - 1, 1) - 1
    sample_x = 2 * (xs + displacement[:, 1]) / max(width - 1, 1) - 1
    sampling = torch.stack([sample_x, sample_y], dim=-1)  # [n, H, W, (x, y)]

    compute = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    warped = F.grid_sample(batch.to(compute), sampling.to(compute), mode="bilinear", padding_mode="reflection",
                           align_corners=True).to(image.dtype).reshape(image.shape)
    if mask is None:
        return warped
    labels = mask.reshape(n, 1, height, width).to(torch.float64)  # exact for any label below 2**53
    warped_mask = F.grid_sample(labels, sampling, mode="nearest", padding_mode="reflection", align_corners=True)
    return warped, warped_mask.reshape(mask.shape).to(mask.dtype)
