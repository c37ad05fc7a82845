"""`python -m fastseg demo`: fastseg's dense CRF snaps a coarse segmentation of a real image to the image's edges.

The image: scikit-image's immunohistochemistry sample (``skimage.data.immunohistochemistry()``, 512x512 RGB,
colon tissue stained with DAB, brown, and hematoxylin, blue). The reference mask: the DAB-stained tissue,
found by colour deconvolution (``skimage.color.rgb2hed``), a Gaussian blur, Otsu's threshold and the removal of
small specks and holes. No trained network is involved:

The coarse segmentation is made from the reference mask, on purpose: the mask averaged over a 32x32 grid of
cells (16x16 pixels at 512x512, like the output of a network at output stride 16), upsampled bilinearly,
turned into two-class logits (3 * (2p - 1)) and disturbed with smooth Gaussian noise. It is right in the large
but blurred and wrong along every boundary, which is what a network's upsampled scores look like and what a
dense CRF is for. fastseg.dense_crf then refines it with the image's colours (Gaussian kernel sxy=3 w=3,
bilateral sxy=30 srgb=10 w=5, 10 mean-field iterations; the spatial sigmas scaled with --size), and the demo
reports the intersection over union of the coarse and refined foreground with the reference mask, printed and
in the figure's title, in a PNG of three panels side by side: the image with the reference mask's outline
(yellow), the coarse segmentation and the refined one (blue, with the same outline).

    python -m fastseg demo                          # writes fastseg-demo.png
    python -m fastseg demo --out crf.png --device cuda --size 256

Needs scikit-image (and SciPy, which it installs); the PNG is drawn with matplotlib, else with Pillow.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

GRID = 32  # coarse cells across the image
LOGIT_SCALE, NOISE_STD = 3.0, 1.0
ITERATIONS = 10
GAUSSIAN_SXY, GAUSSIAN_W = 3.0, 3.0
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_W = 30.0, 10.0, 5.0
NATIVE_SIZE = 512
OUTLINE = np.array([255, 230, 0], dtype=np.float64)
TINT = np.array([0, 120, 255], dtype=np.float64)


@dataclass
class DemoResult:
    iou_coarse: float
    iou_refined: float
    crf_ms: float
    size: int
    device: str
    path: Path | None  # None when no PNG could be written
    writer: str  # "matplotlib", "Pillow", or what was missing

    @property
    def title(self) -> str:
        return (f"fastseg dense CRF on {self.device}: IoU with the reference mask {self.iou_coarse:.3f} (coarse) -> "
                f"{self.iou_refined:.3f} (refined)")


def load_image(size: int) -> np.ndarray:
    """[size, size, 3] uint8: scikit-image's immunohistochemistry sample, resized (anti-aliased) unless 512."""
    import skimage.data

    image = skimage.data.immunohistochemistry()
    if size != image.shape[0]:
        from skimage.transform import resize

        image = resize(image, (size, size), anti_aliasing=True, preserve_range=True)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def reference_mask(image: np.ndarray) -> np.ndarray:
    """[H, W] bool: the DAB-stained (brown) tissue. Colour deconvolution, blur, Otsu, clean-up; sizes scale with
    the image (the constants are for 512x512)."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    scale = image.shape[0] / NATIVE_SIZE
    dab = ndimage.gaussian_filter(rgb2hed(image)[..., 2], 2.0 * scale)
    mask = dab > threshold_otsu(dab)
    radius = max(1, round(2 * scale))
    mask = ndimage.binary_opening(mask, structure=np.ones((2 * radius + 1, 2 * radius + 1), bool))
    min_area = max(4, round(500 * scale**2))
    mask = _drop_small_components(mask, min_area)
    mask = ~_drop_small_components(~mask, min_area)  # fill small holes
    return mask


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def coarse_logits(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """[2, H, W] float32 logits (background, foreground) of a coarse, noisy segmentation made from `mask`."""
    import torch.nn.functional as F
    from scipy import ndimage

    size = mask.shape[0]
    cell = max(1, size // GRID)
    fraction = F.avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], cell, ceil_mode=True)
    p = F.interpolate(fraction, size=mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, mask.shape), 4.0 * size / NATIVE_SIZE)
    noise /= noise.std() + 1e-12
    foreground = LOGIT_SCALE * (2.0 * p - 1.0) + NOISE_STD * noise
    return np.stack([-foreground / 2, foreground / 2]).astype(np.float32)


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    union = np.logical_or(prediction, reference).sum()
    return float(np.logical_and(prediction, reference).sum() / union) if union else 1.0


def refine(logits: np.ndarray, image: np.ndarray, device: torch.device) -> tuple[np.ndarray, float]:
    """The dense CRF's foreground (argmax of Q) and the CRF's time in ms (after one warm-up call)."""
    import fastseg

    scale = image.shape[0] / NATIVE_SIZE
    logits_t = torch.from_numpy(logits)[None].to(device)
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
    kwargs = dict(iterations=ITERATIONS, gaussian_sxy=max(1.0, GAUSSIAN_SXY * scale), gaussian_weight=GAUSSIAN_W,
                  bilateral_sxy=max(1.0, BILATERAL_SXY * scale), bilateral_srgb=BILATERAL_SRGB,
                  bilateral_weight=BILATERAL_W)
    with torch.no_grad():
        fastseg.dense_crf(logits_t, image_t, **kwargs)  # first call: lattice code paths, Triton/CUDA warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        q = fastseg.dense_crf(logits_t, image_t, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) * 1e3
    return (q[0, 1] > q[0, 0]).cpu().numpy(), ms


def panels(image: np.ndarray, reference: np.ndarray, coarse: np.ndarray, refined: np.ndarray) -> list[np.ndarray]:
    """Three RGB uint8 panels: the image, the coarse and the refined masks tinted over it, each with the reference
    mask's outline."""
    from scipy import ndimage

    outline = reference & ~ndimage.binary_erosion(reference, iterations=max(1, image.shape[0] // 256))

    def draw(mask: np.ndarray | None) -> np.ndarray:
        out = image.astype(np.float64)
        if mask is not None:
            out[mask] = 0.45 * out[mask] + 0.55 * TINT
        out[outline] = OUTLINE
        return out.astype(np.uint8)

    return [draw(None), draw(coarse), draw(refined)]


def write_png(path: Path, images: Sequence[np.ndarray], captions: Sequence[str], title: str) -> str:
    """Write the panels side by side with their captions and a title; returns the library that drew them, or
    raises ImportError naming what is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        pass
    else:
        figure, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 5.6))
        for axis, panel, caption in zip(axes, images, captions):
            axis.imshow(panel)
            axis.set_title(caption, fontsize=10)
            axis.axis("off")
        figure.suptitle(title, fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return "matplotlib"
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise ImportError("neither matplotlib nor Pillow is installed (pip install matplotlib)") from None
    height, width = images[0].shape[:2]
    gap, top = 8, 44
    canvas = Image.new("RGB", (len(images) * width + (len(images) - 1) * gap, height + top), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    for i, (panel, caption) in enumerate(zip(images, captions)):
        canvas.paste(Image.fromarray(panel), (i * (width + gap), top))
        draw.text((i * (width + gap) + 4, 24), caption, fill="black")
    canvas.save(path)
    return "Pillow"


def run_demo(out: str | Path = "fastseg-demo.png", device: str | torch.device | None = None, size: int = NATIVE_SIZE,
             seed: int = 0) -> DemoResult:
    """Build the reference mask and the coarse segmentation, refine it with fastseg.dense_crf, write the PNG."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image = load_image(size)
    reference = reference_mask(image)
    logits = coarse_logits(reference, seed)
    coarse = logits[1] > logits[0]
    refined, crf_ms = refine(logits, image, device)
    result = DemoResult(iou(coarse, reference), iou(refined, reference), crf_ms, size, str(device), Path(out), "")
    captions = ["image, reference mask outlined (DAB-stained tissue)",
                f"coarse: IoU {result.iou_coarse:.3f}", f"refined by fastseg.dense_crf: IoU {result.iou_refined:.3f}"]
    try:
        result.writer = write_png(result.path, panels(image, reference, coarse, refined), captions, result.title)
    except ImportError as error:
        result.path, result.writer = None, str(error)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastseg demo",
        description="Refine a coarse segmentation of a real microscopy image with fastseg's dense CRF and write "
                    "a PNG of the image, the coarse and the refined segmentation, with their IoU against a "
                    "reference mask. The coarse segmentation is made from the reference mask (averaged over a "
                    "32x32 grid, upsampled, noise added): no trained network is involved.")
    parser.add_argument("--out", default="fastseg-demo.png", help="PNG to write (default: fastseg-demo.png)")
    parser.add_argument("--device", help="torch device for the CRF (default: cuda if available, else cpu)")
    parser.add_argument("--size", type=int, default=NATIVE_SIZE,
                        help=f"resize the {NATIVE_SIZE}x{NATIVE_SIZE} image to this size first "
                             f"(default: {NATIVE_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the coarse segmentation's noise")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size < 32:
        print("--size must be at least 32", file=sys.stderr)
        return 2
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        import scipy  # noqa: F401
        import skimage  # noqa: F401
    except ImportError as error:
        print(f"the demo needs scikit-image (and SciPy): {error}; pip install scikit-image", file=sys.stderr)
        return 2
    result = run_demo(args.out, args.device, args.size, args.seed)
    print(f"image: skimage.data.immunohistochemistry(), {result.size}x{result.size}; reference mask: DAB-stained "
          f"tissue (colour deconvolution + Otsu)")
    print(f"coarse segmentation (from the reference mask on a {GRID}x{GRID} grid, upsampled, noisy): "
          f"IoU {result.iou_coarse:.3f}")
    print(f"refined by fastseg.dense_crf on {result.device} ({ITERATIONS} iterations, {result.crf_ms:.1f} ms): "
          f"IoU {result.iou_refined:.3f}")
    if result.path is None:
        print(f"no PNG written: {result.writer}", file=sys.stderr)
        return 1
    print(f"figure written to {result.path} ({result.writer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
