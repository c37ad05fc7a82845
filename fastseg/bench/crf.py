"""Dense CRF: pydensecrf (CPU, one image per call) against fastseg.dense_crf on the same unaries and kernels.

The README workload: a 512x512 RGB photograph (scikit-image's astronaut when scikit-image is installed, else
a synthetic image of coloured blobs), 21 labels, 10 mean-field iterations, Gaussian sxy=3 w=3 + bilateral
sxy=80 srgb=13 w=10, Potts; time against size with 128x128 and 256x256 crops (and 1024x1024 on a GPU), and
against the number of labels with 2, 8 and 64 at 256x256. Both timings include building the lattices (pydensecrf
builds them in addPairwise*, fastseg inside dense_crf). The unaries are a noisy segmentation of the
image (as many classes as labels). The check reports pydensecrf agreement: per-pixel argmax agreement and mean |dQ| (a MISMATCH below
99.5 % / above 1e-3). pydensecrf always runs on the CPU (one core): on a GPU run the speedup compares fastseg on the GPU
with it; where pydensecrf is not installed (the lent GPU machines), fastseg on the CPU is the reference.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

import fastseg
from fastseg.bench.harness import Case, Workload

REFERENCE = "pydensecrf"
LABELS = 21
SIZES = (128, 256, 512)  # square crops; a GPU run adds 1024x1024
LABEL_SWEEP = (2, 8, 64)  # at 256x256, beside the 21-label rows
ITERATIONS = 10
GAUSSIAN_SXY, GAUSSIAN_W, BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_W = 3.0, 3.0, 80.0, 13.0, 10.0
AGREEMENT, MEAN_ABS_DQ = 0.995, 1e-3
KERNELS = "gauss 3/3 + bilateral 80/13/10"


def pydensecrf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """pydensecrf as the reference when it is importable; else, on a GPU, fastseg on the CPU (the lent GPU
    machines cannot install pydensecrf); else (CPU without pydensecrf) no cases."""
    if pydensecrf_available():
        reference = REFERENCE
    elif device.type == "cuda":
        reference = "fastseg-cpu"
    else:
        print("crf: pydensecrf is not installed (pip install pydensecrf2): no dense_crf cases on the CPU", flush=True)
        return []
    if quick:
        runs = [(256, LABELS)]
    else:  # time against image size at the README's 21 labels, then against the number of labels at 256x256
        sizes = SIZES + ((1024,) if device.type == "cuda" else ())
        runs = [(size, LABELS) for size in sizes] + [(256, labels) for labels in LABEL_SWEEP]
    return [
        Case(op="dense_crf", case=f"{size}x{size} rgb, {labels} labels, {ITERATIONS} it, {KERNELS}",
             dtype=torch.float32, layout="nchw", pass_="forward", reference=reference,
             setup=functools.partial(crf_workload, size, device, reference, labels))
        for size, labels in runs
    ]


def sample_image(size: int) -> np.ndarray:
    """[size, size, 3] uint8: the astronaut photograph (centre crop; pixels repeated first for sizes above its
    512), else smooth coloured blobs plus noise."""
    try:
        import skimage.data

        image = skimage.data.astronaut()
        repeat = -(-size // image.shape[0])
        image = image.repeat(repeat, axis=0).repeat(repeat, axis=1)
        top = (image.shape[0] - size) // 2
        return np.ascontiguousarray(image[top:top + size, top:top + size, :3])
    except Exception:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[:size, :size] / size
        image = np.zeros((size, size, 3))
        for _ in range(12):
            cy, cx, r = rng.random(3) * [1, 1, 0.3]
            image[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = rng.integers(0, 256, 3)
        return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def noisy_unary(image: np.ndarray, labels: int) -> np.ndarray:
    """pydensecrf's unary energy [L, H*W] float32 of a noisy segmentation: intensity quantised into `labels`
    classes, one-hot logits + Gaussian noise, -log softmax."""
    rng = np.random.default_rng(1)
    grey = image.astype(np.float64).mean(-1)
    truth = np.digitize(grey, np.quantile(grey, np.linspace(0, 1, labels + 1)[1:-1]))
    logits = 2.0 * np.eye(labels)[truth].transpose(2, 0, 1) + rng.normal(0, 1.2, (labels, *grey.shape))
    logits -= logits.max(0, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(labels, -1), dtype=np.float32)


def crf_workload(size: int, device: torch.device, reference_name: str = REFERENCE, labels: int = LABELS) -> Workload:
    image = sample_image(size)
    unary = noisy_unary(image, labels)
    logits = -torch.from_numpy(unary).reshape(1, labels, size, size).to(device)
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)

    if reference_name == REFERENCE:
        import pydensecrf.densecrf as dcrf

        def reference() -> np.ndarray:
            d = dcrf.DenseCRF2D(size, size, labels)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_W)
            d.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=image, compat=BILATERAL_W)
            return np.array(d.inference(ITERATIONS))
    else:  # fastseg on the CPU, the same call
        logits_cpu, image_cpu = logits.cpu(), image_t.cpu()

        def reference() -> np.ndarray:
            with torch.no_grad():
                q = fastseg.dense_crf(logits_cpu, image_cpu, iterations=ITERATIONS, gaussian_sxy=GAUSSIAN_SXY,
                                      gaussian_weight=GAUSSIAN_W, bilateral_sxy=BILATERAL_SXY,
                                      bilateral_srgb=BILATERAL_SRGB, bilateral_weight=BILATERAL_W)
            return q.reshape(labels, -1).double().numpy()

    def run_fastseg() -> torch.Tensor:
        with torch.no_grad():
            return fastseg.dense_crf(logits, image_t, iterations=ITERATIONS, gaussian_sxy=GAUSSIAN_SXY,
                                     gaussian_weight=GAUSSIAN_W, bilateral_sxy=BILATERAL_SXY,
                                     bilateral_srgb=BILATERAL_SRGB, bilateral_weight=BILATERAL_W)

    return Workload(
        reference=reference,
        fastseg=run_fastseg,
        # read the logits and the image, write Q: the floor, far below the lattice's real traffic
        fastseg_bytes=2 * logits.numel() * 4 + image_t.numel() * 4,
        check=functools.partial(check_agreement, reference_name=reference_name),
    )


def check_agreement(expected: np.ndarray, actual: torch.Tensor, reference_name: str = REFERENCE) -> str:
    q = actual.detach().cpu().reshape(expected.shape).double().numpy()
    agreement = float((q.argmax(0) == expected.argmax(0)).mean())
    mean_dq = float(np.abs(q - expected).mean())
    note = f"vs {reference_name}: argmax agreement {agreement * 100:.3f}%, mean |dQ| {mean_dq:.1e}"
    if agreement < AGREEMENT or mean_dq >= MEAN_ABS_DQ:
        raise AssertionError(note)
    return note
