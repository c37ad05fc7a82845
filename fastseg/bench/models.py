"""Whole networks: each reference network (eager PyTorch) against its fastseg twin, ``fastseg.convert.optimize(model)``.

The main job of `python -m fastseg bench`: what a user gets from one call of the converter. The networks are
fastseg.models' (randomly initialised): U-Net (padded), DeepLab v3 ResNet-50, FCN-8s, SegNet, DeepLab v1
LargeFOV. For each:

- inference (pass "forward"): eval mode, torch.no_grad(). The BatchNorms get random parameters and running
  statistics of a trained network's kind (randomize_batchnorm: the fold is no identity, and the network stays
  well conditioned); the twin is optimize()'s deep copy of the model, so both hold the same weights. The model
  is cast to the row's dtype (channels_last for float16 and bfloat16).
- one training step (pass "train_step"): training mode, forward + cross-entropy against random labels +
  backward (torch.autograd.grad of the parameters; no optimizer step, so every repeat computes the same step).
  Float32 weights; for float16 / bfloat16 under torch.autocast (mixed precision, channels_last), float16 with a
  static loss scale of 1024 as a GradScaler would apply. Dropout is off in the training step so that both sides
  compute the same function (and torch.compile's, which draws other random numbers).

References: eager PyTorch (cudnn.benchmark on CUDA), and on CUDA torch.compile (default mode) of the same
reference model as a second row per case (inference for every network, the training step for DeepLab v3;
with --quick, DeepLab v3 inference only). The fastseg side is always the eager optimized twin. --quick on CUDA:
DeepLab v3 (inference and training step) and U-Net (inference).

Each row's notes: the agreement with the reference (max |diff|, relative RMS difference, argmax agreement; a
MISMATCH when the relative RMS difference exceeds TOLERANCE for the dtype), images/s of both sides, peak memory
(CUDA, the harness's), the converter's summary (chains fused, convolutions and pools replaced, modules left and
why), and on CUDA the first call's time (fastseg: Triton compilation and autotuning; torch.compile: compilation)
and what "auto" chose for the twin's convolutions (bench.conv.auto_summary: the implementations kept, and the
summed per-call times of the chosen candidates, of cuDNN's and of the Triton kernel's).

The dense-CRF pipeline row: DeepLab v1 LargeFOV followed by dense CRF with DeepLab's VGG-16 settings, on a batch
of photographs (the astronaut, flipped; the class scorer's random weights scaled so that the scores spread as
a trained network's do) -- the eager network + pydensecrf (on the CPU, one image at a time, the scores copied
to the host) against the optimized network + fastseg.nn.DenseCRF on the same device. The check: argmax
agreement of the marginals (at least 99 %) and mean |dQ| (below 1e-2). Where pydensecrf is not installed, the
row is kept as 'skipped' with the reason.

On a CPU only small, narrowed copies of the networks run (base widths divided by 8, about 128x128, batch 1 or 2,
float32, eager reference only), so that `python -m fastseg bench --ops models` takes about a minute on two
cores (fastseg's convolution on the CPU is torch's, behind the custom op: the CPU rows check correctness and
the converter, they are no speed claim); the GPU sizes are the networks' own at training / evaluation crop
sizes, batch 8.
"""

from __future__ import annotations

import functools
import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastseg.bench.conv import auto_summary
from fastseg.bench.crf import pydensecrf_available
from fastseg.bench.harness import Case, Row, Workload, dtype_name
from fastseg.ops import conv as conv_ops

EAGER = "torch eager"
COMPILED = "torch.compile"
PYDENSECRF = "pydensecrf"
INFERENCE, TRAIN_STEP = "forward", "train_step"
# Relative RMS difference ||fastseg - reference|| / ||reference|| allowed per dtype: whole networks accumulate the
# rounding of tens of layers (and TF32 in float32 convolutions on CUDA); a wrong kernel gives O(1).
TOLERANCE = {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1, torch.float64: 1e-6}
FP16_LOSS_SCALE = 1024.0
# DeepLab v1's dense-CRF settings (VGG-16 models: Gaussian w=2 xy=2, bilateral w=4 xy=65 rgb=3; 10 iterations).
CRF_ITERATIONS, CRF_GAUSSIAN_SXY, CRF_GAUSSIAN_W = 10, 2.0, 2.0
CRF_BILATERAL_SXY, CRF_BILATERAL_SRGB, CRF_BILATERAL_W = 65.0, 3.0, 4.0
CRF_KERNELS = "gauss 2/2 + bilateral 65/3/4"
# Pipeline check: argmax agreement of the CRF's marginals with pydensecrf's (the networks' scores themselves differ
# by rounding on CUDA), mean |dQ|.
CRF_AGREEMENT, CRF_MEAN_ABS_DQ = 0.99, 1e-2
FC8_SCALE = 200.0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Network:
    """One network as benchmarked: a fastseg.models constructor with its arguments and the input batch."""

    name: str  # fastseg.models.MODELS key
    kwargs: tuple[tuple[str, Any], ...]
    batch: int
    height: int
    width: int
    in_channels: int = 3
    num_classes: int = 21
    note: str = ""  # e.g. "padded", "widths / 8"

    def build(self) -> nn.Module:
        from fastseg.models import get_model

        return get_model(self.name, in_channels=self.in_channels, num_classes=self.num_classes, **dict(self.kwargs))

    def label(self) -> str:
        extra = f" ({self.note})" if self.note else ""
        shape = f"{self.batch}x{self.in_channels}x{self.height}x{self.width}"
        return f"{self.name}{extra} {shape}, {self.num_classes} classes"


# GPU: the networks' own widths at their training / evaluation crop sizes.
GPU_NETWORKS = (
    Network("deeplabv3_resnet50", (), 8, 512, 512, note="output stride 8"),
    Network("unet", (("padding", True),), 8, 512, 512, in_channels=1, num_classes=2, note="padded"),
    Network("fcn8s", (), 8, 512, 512),
    Network("segnet", (), 8, 360, 480, num_classes=11, note="CamVid size"),
    Network("deeplab_v1_largefov", (), 8, 321, 321),
)
GPU_QUICK = ("deeplabv3_resnet50", "unet")
# Issue targets (GPU): these networks' float16 channels_last inference against eager, and the CRF pipeline (DeepLab
# v1 + CRF); their rows run first, in TARGET_ORDER: the Triton kernels U-Net's first call compiles (convolution +
# bias + ReLU) serve DeepLab v1 in the pipeline too, and DeepLab v3's BatchNorm and residual variants compile the
# most, so a run cut by its budget measures the most targets.
TARGET_NETWORKS, TARGET_DTYPE = ("unet", "deeplabv3_resnet50"), torch.float16
TARGET_ORDER = ("unet", "deeplab_v1_largefov", "deeplabv3_resnet50")
GPU_TRAIN = ("deeplabv3_resnet50", "unet", "fcn8s", "segnet", "deeplab_v1_largefov")
GPU_COMPILED_TRAIN = ("deeplabv3_resnet50",)
GPU_QUICK_TRAIN = ("deeplabv3_resnet50",)
GPU_QUICK_COMPILED = ("deeplabv3_resnet50",)  # quick: torch.compile (minutes to compile) for its inference only
# CPU: the same networks, narrowed (base width / 8; FCN-8s and DeepLab v1's fully connected layers too).
CPU_NETWORKS = (
    Network("deeplabv3_resnet50", (("base_width", 8),), 2, 128, 128, note="widths / 8"),
    Network("unet", (("padding", True), ("base_width", 8)), 1, 128, 128, in_channels=1, num_classes=2,
            note="padded, widths / 8"),
    Network("fcn8s", (("base_width", 8), ("fc_channels", 512)), 1, 128, 128, note="widths / 8"),
    Network("segnet", (("base_width", 8),), 1, 96, 128, num_classes=11, note="widths / 8"),
    Network("deeplab_v1_largefov", (("base_width", 8), ("fc_channels", 128)), 1, 129, 129, note="widths / 8"),
)
CPU_QUICK = ("deeplabv3_resnet50", "unet")
CPU_QUICK_TRAIN = ("unet",)
# The CRF pipeline: (network, batch, size) by device kind and quick.
CRF_PIPELINE = {
    # pydensecrf takes about 0.5-0.8 s per 321x321 image with DeepLab's srgb=3, and a CUDA timing calls the
    # reference about 10 times: a batch of 2 keeps the row near 15 s.
    ("cuda", False): (Network("deeplab_v1_largefov", (), 2, 321, 321), 321),
    ("cuda", True): (Network("deeplab_v1_largefov", (), 1, 321, 321), 321),
    ("cpu", False): (Network("deeplab_v1_largefov", (("base_width", 8), ("fc_channels", 128)), 1, 129, 129,
                             note="widths / 8"), 129),
    ("cpu", True): (Network("deeplab_v1_largefov", (("base_width", 8), ("fc_channels", 128)), 1, 65, 65,
                            note="widths / 8"), 65),
}


@dataclass
class ModelCase(Case):
    """A Case whose rows get notes after the run (images/s, the converter's summary, first-call times)."""

    images: int = 0
    info: dict = field(default_factory=dict)  # filled by setup: converter summary, first-call times

    def finish_row(self, row: Row) -> None:
        notes = []
        if self.images and row.fastseg_ms:
            reference = f", {self.reference} {self.images / row.reference_ms * 1e3:.1f}" if row.reference_ms else ""
            notes.append(f"images/s: fastseg {self.images / row.fastseg_ms * 1e3:.1f}{reference}")
        if self.info.get("summary"):
            notes.append(self.info["summary"])
        for side, ms in self.info.get("first_call_ms", {}).items():
            notes.append(f"first call {side} {ms / 1e3:.1f} s")
        if "auto_problems_before" in self.info:
            notes.append(auto_summary(self.info["auto_problems_before"]))
        row.notes.extend(filter(None, notes))


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        networks = [n for n in GPU_NETWORKS if not quick or n.name in GPU_QUICK]
        train = GPU_QUICK_TRAIN if quick else GPU_TRAIN
        compiled_train = () if quick else GPU_COMPILED_TRAIN
        references = (EAGER, COMPILED)
    else:
        networks = [n for n in CPU_NETWORKS if not quick or n.name in CPU_QUICK]
        train = CPU_QUICK_TRAIN if quick else tuple(n.name for n in CPU_NETWORKS)
        compiled_train = ()
        references = (EAGER,)
    found: list[Case] = []
    for dtype in dtypes:
        layout = "channels_last" if dtype in (torch.float16, torch.bfloat16) else "nchw"
        for reference in references:
            for network in networks:
                if reference == COMPILED and quick and network.name not in GPU_QUICK_COMPILED:
                    continue
                passes = [INFERENCE]
                if network.name in (compiled_train if reference == COMPILED else train):
                    passes.append(TRAIN_STEP)
                for pass_ in passes:
                    found.append(_model_case(network, dtype, layout, pass_, reference, device))
    if torch.float32 in dtypes:
        found.append(_crf_pipeline_case(device, quick))
    return sorted(found, key=_target_order)


def _target_order(case: Case) -> int:
    """The target rows in TARGET_ORDER (a case's label starts with its network's name), then the rest."""
    return TARGET_ORDER.index(case.case.split(" ")[0]) if case.target else len(TARGET_ORDER)


def _model_case(network: Network, dtype: torch.dtype, layout: str, pass_: str, reference: str,
                device: torch.device) -> ModelCase:
    label = network.label()
    if pass_ == TRAIN_STEP:
        label += ", " + ("autocast " + dtype_name(dtype) if dtype in (torch.float16, torch.bfloat16)
                         else "fp32") + " training step, dropout off"
    if reference == COMPILED:
        label += ", vs torch.compile"
    target = (device.type == "cuda" and network.name in TARGET_NETWORKS and dtype == TARGET_DTYPE
              and pass_ == INFERENCE and reference == EAGER)
    case = ModelCase(op="model", case=label, dtype=dtype, layout=layout, pass_=pass_, reference=reference,
                     setup=lambda: None, images=network.batch, target=target)
    case.setup = functools.partial(model_workload, network, dtype, layout, pass_, reference, device, case.info)
    return case


def _crf_pipeline_case(device: torch.device, quick: bool) -> ModelCase:
    network, size = CRF_PIPELINE[("cuda" if device.type == "cuda" else "cpu", quick)]
    label = (f"{network.name}{' (' + network.note + ')' if network.note else ''} + dense CRF, "
             f"{network.batch}x3x{size}x{size} photographs, {network.num_classes} labels, {CRF_ITERATIONS} it, "
             f"{CRF_KERNELS}")
    case = ModelCase(op="model", case=label, dtype=torch.float32, layout="nchw", pass_=INFERENCE,
                     reference=f"{EAGER} + {PYDENSECRF}", setup=lambda: None, images=network.batch,
                     target=device.type == "cuda")
    if not pydensecrf_available():
        case.skip_reason = ("pydensecrf is not installed on this machine (pip install pydensecrf2): no "
                            "DeepLab + pydensecrf pipeline to compare with")
    case.setup = functools.partial(crf_pipeline_workload, network, size, device, case.info)
    return case


# ------------------------------------------------------------------------------------------------ workloads


def _release(device: torch.device) -> None:
    # An optimized model holds reference cycles (each fused convolution keeps its chain, which holds it): the
    # previous case's models are freed by the collector, before this case allocates its own.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _scores(output) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm random affine parameters and running statistics of a trained network's kind
    (weight in [0.5, 1.5], bias ~ N(0, 0.1), running mean ~ N(0, 0.1), running variance in [0.5, 2]), so that
    the folded BatchNorm is no identity; the network stays well conditioned (statistics computed from a batch
    would give near-dead channels gains of hundreds, and half precision differences with them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                    m.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)


def _dropout_off(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def conversion_summary(twin: nn.Module, report) -> str:
    """'optimize: 12 conv-bn-relu, 3 conv-bn, 4 conv-bn-shortcut-relu chains fused; 2 convs, 4 pools replaced;
    left 4 ConvTranspose2d (reason)' from the optimized model's modules and optimize()'s report."""
    from fastseg.convert import FusedChainConv2d, _FusedResidualBlock
    from fastseg.nn import FusedConv2d, MaxPool2d, MaxUnpool2d

    chains: Counter = Counter()
    replaced: Counter = Counter()
    residual_convs = {id(m._residual_chain.conv) for m in twin.modules() if isinstance(m, _FusedResidualBlock)}
    for module in twin.modules():
        if isinstance(module, _FusedResidualBlock):
            chains["conv-bn-shortcut-relu"] += 1
        elif id(module) in residual_convs:
            continue
        elif type(module) is FusedChainConv2d:
            chain = module._chain
            parts = ["conv"] + (["bn"] if chain.bn is not None else []) + (
                ["relu"] if chain.act is not None and not isinstance(chain.act, nn.Identity) else [])
            chains["-".join(parts)] += 1
        elif type(module) is FusedConv2d:
            replaced["conv"] += 1
        elif type(module) is MaxPool2d:
            replaced["pool"] += 1
        elif type(module) is MaxUnpool2d:
            replaced["unpool"] += 1
    parts = []
    if chains:
        parts.append(", ".join(f"{n} {kind}" for kind, n in chains.most_common()) + " chains fused")
    if replaced:
        parts.append(", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in replaced.items()) + " replaced")
    left = Counter((d.kind, d.detail) for d in report.left)
    if left:
        parts.append("left " + ", ".join(f"{n} {kind} ({detail})" for (kind, detail), n in left.items()))
    return "optimize: " + ("; ".join(parts) if parts else "nothing converted")


def _timed_first_call(fn: Callable[[], Any], device: torch.device, record: dict, key: str) -> Callable[[], Any]:
    """fn, whose first call (compilation, autotuning) is timed into record[key] (CUDA only)."""

    def wrapped():
        if key in record or device.type != "cuda":
            return fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        record[key] = (time.perf_counter() - start) * 1e3
        return result

    return wrapped


def model_workload(network: Network, dtype: torch.dtype, layout: str, pass_: str, reference: str,
                   device: torch.device, info: dict | None = None) -> Workload:
    """The reference network and its optimized twin, closed over one input batch (and labels for training)."""
    from fastseg.convert import optimize

    _release(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if reference == COMPILED:
        # Each case compiles a fresh model: drop the earlier cases' compiled code (memory, and dynamo's limit on
        # recompilations of one forward, past which it would silently run eager).
        torch._dynamo.reset()
    info = {} if info is None else info
    info.clear()
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = network.build().to(device)
    x = torch.randn(network.batch, network.in_channels, network.height, network.width, device=device)
    randomize_batchnorm(model)
    training = pass_ == TRAIN_STEP
    half = dtype in (torch.float16, torch.bfloat16)
    if training:
        # Mixed precision for half types: float32 weights, autocast; float32 / float64 weights otherwise.
        model = model.to(dtype=torch.float32 if half else dtype, memory_format=memory_format)
        x = x.to(dtype=torch.float32 if half else dtype)
        model.train()
        _dropout_off(model)
    else:
        model = model.to(dtype=dtype, memory_format=memory_format).eval()
        x = x.to(dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    twin, report = optimize(model, report=True)
    info["summary"] = conversion_summary(twin, report)
    info["auto_problems_before"] = set(conv_ops.auto_choices())  # the twin's first call times its convolutions
    first_calls: dict[str, float] = {}
    info["first_call_ms"] = first_calls
    run_reference = torch.compile(model) if reference == COMPILED else model

    def _first_call_of(fn, name):  # torch.compile's first call compiles: timed, in the notes
        return _timed_first_call(fn, device, first_calls, name) if reference == COMPILED else fn

    if not training:
        def infer(net):
            def run():
                with torch.no_grad():
                    return _scores(net(x))
            return run

        return Workload(
            reference=_first_call_of(infer(run_reference), reference),
            fastseg=_timed_first_call(infer(twin), device, first_calls, "fastseg"),
            fastseg_bytes=_min_bytes(model, x, network),
            check=functools.partial(check_outputs, dtype=dtype),
        )

    target = torch.randint(0, network.num_classes, (network.batch, network.height, network.width), device=device)
    loss_scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    autocast_dtype = dtype if half else None

    def step(net, params):
        def run():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(_scores(net(x)).float(), target)
            grads = torch.autograd.grad(loss * loss_scale, params)
            return loss.detach(), grads
        return run

    reference_params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    return Workload(
        reference=_first_call_of(step(run_reference, reference_params), reference),
        fastseg=_timed_first_call(step(twin, twin_params), device, first_calls, "fastseg"),
        fastseg_bytes=3 * _min_bytes(model, x, network),
        check=functools.partial(check_training_step, dtype=dtype),
    )


def _min_bytes(model: nn.Module, x: torch.Tensor, network: Network) -> int:
    """The floor of one inference's traffic: the input read, the weights read, the scores written."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    scores = network.batch * network.num_classes * network.height * network.width * x.element_size()
    return x.numel() * x.element_size() + weights + scores


def check_outputs(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> str:
    """The twin's scores against the reference's: a note with max |diff|, relative RMS difference and argmax
    agreement; AssertionError when the relative RMS difference exceeds TOLERANCE[dtype] or only one is finite."""
    if actual.shape != expected.shape:
        raise AssertionError(f"scores of shape {tuple(actual.shape)} where {tuple(expected.shape)} expected")
    e, a = expected.detach().double(), actual.detach().double()
    finite_e, finite_a = bool(torch.isfinite(e).all()), bool(torch.isfinite(a).all())
    if not (finite_e and finite_a):
        if finite_e != finite_a:
            raise AssertionError(f"non-finite scores from {'fastseg' if finite_e else 'the reference'} only")
        return "non-finite scores on both sides (overflow in this dtype): no comparison"
    max_abs = float((a - e).abs().max())
    rel_rms = float((a - e).norm() / e.norm().clamp_min(1e-300))
    agreement = float((a.argmax(1) == e.argmax(1)).double().mean())
    note = f"max abs diff {max_abs:.2e}, rel RMS diff {rel_rms:.1e}, argmax agreement {agreement * 100:.2f}%"
    if not rel_rms <= TOLERANCE[dtype]:
        raise AssertionError(f"{note} (rel RMS > {TOLERANCE[dtype]})")
    return note


def check_training_step(expected, actual, dtype: torch.dtype) -> str:
    """Loss and gradients of the twin's training step against the reference's (relative norms of the
    difference over all parameters together)."""
    (loss_e, grads_e), (loss_a, grads_a) = expected, actual
    if len(grads_e) != len(grads_a):
        raise AssertionError(f"{len(grads_a)} gradients where {len(grads_e)} expected")
    loss_diff = abs(float(loss_a) - float(loss_e))
    diff_sq = ref_sq = 0.0
    finite_e = finite_a = True
    max_abs = 0.0
    for e, a in zip(grads_e, grads_a):
        if e.shape != a.shape:
            raise AssertionError(f"gradient of shape {tuple(a.shape)} where {tuple(e.shape)} expected")
        e, a = e.detach().double(), a.detach().double()
        finite_e &= bool(torch.isfinite(e).all())
        finite_a &= bool(torch.isfinite(a).all())
        if finite_e and finite_a:
            diff = a - e
            diff_sq += float((diff * diff).sum())
            ref_sq += float((e * e).sum())
            max_abs = max(max_abs, float(diff.abs().max())) if diff.numel() else max_abs
    if not (finite_e and finite_a):
        if finite_e != finite_a:
            raise AssertionError(f"non-finite gradients from {'fastseg' if finite_e else 'the reference'} only")
        return "non-finite gradients on both sides (overflow in this dtype): no comparison"
    rel = (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-300)
    note = (f"loss {float(loss_e):.4f}, |dloss| {loss_diff:.1e}, gradients: max abs diff {max_abs:.2e}, "
            f"rel RMS diff {rel:.1e}")
    tolerance = TOLERANCE[dtype]
    if not (rel <= tolerance and loss_diff <= tolerance * max(abs(float(loss_e)), 1.0)):
        raise AssertionError(f"{note} (tolerance {tolerance})")
    return note


# ------------------------------------------------------------------------------------------- CRF pipeline


def photographs(batch: int, size: int) -> np.ndarray:
    """[batch, size, size, 3] uint8: the CRF benchmark's photograph and its flips."""
    from fastseg.bench.crf import sample_image

    image = sample_image(size)
    variants = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    return np.ascontiguousarray(np.stack([variants[i % 4] for i in range(batch)]))


def crf_pipeline_workload(network: Network, size: int, device: torch.device, info: dict | None = None) -> Workload:
    """Eager DeepLab + pydensecrf (per image, on the CPU) against optimized DeepLab + fastseg.nn.DenseCRF."""
    import pydensecrf.densecrf as dcrf

    from fastseg.convert import optimize
    from fastseg.nn import DenseCRF

    _release(device)
    info = {} if info is None else info
    info.clear()
    images = photographs(network.batch, size)
    image_t = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device)  # 0..255, the CRF's colours
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    x = ((image_t - mean) / std).contiguous()
    model = network.build().to(device)
    with torch.no_grad():
        # The paper's scorer initialisation (std 0.01) leaves random scores of std 0.01, marginals near uniform;
        # scaled, the scores have a trained network's spread (std about 2) and the CRF has decisions to make.
        model.fc8.weight.mul_(FC8_SCALE)
    model.eval()
    twin, report = optimize(model, report=True)
    twin.crf = DenseCRF(iterations=CRF_ITERATIONS, gaussian_sxy=CRF_GAUSSIAN_SXY, gaussian_weight=CRF_GAUSSIAN_W,
                        bilateral_sxy=CRF_BILATERAL_SXY, bilateral_srgb=CRF_BILATERAL_SRGB,
                        bilateral_weight=CRF_BILATERAL_W).to(device)
    info["summary"] = conversion_summary(twin, report)
    first_calls: dict[str, float] = {}
    info["first_call_ms"] = first_calls
    labels = network.num_classes

    def reference() -> np.ndarray:
        with torch.no_grad():
            probabilities = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        q = []
        for image, p in zip(images, probabilities):
            crf = dcrf.DenseCRF2D(size, size, labels)
            crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(p, 1e-8, 1.0)).reshape(labels, -1),
                                                    dtype=np.float32))
            crf.addPairwiseGaussian(sxy=CRF_GAUSSIAN_SXY, compat=CRF_GAUSSIAN_W)
            crf.addPairwiseBilateral(sxy=CRF_BILATERAL_SXY, srgb=CRF_BILATERAL_SRGB, rgbim=image,
                                     compat=CRF_BILATERAL_W)
            q.append(np.array(crf.inference(CRF_ITERATIONS)))
        return np.stack(q)

    def fastseg_pipeline() -> torch.Tensor:
        with torch.no_grad():
            return twin(x, image=image_t)  # log Q

    return Workload(
        reference=reference,
        reference_wall_clock=True,  # pydensecrf on the CPU after the scores' copy: seconds a call
        fastseg=_timed_first_call(fastseg_pipeline, device, first_calls, "fastseg"),
        fastseg_bytes=x.numel() * 4 * 2 + network.batch * labels * size * size * 4,
        check=check_crf_pipeline,
    )


def check_crf_pipeline(expected: np.ndarray, actual: torch.Tensor) -> str:
    q = actual.detach().float().exp().cpu().double().numpy().reshape(expected.shape)
    agreement = float((q.argmax(1) == expected.argmax(1)).mean())
    mean_dq = float(np.abs(q - expected).mean())
    note = f"vs pydensecrf: argmax agreement {agreement * 100:.2f}%, mean |dQ| {mean_dq:.1e}"
    if agreement < CRF_AGREEMENT or mean_dq >= CRF_MEAN_ABS_DQ:
        raise AssertionError(note)
    return note
