"""Dense CRF: fastseg.dense_crf against pydensecrf (CPU, one image per call) and MONAI's CRF, on the same inputs.

The README workload: a 512x512 RGB photograph (scikit-image's astronaut when scikit-image is installed, else
a synthetic image of coloured blobs), 21 labels, 10 mean-field iterations, Gaussian sxy=3 w=3 + bilateral
sxy=80 srgb=13 w=10, Potts; time against size with 128x128 and 256x256 crops (and 1024x1024 on a GPU), and
against the number of labels with 2, 8 and 64 at 256x256. Both timings include building the lattices (pydensecrf
builds them in addPairwise*, fastseg inside dense_crf). The unaries are a noisy segmentation of the
image (as many classes as labels). The check reports pydensecrf agreement: per-pixel argmax agreement and mean |dQ| (a MISMATCH below
99.5 % / above 1e-3). pydensecrf always runs on the CPU (one core): on a GPU run the speedup compares fastseg on the GPU
with it; where pydensecrf is not installed (the lent GPU machines), fastseg on the CPU is the reference.

One 3-D row: a one-channel volume of 128 slices of 256x256 (the GPU target: under 50 ms; 32 slices of 64x64 on
a CPU), 4 labels, 10 iterations, isotropic voxels (spacing 1: the sxy are in voxels). Its kernels
(VOLUME_KERNELS): Gaussian sxy=3 w=3, pydensecrf's smoothness kernel carried over to 3-D; bilateral sxy=10,
the scale of the volume's structures (tens of voxels, not a photograph's 80 pixels), intensity sigma 20, the
volume's noise level (voxels within noise of each other count as alike), w=5. The volume: ellipsoids of three
grey levels on a fourth, Gaussian noise; the unaries a noisy segmentation of the ellipsoids. Its reference is
pydensecrf's generic DenseCRF on the same features (fastseg's order: x, y, z, intensity) on a CPU, and fastseg
on the CPU on a GPU (pydensecrf on 8.4 M voxels: about 20 s a call, extrapolated from 64x64x32, and a GPU row
makes about ten reference calls). It runs first in the group, so that a run cut by --budget-s still has it.

MONAI's CRF (monai.networks.blocks.CRF), where it is importable and runs (probed once; pip's MONAI wheels ship
without the compiled monai._C its filter needs), adds a row per case with reference "monai", mapped as
monai_crf() says. Its mean field differs from pydensecrf's in the filter's normalisation, so its agreement is
reported, never a MISMATCH. Where it does not run, one skipped row says why.

write_plot draws time against image size and against the number of labels per implementation (the
`--plot PATH` run writes it beside the speedup plot, as <stem>-crf.png).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import fastseg
from fastseg.bench.harness import Case, Row, Workload, describe_error

REFERENCE = "pydensecrf"
CPU_REFERENCE = "fastseg-cpu"
MONAI = "monai"
LABELS = 21
SIZES = (128, 256, 512)  # square crops; a GPU run adds 1024x1024
LABEL_SWEEP = (2, 8, 64)  # at 256x256, beside the 21-label rows
ITERATIONS = 10
AGREEMENT, MEAN_ABS_DQ = 0.995, 1e-3


@dataclass(frozen=True)
class Kernels:
    """The two Potts kernels in pydensecrf's terms (sxy in pixels or voxels, srgb in the image's units); the
    field names are dense_crf's keyword arguments."""

    gaussian_sxy: float
    gaussian_weight: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_weight: float

    @property
    def label(self) -> str:
        return (f"gauss {self.gaussian_sxy:g}/{self.gaussian_weight:g} + bilateral "
                f"{self.bilateral_sxy:g}/{self.bilateral_srgb:g}/{self.bilateral_weight:g}")


PHOTO_KERNELS = Kernels(gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                        bilateral_weight=10.0)
VOLUME_KERNELS = Kernels(gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=10.0, bilateral_srgb=20.0,
                         bilateral_weight=5.0)
VOLUME_SHAPES = {"cuda": (128, 256, 256), "cpu": (32, 64, 64)}  # (D, H, W)
VOLUME_LABELS = 4
VOLUME_GREY_LEVELS = (40.0, 100.0, 160.0, 220.0)  # background first
VOLUME_NOISE = 20.0
GPU_TARGET_MS = 50.0  # the 256x256x128 volume, 4 labels, on a GPU
# MONAI's CUDA filter is compiled for at most 16 value channels (the labels); its CPU filter has no limit.
MONAI_CUDA_MAX_LABELS = 16
CASE_PATTERN = re.compile(r"^(?P<dims>\d+(?:x\d+)+) (?P<kind>rgb|grey volume), (?P<labels>\d+) labels")


def pydensecrf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def monai_skip_reason(device: str) -> str | None:
    """None where MONAI's CRF runs on `device` (probed once, 2 labels on a 4x4 image); else why not, in a line."""
    try:
        from monai.networks.blocks import CRF
    except Exception as error:  # not installed, or a MONAI that does not import against this torch / numpy
        return f"MONAI's CRF is not importable ({describe_error(error)})"
    try:
        with torch.no_grad():
            CRF(iterations=1)(torch.zeros(1, 2, 4, 4, device=device), torch.zeros(1, 1, 4, 4, device=device))
    except Exception as error:  # typically: the wheel has no monai._C, which its PHLFilter calls
        return f"MONAI's CRF does not run here ({describe_error(error).rstrip('.')})"
    return None


# ------------------------------------------------------------------------------------------------- cases

@dataclass
class VolumeCase(Case):
    """The 3-D row; on a GPU its notes say whether fastseg met the target time."""

    target_ms: float | None = None

    def finish_row(self, row: Row) -> None:
        if self.target_ms is not None and row.fastseg_ms is not None:
            verdict = "met" if row.fastseg_ms < self.target_ms else "MISSED"
            row.notes.append(f"GPU target < {self.target_ms:g} ms: {verdict}")


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """pydensecrf as the reference when it is importable; else, on a GPU, fastseg on the CPU (the lent GPU
    machines cannot install pydensecrf); else (CPU without pydensecrf) no such cases. MONAI's rows come
    after them (or one skipped row saying why there are none)."""
    cuda = device.type == "cuda"
    if pydensecrf_available():
        reference = REFERENCE
    elif cuda:
        reference = CPU_REFERENCE
    else:
        print("crf: pydensecrf is not installed (pip install pydensecrf2): no pydensecrf cases on the CPU", flush=True)
        reference = None
    if quick:
        runs = [(256, LABELS)]
    else:  # time against image size at the README's 21 labels, then against the number of labels at 256x256
        sizes = SIZES + ((1024,) if cuda else ())
        runs = [(size, LABELS) for size in sizes] + [(256, labels) for labels in LABEL_SWEEP]
    volume_shape = VOLUME_SHAPES["cuda" if cuda else "cpu"]
    found: list[Case] = []
    if reference is not None:  # the volume first: a run cut by --budget-s still measures the GPU target
        found.append(volume_case(volume_shape, device, CPU_REFERENCE if cuda else reference))
        found += [photo_case(size, labels, device, reference) for size, labels in runs]
    return found + monai_cases(runs, volume_shape, device)


def photo_case(size: int, labels: int, device: torch.device, reference: str) -> Case:
    suffix = ", vs MONAI" if reference == MONAI else ""
    target = device.type == "cuda" and reference != MONAI and (size, labels) == (512, LABELS)  # under 2 ms
    return Case(op="dense_crf", case=f"{size}x{size} rgb, {labels} labels, {ITERATIONS} it, {PHOTO_KERNELS.label}"
                f"{suffix}", dtype=torch.float32, layout="nchw", pass_="forward", reference=reference,
                setup=functools.partial(crf_workload, size, device, reference, labels), target=target)


def volume_case(shape: Sequence[int], device: torch.device, reference: str) -> VolumeCase:
    depth, height, width = shape
    suffix = ", vs MONAI" if reference == MONAI else ""
    target = GPU_TARGET_MS if device.type == "cuda" and reference != MONAI else None
    return VolumeCase(op="dense_crf", case=f"{height}x{width}x{depth} grey volume, {VOLUME_LABELS} labels, "
                      f"{ITERATIONS} it, {VOLUME_KERNELS.label}{suffix}", dtype=torch.float32, layout="nchw",
                      pass_="forward", reference=reference,
                      setup=functools.partial(volume_workload, tuple(shape), device, reference), target_ms=target,
                      target=target is not None)


def monai_cases(runs: Sequence[tuple[int, int]], volume_shape: Sequence[int], device: torch.device) -> list[Case]:
    reason = monai_skip_reason(str(device))
    if reason is not None:  # one row, not one per case: the reason is the same for all
        case = photo_case(*runs[0], device, MONAI)
        case.skip_reason = reason
        return [case]
    found = [photo_case(size, labels, device, MONAI) for size, labels in runs]
    if device.type == "cuda":
        for case, (_, labels) in zip(found, runs):
            if labels > MONAI_CUDA_MAX_LABELS:
                case.skip_reason = f"MONAI's CUDA filter takes at most {MONAI_CUDA_MAX_LABELS} labels"
    volume = volume_case(volume_shape, device, MONAI)
    if device.type == "cuda":  # an illegal memory access would end the CUDA context for every later case
        volume.skip_reason = "MONAI's CUDA filter has illegal-memory-access reports on large 3-D volumes"
    return [volume] + found


# ------------------------------------------------------------------------------------------------ inputs

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


def sample_volume(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A [D, H, W] float32 volume (0..255 grey levels) and its [D, H, W] int64 truth: twelve ellipsoids (the same
    in relative coordinates at every shape) of labels 1..3 on background 0, each label its grey level, plus
    Gaussian noise."""
    rng = np.random.default_rng(0)
    z, y, x = (np.arange(n, dtype=np.float32).reshape([-1 if axis == i else 1 for i in range(3)]) / n
               for axis, n in enumerate(shape))
    truth = np.zeros(shape, dtype=np.int64)
    for blob in range(12):
        cz, cy, cx = rng.random(3)
        radius = 0.08 + 0.2 * rng.random()
        truth[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius ** 2] = 1 + blob % 3
    volume = np.asarray(VOLUME_GREY_LEVELS, dtype=np.float32)[truth]
    volume += rng.normal(0, VOLUME_NOISE, shape).astype(np.float32)
    return np.clip(volume, 0, 255), truth


def segmentation_unary(truth: np.ndarray, labels: int) -> np.ndarray:
    """pydensecrf's unary energy [L, N] float32 of a noisy segmentation of `truth` (any shape, values < labels):
    one-hot logits + Gaussian noise, -log softmax."""
    rng = np.random.default_rng(1)
    logits = 2.0 * np.moveaxis(np.eye(labels)[truth], -1, 0) + rng.normal(0, 1.2, (labels, *truth.shape))
    logits -= logits.max(0, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(labels, -1), dtype=np.float32)


def noisy_unary(image: np.ndarray, labels: int) -> np.ndarray:
    """The unary energy of a noisy segmentation of an [H, W, C] image: its intensity quantised into `labels`
    classes."""
    grey = image.astype(np.float64).mean(-1)
    truth = np.digitize(grey, np.quantile(grey, np.linspace(0, 1, labels + 1)[1:-1]))
    return segmentation_unary(truth, labels)


def lattice_features(spatial: Sequence[int], sxy: float, channels: np.ndarray | None = None,
                     srgb: float = 1.0) -> np.ndarray:
    """pydensecrf's generic features [d, N] float32 as dense_crf makes them (bit for bit): coordinates / sxy in
    x (last axis), y, z order, then each channel of `channels` [C, *spatial] / srgb."""
    axes = [np.arange(n, dtype=np.float32) / np.float32(sxy) for n in spatial]
    features = [grid.reshape(-1) for grid in np.meshgrid(*axes, indexing="ij")[::-1]]
    if channels is not None:
        features += list((channels.astype(np.float32) / np.float32(srgb)).reshape(len(channels), -1))
    return np.ascontiguousarray(np.stack(features))


# --------------------------------------------------------------------------------------------- workloads

def crf_workload(size: int, device: torch.device, reference_name: str = REFERENCE, labels: int = LABELS) -> Workload:
    image = sample_image(size)
    unary = noisy_unary(image, labels)
    logits = -torch.from_numpy(unary).reshape(1, labels, size, size).to(device)
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)

    if reference_name == REFERENCE:
        import pydensecrf.densecrf as dcrf

        def reference() -> np.ndarray:
            k = PHOTO_KERNELS
            d = dcrf.DenseCRF2D(size, size, labels)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=k.gaussian_sxy, compat=k.gaussian_weight)
            d.addPairwiseBilateral(sxy=k.bilateral_sxy, srgb=k.bilateral_srgb, rgbim=image, compat=k.bilateral_weight)
            return np.array(d.inference(ITERATIONS))
    else:
        reference = other_reference(reference_name, logits, image_t, PHOTO_KERNELS)
    return crf_comparison(reference, reference_name, logits, image_t, PHOTO_KERNELS)


def volume_workload(shape: tuple[int, int, int], device: torch.device, reference_name: str = REFERENCE) -> Workload:
    """The 3-D case: a one-channel [D, H, W] volume (sample_volume), VOLUME_LABELS labels, VOLUME_KERNELS."""
    volume, truth = sample_volume(shape)
    unary = segmentation_unary(truth, VOLUME_LABELS)
    logits = -torch.from_numpy(unary).reshape(1, VOLUME_LABELS, *shape).to(device)
    volume_t = torch.from_numpy(volume)[None, None].to(device)

    if reference_name == REFERENCE:
        import pydensecrf.densecrf as dcrf

        k = VOLUME_KERNELS
        # Made once, outside the timing: the generic DenseCRF takes them ready-made (a few ms of numpy).
        gaussian = lattice_features(shape, k.gaussian_sxy)
        bilateral = lattice_features(shape, k.bilateral_sxy, volume[None], k.bilateral_srgb)

        def reference() -> np.ndarray:
            d = dcrf.DenseCRF(unary.shape[1], VOLUME_LABELS)
            d.setUnaryEnergy(unary)
            d.addPairwiseEnergy(gaussian, compat=k.gaussian_weight)
            d.addPairwiseEnergy(bilateral, compat=k.bilateral_weight)
            return np.array(d.inference(ITERATIONS))
    else:
        reference = other_reference(reference_name, logits, volume_t, VOLUME_KERNELS)
    return crf_comparison(reference, reference_name, logits, volume_t, VOLUME_KERNELS)


def other_reference(name: str, logits: torch.Tensor, image: torch.Tensor, kernels: Kernels) -> Callable[[], Any]:
    """The reference callable for fastseg on the CPU (the same call) or MONAI's CRF (on the bench's device)."""
    if name == CPU_REFERENCE:
        return functools.partial(run_fastseg, logits.cpu(), image.cpu(), kernels)
    if name == MONAI:
        monai_model = monai_crf(kernels)

        def reference() -> torch.Tensor:
            with torch.no_grad():
                return monai_model(logits, image)
        return reference
    raise ValueError(f"unknown dense_crf reference {name!r}")


def monai_crf(kernels: Kernels) -> torch.nn.Module:
    """MONAI's CRF with pydensecrf's Potts model, parameter for parameter.

    MONAI's update is Q = softmax(logits + update_factor * (w_b * B(Q) + w_g * G(Q)) [@ compatibility_matrix]),
    pydensecrf's Potts update Q = softmax(logits + sum_k w_k * Ktilde_k Q): so update_factor 1, no compatibility
    matrix, the weights as they are; the sigmas divide the same features (pixel coordinates, 0..255 colours),
    in the same permutohedral lattice (Adams et al.'s scaling and blur). Not the same: MONAI's filter divides
    each filtered value by the filtered constant (D^-1 K Q, a weighted mean) where pydensecrf normalises
    symmetrically (D^-1/2 K D^-1/2 Q); its coordinates come in the tensor's axis order ((row, column) or
    (z, y, x)), pydensecrf's and fastseg's reversed (the lattice's approximation depends on the order); and it builds both lattices again in every iteration
    (part of its time)."""
    from monai.networks.blocks import CRF

    return CRF(iterations=ITERATIONS, bilateral_weight=kernels.bilateral_weight,
               gaussian_weight=kernels.gaussian_weight, bilateral_spatial_sigma=kernels.bilateral_sxy,
               bilateral_color_sigma=kernels.bilateral_srgb, gaussian_spatial_sigma=kernels.gaussian_sxy,
               update_factor=1.0, compatibility_matrix=None)


def run_fastseg(logits: torch.Tensor, image: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    with torch.no_grad():
        return fastseg.dense_crf(logits, image, iterations=ITERATIONS, **dataclasses.asdict(kernels))


def crf_comparison(reference: Callable[[], Any], reference_name: str, logits: torch.Tensor, image: torch.Tensor,
                   kernels: Kernels) -> Workload:
    check = describe_monai_agreement if reference_name == MONAI else check_agreement
    return Workload(
        reference=reference,
        reference_wall_clock=reference_name != MONAI,  # pydensecrf and fastseg's C++ path run on the CPU
        fastseg=functools.partial(run_fastseg, logits, image, kernels),
        # read the logits and the image, write Q: the floor, far below the lattice's real traffic
        fastseg_bytes=2 * logits.numel() * 4 + image.numel() * 4,
        check=functools.partial(check, reference_name=reference_name),
    )


def agreement(expected: Any, actual: torch.Tensor) -> tuple[float, float]:
    """Per-pixel argmax agreement and mean |dQ| of two [L, N]-reshapeable marginals (numpy or tensor)."""
    expected = expected.detach().cpu().double().numpy() if isinstance(expected, torch.Tensor) else expected
    expected = expected.reshape(actual.shape[1], -1)
    q = actual.detach().cpu().reshape(expected.shape).double().numpy()
    return float((q.argmax(0) == expected.argmax(0)).mean()), float(np.abs(q - expected).mean())


def check_agreement(expected: np.ndarray, actual: torch.Tensor, reference_name: str = REFERENCE) -> str:
    share, mean_dq = agreement(expected, actual)
    note = f"vs {reference_name}: argmax agreement {share * 100:.3f}%, mean |dQ| {mean_dq:.1e}"
    if share < AGREEMENT or mean_dq >= MEAN_ABS_DQ:
        raise AssertionError(note)
    return note


def describe_monai_agreement(expected: torch.Tensor, actual: torch.Tensor, reference_name: str = MONAI) -> str:
    share, mean_dq = agreement(expected, actual)
    return (f"vs {reference_name} (its filter normalises by the weight sum, pydensecrf's symmetrically: close, not "
            f"equal): argmax agreement {share * 100:.3f}%, mean |dQ| {mean_dq:.1e}")


# ------------------------------------------------------------------------------------------------- plot

def write_plot(path: str | Path, rows: Sequence[Row], title: str, device: torch.device) -> bool:
    """Two panels, time (ms, log) per implementation: against the image size in pixels (the 21-label rows as
    lines, the 3-D volume as stars) and against the number of labels at 256x256. False if matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    times = implementation_times(rows, f"fastseg {'GPU' if device.type == 'cuda' else 'CPU'}")
    figure, (by_size, by_labels) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes in (by_size, by_labels):
        axes.set_xscale("log")
        axes.set_yscale("log")
    for colour, (implementation, points) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], times.items()):
        sized = sorted((pixels, ms) for (kind, pixels, labels), ms in points.items()
                       if kind == "rgb" and labels == LABELS)
        volumes = [(pixels, ms) for (kind, pixels, _), ms in points.items() if kind == "grey volume"]
        labelled = sorted((labels, ms) for (kind, pixels, labels), ms in points.items()
                          if kind == "rgb" and pixels == 256 * 256)
        if sized:
            by_size.plot(*zip(*sized), "o-", color=colour, label=implementation)
        if volumes:
            by_size.plot(*zip(*volumes), "*", markersize=12, color=colour,
                         label=None if sized else implementation)
        if labelled:
            by_labels.plot(*zip(*labelled), "o-", color=colour, label=implementation)
    if device.type == "cuda":
        by_size.axhline(GPU_TARGET_MS, color="grey", linestyle=":", label=f"volume target {GPU_TARGET_MS:g} ms")
    by_size.set_xlabel(f"pixels (lines: RGB, {LABELS} labels; stars: grey volume, {VOLUME_LABELS} labels)")
    by_labels.set_xlabel("labels (256x256 RGB)")
    # ticks at the measured sizes and label counts: a handful of points, each worth reading off
    pixels_measured = sorted({pixels for points in times.values() for _, pixels, _ in points})
    by_size.set_xticks(pixels_measured, [f"{p / 1e3:.0f}k" if p < 1e6 else f"{p / 1e6:.2g}M" for p in pixels_measured])
    labels_measured = sorted({labels for points in times.values() for kind, pixels, labels in points
                              if kind == "rgb" and pixels == 256 * 256})
    by_labels.set_xticks(labels_measured, [str(labels) for labels in labels_measured])
    for axes in (by_size, by_labels):
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        axes.set_ylabel(f"ms ({ITERATIONS} mean-field iterations)")
        axes.grid(True, which="both", linewidth=0.3)
        if axes.has_data():
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no dense_crf row measured", ha="center", transform=axes.transAxes)
    figure.suptitle(f"dense CRF: {title}", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def implementation_times(rows: Sequence[Row], fastseg_name: str) -> dict[str, dict[tuple[str, int, int], float]]:
    """{implementation: {(kind, pixels, labels): ms}} from the measured dense_crf rows: each row's reference
    time under its reference's name, its fastseg time under `fastseg_name` (rows sharing a case give fastseg
    one point: the first)."""
    names = {REFERENCE: "pydensecrf (CPU, 1 thread)", CPU_REFERENCE: "fastseg CPU", MONAI: "MONAI"}
    times: dict[str, dict[tuple[str, int, int], float]] = {}
    for row in rows:
        match = CASE_PATTERN.match(row.case)
        if row.op != "dense_crf" or match is None:
            continue
        key = (match["kind"], math.prod(int(n) for n in match["dims"].split("x")), int(match["labels"]))
        for name, ms in ((names.get(row.reference, row.reference), row.reference_ms), (fastseg_name, row.fastseg_ms)):
            if ms is not None:
                times.setdefault(name, {}).setdefault(key, ms)
    return times
