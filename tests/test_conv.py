"""fastseg.fused_conv2d, FusedConv2d and ConvBNAct against F.conv2d + affine + ReLU, on every backend.

Layers tested:
- the public function under "reference" and "triton" (Triton's interpreter on CPU): odd spatial sizes,
  channel counts that are not multiples of the block sizes, dilation 1/2/6/12, stride 1/2, padding 0 / int /
  "same" (also the asymmetric "same" of even kernels), 1x1/3x3/5x5/7x7 and non-square kernels, depthwise,
  each epilogue part on and off, NCHW and channels_last, float32 and float16; errors;
- the kernels directly, into NaN-poisoned outputs (also strided ones), with every autotune configuration;
- autograd: gradcheck of the reference path in float64 (through the registered op's backward); every input's
  gradient on "reference" and "triton" (the Triton backward kernels) against float64 autograd over a matrix of
  odd sizes, channel counts beyond one block, dilation 1/2/3, stride 1/2/3 (phases no tap reaches), padding 0 /
  int / "same", 1x1/3x3/5x5 and non-square kernels, each epilogue part, NCHW and channels_last, float32 and
  float16; that the backward runs on the forward's backend; the backward kernels directly, into NaN-poisoned
  (also strided) gradients, split-K (deterministic), every autotune configuration;
- the registered ops, the backward kernels' too (torch.library.opcheck, torch.compile fullgraph with aot_eager);
- the modules: state_dict compatibility, eval-mode BatchNorm folding, training-mode batch and running
  statistics identical to nn.BatchNorm2d's;
- on CUDA (marker gpu): bfloat16, float16 channels_last at network sizes, every autotune configuration, TF32;
  the Triton backward against torch's (cuDNN) backward at network sizes, every backward configuration.

Inputs are random and fresh each run; a failing test prints its seed (see conftest.py).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg
from conftest import DispatchedOps, channels_far_apart, poison_, poisoned, skip_unless_backend
from fastseg import _backend
from fastseg.ops.conv import reference_fused_conv2d

CONV_BACKENDS = ("reference", "triton", "aten")
LAYOUTS = ("nchw", "channels_last")


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _expected(x, w, bias, scale, shift, residual, stride, padding, dilation, groups, activation):
    """The specification: F.conv2d + affine + residual + ReLU, in float64."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.conv2d(d(x), d(w), d(bias), stride, padding, dilation, groups)
    if scale is not None:
        y = y * d(scale).view(1, -1, 1, 1)
    if shift is not None:
        y = y + d(shift).view(1, -1, 1, 1)
    if residual is not None:
        y = y + d(residual)
    return torch.relu(y) if activation == "relu" else y


HALF_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _tolerance(dtype, reduction, expected):
    """float32: accumulation-order differences, growing with the reduction length. float16 / bfloat16: the
    specification runs on the same half-precision inputs, and the kernels accumulate in float32 and round once
    (cuDNN's folded weights round once more), so the error is a few roundings of the result's own magnitude,
    whatever the reduction length: 2 eps of the largest expected value (a kernel that drops one input channel
    of 512, or a gradient 20% off, fails it)."""
    if dtype in HALF_EPS:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return dict(rtol=2 * HALF_EPS[dtype], atol=2 * HALF_EPS[dtype] * scale)
    return dict(rtol=1e-5, atol=1e-5 * reduction**0.5)


def _assert_close(got, expected, dtype, reduction, what="output"):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert not got.isnan().any(), f"{what}: NaN in the output (an element was not written)"
    torch.testing.assert_close(got.double(), expected.double(), **_tolerance(dtype, reduction, expected),
                               msg=lambda m: f"{what}: {m}")


EPILOGUES = {
    "none": dict(),
    "bias": dict(bias=True),
    "bn_relu": dict(scale=True, shift=True, activation="relu"),
    "all": dict(bias=True, scale=True, shift=True, residual=True, activation="relu"),
    "scale_residual": dict(scale=True, residual=True),
    "shift_relu": dict(shift=True, activation="relu"),
    "relu": dict(activation="relu"),
}

# (N, C, H, W), K, kernel, stride, padding, dilation, groups
CASES = [
    ((2, 5, 9, 11), 7, 3, 1, "same", 2, 1),
    ((1, 3, 13, 13), 20, 5, 2, 0, 1, 1),          # K beyond one 16-wide block, not a multiple of it
    ((1, 17, 13, 11), 5, 3, 1, "same", 6, 1),     # C beyond one 16-wide block
    ((1, 4, 13, 13), 6, 3, 1, 12, 12, 1),         # dilation 12: most taps in the padding
    ((2, 3, 11, 9), 4, 7, 2, 3, 1, 1),            # ResNet stem 7x7 / 2
    ((1, 6, 9, 7), 6, 1, 1, 0, 1, 1),             # 1x1
    ((1, 5, 10, 12), 9, 1, 2, 0, 1, 1),           # 1x1 stride 2
    ((2, 6, 9, 9), 6, 3, 1, "same", 2, 6),        # depthwise
    ((1, 4, 11, 9), 8, 5, 2, 2, 1, 4),            # depthwise, channel multiplier 2, stride 2
    ((1, 3, 10, 8), 5, (3, 5), (1, 2), (1, 2), (2, 1), 1),   # non-square everything
    ((1, 3, 8, 9), 4, (4, 2), 1, "same", (1, 3), 1),          # even kernel: asymmetric "same"
    ((1, 2, 13, 13), 3, 3, 2, 6, 6, 1),           # dilation 6 with stride 2
]
EPILOGUE_NAMES = list(EPILOGUES)


def _case_ids(case):
    shape, k, ks, s, p, d, g = case
    return f"{'x'.join(map(str, shape))}-k{k}-ks{ks}-s{s}-p{p}-d{d}-g{g}".replace(" ", "")


def _make(case, dtype, layout, epilogue, device="cpu"):
    shape, K, ks, s, p, d, g = case
    ks = (ks, ks) if isinstance(ks, int) else ks
    x = _layout(torch.randn(shape, dtype=dtype, device=device), layout)
    w = torch.randn((K, shape[1] // g, *ks), dtype=dtype, device=device) / (shape[1] // g * ks[0] * ks[1]) ** 0.5
    e = EPILOGUES[epilogue]
    bias = torch.randn(K, dtype=dtype, device=device) if e.get("bias") else None
    scale = torch.rand(K, dtype=dtype, device=device) + 0.5 if e.get("scale") else None
    shift = torch.randn(K, dtype=dtype, device=device) if e.get("shift") else None
    out_shape = F.conv2d(torch.empty(shape, device="meta"), torch.empty((K, shape[1] // g, *ks), device="meta"),
                         None, s, p, d, g).shape
    residual = _layout(torch.randn(out_shape, dtype=dtype, device=device), layout) if e.get("residual") else None
    kwargs = dict(scale=scale, shift=shift, residual=residual, activation=e.get("activation"))
    return x, w, bias, kwargs, (s, p, d, g), shape[1] // g * ks[0] * ks[1]


def _run_case(backend, case, dtype, layout, epilogue, monkeypatch):
    """The op on one backend against the specification; under "triton" the Triton kernels must have run, under
    "aten" torch's convolution with the affine folded (CPU half types: the reference), since the reference would
    pass the comparison too."""
    skip_unless_backend(backend)
    from fastseg.ops import conv as conv_ops, conv_kernels

    launches, folded = [], []
    forward, fold = conv_kernels.forward, conv_ops.folded_conv2d
    monkeypatch.setattr(conv_kernels, "forward", lambda *args, **kw: launches.append(1) or forward(*args, **kw))
    monkeypatch.setattr(conv_ops, "folded_conv2d", lambda *args, **kw: folded.append(1) or fold(*args, **kw))
    x, w, bias, kw, (s, p, d, g), reduction = _make(case, dtype, layout, epilogue)
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw)
    assert len(launches) == (1 if backend == "triton" else 0), f"{len(launches)} Triton launches under {backend!r}"
    aten = backend == "aten" and dtype in (torch.float32, torch.float64)
    assert len(folded) == aten, f"{len(folded)} folded convolutions under {backend!r} in {dtype}"
    expected = _expected(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s, p, d, g, kw["activation"])
    _assert_close(got, expected, dtype, reduction)
    torch_out = F.conv2d(x.float(), w.float(), None, s, p, d, g)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last) == torch_out.is_contiguous(
            memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.fixture(autouse=True)
def _true_float32():
    # The CPU reference (F.conv2d) is true float32; keep the kernels there too (the GPU tests set TF32 apart).
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------------------------------------------
# forward: the matrix
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_ids(c) for c in CASES])
def test_forward_float32(backend, layout, index, monkeypatch):
    # Each geometry gets a different epilogue per layout, so every epilogue meets several geometries.
    epilogue = EPILOGUE_NAMES[(2 * index + LAYOUTS.index(layout)) % len(EPILOGUE_NAMES)]
    _run_case(backend, CASES[index], torch.float32, layout, epilogue, monkeypatch)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_ids(c) for c in CASES])
def test_forward_float16(backend, index, monkeypatch):
    layout = LAYOUTS[index % 2]
    epilogue = EPILOGUE_NAMES[(index + 3) % len(EPILOGUE_NAMES)]
    _run_case(backend, CASES[index], torch.float16, layout, epilogue, monkeypatch)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_non_contiguous_input_weight_and_residual(backend):
    """Views with gaps (every other column of x and of the residual, a transposed weight) are read through
    their strides."""
    skip_unless_backend(backend)
    x = torch.randn(2, 5, 9, 15)[..., ::2]
    w = torch.randn(3, 3, 5, 6).permute(3, 2, 0, 1)  # (6, 5, 3, 3), non-contiguous
    residual = torch.randn(2, 6, 9, 17)[..., 1::2]
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    assert not (x.is_contiguous() or w.is_contiguous() or residual.is_contiguous())
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x, w, None, 1, "same", 2, scale=scale, shift=shift, residual=residual,
                                   activation="relu")
    expected = _expected(x, w, None, scale, shift, residual, 1, "same", 2, 1, "relu")
    _assert_close(got, expected, torch.float32, 45)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("epilogue", EPILOGUE_NAMES)
def test_each_epilogue_part(backend, epilogue, monkeypatch):
    _run_case(backend, ((2, 5, 7, 9), 6, 3, 1, 1, 1, 1), torch.float32, "nchw", epilogue, monkeypatch)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_unbatched_mixed_layouts_and_float32_affine(backend):
    skip_unless_backend(backend)
    x = torch.randn(3, 9, 8, dtype=torch.float16)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)  # float32 affine on a float16 conv (a folded BatchNorm)
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x, w, padding="same", scale=scale, shift=shift, activation="relu")
    expected = _expected(x[None], w, None, scale, shift, None, 1, "same", 1, 1, "relu")[0]
    _assert_close(got, expected, torch.float16, 27)
    # channels_last input with an NCHW residual: strides are followed, the output is channels_last
    x4 = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    w4 = torch.randn(6, 4, 1, 1)
    residual = torch.randn(2, 6, 7, 7)
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x4, w4, residual=residual)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, _expected(x4, w4, None, None, None, residual, 1, 0, 1, 1, None), torch.float32, 4)


def test_meta_tensors():
    """Shapes only (a model built on the meta device): the fake implementation, no autocast query."""
    x, w = torch.empty(2, 3, 9, 7, device="meta"), torch.empty(5, 3, 3, 3, device="meta")
    out = fastseg.fused_conv2d(x, w, padding=1, stride=2, activation="relu")
    assert out.device.type == "meta" and out.shape == F.conv2d(x, w, padding=1, stride=2).shape


def test_auto_dispatch():
    assert _backend.registered_ops()["fused_conv2d"] == frozenset({"triton", "aten", "reference"})
    assert _backend.select("fused_conv2d", torch.device("cpu")) == "aten"
    if torch.cuda.is_available():
        assert _backend.select("fused_conv2d", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("epilogue_pass", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_ids(c) for c in CASES])
def test_folded_cudnn_path_matches_the_specification(dtype, layout, index, epilogue_pass, monkeypatch):
    """"auto"'s cuDNN candidate and the "aten" implementation (the affine folded into weights and bias), through
    F.conv2d on the CPU: every case, every epilogue in turn, its bias, residual and ReLU in one Triton pass (as on
    CUDA) or in the convolution and torch's in-place ops (as on the CPU; the fused cudnn_convolution_(add_)relu
    candidate is CUDA-only: GPU tests)."""
    from fastseg.ops import conv as conv_ops

    x, w, bias, kw, (s, p, d, g), reduction = _make(CASES[index], dtype, layout, EPILOGUE_NAMES[index % 7])
    s2, d2 = conv_ops._pair(s, "stride"), conv_ops._pair(d, "dilation")
    padding4 = conv_ops._resolve_padding(p, tuple(w.shape[2:]), s2, d2)
    launches = []
    if epilogue_pass == "triton":
        skip_unless_backend("triton")
        from fastseg.ops import conv_kernels

        pass_ = conv_kernels.bias_residual_relu_
        monkeypatch.setattr(conv_kernels, "bias_residual_relu_", lambda *a: launches.append(1) or pass_(*a))
    got = conv_ops.folded_conv2d(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s2, padding4, d2, g,
                                 kw["activation"], triton_epilogue=epilogue_pass == "triton")
    expected = _expected(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s, p, d, g, kw["activation"])
    _assert_close(got, expected, dtype, reduction)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" and x.shape[1] > 1)
    has_epilogue = bias is not None or any(kw[k] is not None for k in ("scale", "shift", "residual", "activation"))
    one_pass = has_epilogue and got.is_contiguous(memory_format=torch.channels_last)  # NCHW: torch's passes
    assert len(launches) == (epilogue_pass == "triton" and one_pass)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parts", ["bias", "residual", "relu", "all"])
@pytest.mark.parametrize("residual_layout", LAYOUTS)
@pytest.mark.parametrize("y_layout", ["nchw", "channels_last", "strided"])
def test_bias_residual_relu_pass_in_place(y_layout, residual_layout, parts, dtype):
    """The epilogue kernel over a finished convolution output, in place, at any strides (folded_conv2d gives it
    channels_last outputs; the kernel takes any): more pixels and channels than one 64x64 tile; a strided
    output's gaps (poisoned) stay untouched."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_kernels

    shape = (2, 70, 5, 9)
    y = poisoned(shape, dtype, layout=y_layout)
    values = torch.randn(shape, dtype=dtype)
    y.copy_(values)
    bias = torch.randn(shape[1], dtype=dtype) if parts in ("bias", "all") else None
    residual = _layout(torch.randn(shape, dtype=dtype), residual_layout) if parts in ("residual", "all") else None
    relu = parts in ("relu", "all")
    conv_kernels.bias_residual_relu_(y, bias, residual, relu)
    expected = values.float()  # the kernel's arithmetic: float32, in this order, rounded once to dtype
    if bias is not None:
        expected = expected + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        expected = expected + residual.float()
    if relu:
        expected = torch.relu(expected)
    torch.testing.assert_close(y, expected.to(dtype), rtol=0, atol=0)
    if y_layout == "strided":
        assert y._base[..., 0::2].isnan().all(), "the pass wrote outside its output"


def test_cudnn_fusion_refuses_what_it_cannot_fuse():
    from fastseg.ops import conv as conv_ops

    x, w = torch.randn(1, 4, 9, 9), torch.randn(6, 4, 3, 3)
    for activation in ("relu", None):  # CPU tensors, or no ReLU: cuDNN has no such fusion
        with pytest.raises(ValueError, match="cuDNN's fusion needs CUDA tensors and an epilogue ending in a ReLU"):
            conv_ops.folded_conv2d(x, w, None, None, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, activation,
                                   cudnn_fusion=True)


def test_auto_keeps_the_fastest_implementation_per_problem(monkeypatch):
    """The selection itself, with the timing replaced: the fastest candidate wins, once per problem; cuDNN's ReLU
    fusion is a candidate only when the epilogue ends in a ReLU; a candidate that raises drops out with a warning;
    with all failing, the Triton error propagates."""
    from fastseg.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_auto_choices", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timings = {"triton": 2.0, "cudnn": 1.0, "cudnn_fused": 1.5}
    calls = []

    def fake_mean_ms(run):
        run()  # records which candidate it is
        if isinstance(timings[calls[-1]], Exception):
            raise timings[calls[-1]]
        return timings[calls[-1]]

    def fake_folded(*args, cudnn_fusion=False):
        calls.append("cudnn_fused" if cudnn_fusion else "cudnn")

    monkeypatch.setattr(conv_ops, "_forward_into", lambda *args: calls.append("triton"))
    monkeypatch.setattr(conv_ops, "folded_conv2d", fake_folded)
    monkeypatch.setattr(conv_ops, "_mean_ms", fake_mean_ms)
    x, w = torch.randn(1, 4, 9, 9), torch.randn(6, 4, 3, 3)
    args = (x, w, None, None, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, "relu")
    assert conv_ops._auto_impl(*args) == "cudnn" and sorted(calls) == ["cudnn", "cudnn_fused", "triton"]
    timings["cudnn"] = 3.0
    assert conv_ops._auto_impl(*args) == "cudnn" and len(calls) == 3  # cached: not timed again
    other = (x, w, None, None, None, None, (1, 1), [2, 2, 2, 2], (2, 2), 1, "relu")
    assert conv_ops._auto_impl(*other) == "cudnn_fused" and len(calls) == 6  # another problem: timed
    timings["cudnn_fused"] = 4.0
    third = (x, w, None, None, None, None, (1, 1), [3, 3, 3, 3], (3, 3), 1, "relu")
    assert conv_ops._auto_impl(*third) == "triton" and len(calls) == 9
    assert set(conv_ops.auto_choices().values()) == {"cudnn", "cudnn_fused", "triton"}
    assert list(conv_ops.auto_timings().values()) == [{"triton": 2.0, "cudnn": 1.0, "cudnn_fused": 1.5},
                                                      {"triton": 2.0, "cudnn": 3.0, "cudnn_fused": 1.5},
                                                      {"triton": 2.0, "cudnn": 3.0, "cudnn_fused": 4.0}]
    assert conv_ops.auto_timings().keys() == conv_ops.auto_choices().keys()
    no_relu = (x, w, None, None, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, None)
    assert conv_ops._auto_impl(*no_relu) == "triton" and calls[9:] == ["triton", "cudnn"]  # no fusion to time
    class CompilationError(Exception):  # as Triton's: not a RuntimeError
        pass

    timings["triton"] = CompilationError("no kernel for this")
    timings["cudnn"] = 1.0
    with pytest.warns(RuntimeWarning, match="triton implementation failed.*no kernel for this"):
        assert conv_ops._auto_impl(x, w, None, None, None, None, (1, 1), [0, 0, 0, 0], (1, 1), 1, None) == "cudnn"
    assert list(conv_ops.auto_timings().values())[-1] == {"cudnn": 1.0}  # what failed has no time
    timings["cudnn"] = timings["cudnn_fused"] = RuntimeError("cudnn too")
    with pytest.raises(CompilationError, match="no kernel for this"):
        conv_ops._auto_impl(x, w, None, None, None, None, (2, 2), [0, 0, 0, 0], (1, 1), 1, "relu")


# --------------------------------------------------------------------------------------------------------------
# the kernels directly: poisoned outputs, every configuration
# --------------------------------------------------------------------------------------------------------------
def _direct(x, w, bias, scale, shift, residual, out, s, p, d, g, relu, config=None):
    from fastseg.ops import conv_kernels

    conv_kernels.forward(x, w, bias, scale, shift, residual, out, (s, s), (p, p), (d, d), g, relu, False, config)
    return out


@pytest.mark.parametrize("out_layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("groups", [1, 6])
def test_kernel_writes_every_output(out_layout, groups):
    skip_unless_backend("triton")
    x = torch.randn(2, 6, 9, 7)
    w = torch.randn(6, 6 // groups, 3, 3)
    bias, scale, shift = torch.randn(6), torch.rand(6) + 0.5, torch.randn(6)
    residual = torch.randn(2, 6, 9, 7)
    shape = (2, 6, 9, 7)
    if out_layout == "strided":
        base = poison_(torch.empty(2, 6, 9, 15))
        out = base[..., 1::2]
    else:
        out = poison_(_layout(torch.empty(shape), out_layout))
    _direct(x, w, bias, scale, shift, residual, out, 1, 2, 2, groups, True)
    expected = _expected(x, w, bias, scale, shift, residual, 1, 2, 2, groups, "relu")
    _assert_close(out, expected, torch.float32, 54)
    if out_layout == "strided":
        assert base[..., 0::2].isnan().all(), "the kernel wrote outside its output view"


def test_every_autotune_config_interpreted():
    skip_unless_backend("triton")
    from fastseg.ops import conv_kernels

    x = torch.randn(1, 19, 5, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(21, 19, 3, 3) / 13
    bias = torch.randn(21)
    expected = _expected(x, w, bias, None, None, None, 1, 1, 1, 1, "relu")
    for config in conv_kernels.CONFIGS:
        out = poison_(torch.empty(1, 21, 5, 7))
        _direct(x, w, bias, None, None, None, out, 1, 1, 1, 1, True, conv_kernels.config_kwargs(config))
        _assert_close(out, expected, torch.float32, 171, what=f"config {config}")


def test_split_k_heuristic(monkeypatch):
    """Split-K where the output tiles would leave SMs idle and the reduction is long enough to share: DeepLab-v3's
    33x33 ASPP branch at batch 8 on an H100 (138 tiles, 132 SMs) takes 3 ranges of 96 steps of 64 channels; the
    65x65 branch (530 tiles), a short reduction, and CPU tensors take none."""
    from fastseg.ops import conv_kernels

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))

    def split(n, c, size, k, kernel, out_size, cuda=True):
        meta = lambda *shape: SimpleNamespace(shape=shape, is_cuda=cuda, device="cuda")  # noqa: E731
        weight = meta(k, c, kernel, kernel)
        return conv_kernels.split_ranges(weight, conv_kernels.reduction_split(
            meta(n, c, size, size), weight, meta(n, k, out_size, out_size)))

    assert split(8, 2048, 33, 256, 3, 33) == (3, 96 * 64)
    assert split(8, 2048, 65, 256, 3, 65)[0] == 1
    assert split(8, 64, 33, 256, 3, 33)[0] == 1  # 9 steps: too short to share
    assert split(4, 1024, 30, 1024, 3, 28) == (2, 72 * 64)  # U-Net's 1024-channel layer
    assert split(8, 2048, 33, 256, 3, 33, cuda=False)[0] == 1
    # an explicit split: whole steps, no empty range (10 asked of 9 steps: 9; 4 of 9: 3 ranges of 3 steps)
    assert conv_kernels.split_ranges(SimpleNamespace(shape=(6, 64, 3, 3)), 10) == (9, 64)
    assert conv_kernels.split_ranges(SimpleNamespace(shape=(6, 64, 3, 3)), 4) == (3, 3 * 64)


def test_autotune_pruning_keeps_the_tiles_that_fit():
    """Autotuning times only configurations whose tile does not exceed the problem (output channels K, output
    pixels M, each rounded up to a power of two), and always at least one."""
    from fastseg.ops import conv_kernels

    def pruned(K, M, configs=conv_kernels.CONFIGS):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                for c in conv_kernels.prune_configs(configs, dict(K=K, N=2, OH=M // 2, OW=1))]

    assert len(pruned(256, 8 * 33 * 33)) == len(conv_kernels.CONFIGS)  # an ASPP branch: every configuration
    assert sorted(pruned(64, 8 * 512 * 512)) == [(64, 64), (128, 32), (128, 64), (256, 64)]
    assert pruned(21, 2 * 65 * 65) == [(128, 32)]  # a classifier: the narrowest tile
    assert all(m <= 64 for m, _ in pruned(512, 40))
    assert pruned(16, 10, conv_kernels.CONFIGS[:1]) == [(128, 128)]  # nothing fits: the narrowest given


def test_loop_order_heuristic():
    """The forward's implicit GEMM walks taps outside channel blocks for 1x1 convolutions and from 512 input
    channels."""
    from fastseg.ops.conv_kernels import taps_outer

    assert taps_outer(2048, 9) and taps_outer(512, 9) and taps_outer(64, 1) and taps_outer(3, 1)
    assert not taps_outer(256, 9) and not taps_outer(64, 9) and not taps_outer(3, 49)
    assert taps_outer(3, 49, "taps_outer") and not taps_outer(2048, 9, "flat")
    with pytest.raises(ValueError, match="loop_order"):
        taps_outer(64, 9, "taps")


@pytest.mark.parametrize("channels", [45, 48])
@pytest.mark.parametrize("split", [1, 2, 4, 7])
def test_loop_orders_interpreted(split, channels):
    """Both loop structures of the implicit GEMM, unsplit and split-K, into poisoned outputs: the same result as
    the specification and, within float32 reassociation, as each other. Under the interpreter (BLOCK_K 16) a
    split range is a multiple of 4 channel blocks (whole 64-channel steps) and a tap has 3 (45 channels, the last
    block partial; 48, all full: loads without a channel mask, EVEN_C), so ranges start and end inside taps; 7
    ranges of 9 steps leave some empty."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_kernels

    x = torch.randn(2, channels, 6, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(18, channels, 3, 3) / 20
    bias, scale, shift, residual = torch.randn(18), torch.rand(18) + 0.5, torch.randn(18), torch.randn(2, 18, 6, 5)
    expected = _expected(x, w, bias, scale, shift, residual, 1, 2, 2, 1, "relu")
    results = {}
    for loop_order in ("flat", "taps_outer"):
        out = poison_(torch.empty(2, 18, 6, 5))
        conv_kernels.forward(x, w, bias, scale, shift, residual, out, (1, 1), (2, 2), (2, 2), 1, True, False,
                             split=split, loop_order=loop_order)
        _assert_close(out, expected, torch.float32, 405, what=f"{loop_order}, split {split}")
        results[loop_order] = out
    torch.testing.assert_close(results["flat"], results["taps_outer"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["flat", "taps_outer", "split", "depthwise"])
def test_channel_offsets_past_int32(case):
    """NCHW tensors whose channel offsets pass 2**31 (conftest.channels_far_apart): the forward (and its
    split-K epilogue, and the depthwise kernel) reads x and writes out there, the input gradient writes grad_x
    there and the weight gradient reads x there, each in 64-bit offsets. With 32-bit channel offsets, channel 2
    wraps to a negative offset."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels, conv_kernels

    dtype = torch.float16
    groups = 3 if case == "depthwise" else 1
    x = channels_far_apart((1, 3, 5, 4), dtype)
    x.copy_(torch.randn(x.shape))
    w = (torch.randn(3, 3 // groups, 3, 3) / 3).to(dtype)
    scale = torch.rand(3) + 0.5
    out = channels_far_apart((1, 3, 5, 4), dtype)
    loop_order = "taps_outer" if case == "taps_outer" else "flat"
    conv_kernels.forward(x, w, None, scale, None, None, out, (1, 1), (1, 1), (1, 1), groups, True, False,
                         split=2 if case == "split" else 1, loop_order=loop_order)
    _assert_close(out, _expected(x, w, None, scale, None, None, 1, 1, 1, groups, "relu"), dtype, 27)
    if groups != 1:
        return
    grad_out = torch.randn(out.shape, dtype=dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z = F.conv2d(x64, w64, None, 1, 1, 1) * scale.double().view(1, -1, 1, 1)
    exp_x, exp_w = torch.autograd.grad(z, (x64, w64), grad_out.double() * (out > 0))
    grad_x = channels_far_apart(x.shape, dtype)
    conv_backward_kernels.input_grad(grad_out, out, scale, w, grad_x, (1, 1), (1, 1), (1, 1), False)
    _assert_close(grad_x, exp_x, dtype, 27, what="grad x")
    grad_w = poisoned(w.shape, dtype)
    conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, (1, 1), (1, 1), (1, 1), False)
    _assert_close(grad_w, exp_w, dtype, 20, what="grad weight")


@pytest.mark.parametrize("channels, split", [(64, 2), (70, 3), (64, 9), (19, 9)])
@pytest.mark.parametrize("epilogue", ["none", "all"])
def test_split_k_interpreted(channels, split, epilogue):
    """Split-K: the reduction cut into `split` ranges of whole 64-channel steps (every range busy at 64 channels;
    a partial channel block at 70; under the interpreter's BLOCK_K of 16, 19 channels leave the last ranges
    empty), partial sums summed in order by the epilogue kernel, into a poisoned strided output; the same
    result as the unsplit kernel within float32 reassociation."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_kernels

    x = torch.randn(2, channels, 7, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(21, channels, 3, 3) / (3 * channels**0.5)
    bias, scale, shift = (None, None, None) if epilogue == "none" else (torch.randn(21), torch.rand(21) + .5,
                                                                       torch.randn(21))
    residual = None if epilogue == "none" else torch.randn(2, 21, 7, 6)
    relu = epilogue == "all"
    expected = _expected(x, w, bias, scale, shift, residual, 1, 2, 2, 1, "relu" if relu else None)
    base = poison_(torch.empty(2, 21, 7, 11))
    out = base[..., ::2]
    conv_kernels.forward(x, w, bias, scale, shift, residual, out, (1, 1), (2, 2), (2, 2), 1, relu, False,
                         split=split)
    _assert_close(out, expected, torch.float32, 171, what=f"split {split}")
    assert base[..., 1::2].isnan().all(), "the split epilogue wrote outside its output view"
    unsplit = poison_(torch.empty(2, 21, 7, 6))
    conv_kernels.forward(x, w, bias, scale, shift, residual, unsplit, (1, 1), (2, 2), (2, 2), 1, relu, False,
                         split=1)
    torch.testing.assert_close(out, unsplit, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------
# (N, C, H, W), K, kernel, stride, padding, dilation, groups
GRAD_CASES = [
    ((1, 3, 6, 5), 4, 3, 1, "same", 2, 1),
    ((2, 2, 5, 4), 3, (4, 2), 1, "same", (1, 2), 1),     # asymmetric "same"
    ((1, 4, 5, 5), 4, 3, 2, 1, 1, 4),                     # depthwise, stride 2 (torch's backward on every backend)
    ((1, 2, 9, 8), 3, 5, 2, 4, 2, 1),                     # 5x5, stride 2, dilation 2
    ((1, 17, 5, 7), 18, 1, 1, 0, 1, 1),                   # 1x1; C and K beyond one 16-wide block
    ((1, 5, 9, 11), 20, 3, 2, 1, 2, 1),                   # stride 2, dilation 2: even rows / columns get no taps
    ((1, 3, 11, 10), 5, 3, 2, 2, 3, 1),                   # stride 2, dilation 3: each phase its own taps
    ((1, 3, 12, 12), 4, 5, 2, 0, 1, 1),                   # 5x5 / 2, padding 0: the last row / column unread
    ((2, 3, 7, 9), 6, 3, 1, 0, 1, 1),                     # 3x3, padding 0
    ((1, 3, 9, 8), 4, 3, 1, "same", 3, 1),                # dilation 3
    ((1, 3, 13, 12), 4, 3, 3, 1, 2, 1),                   # stride 3, dilation 2
    ((1, 4, 10, 9), 5, (3, 1), (2, 1), (1, 0), 1, 1),     # non-square kernel and stride
    ((1, 2, 7, 7), 3, 1, 2, 0, 1, 1),                     # 1x1 stride 2: three quarters of x unread
]
GRAD_NAMES = ("x", "weight", "bias", "scale", "shift", "residual")


def _grad_reductions(x, w, out_shape):
    """How many products each gradient element sums (its tolerance grows with that)."""
    pixels = out_shape[0] * out_shape[2] * out_shape[3]
    return dict(x=w.shape[0] * w.shape[2] * w.shape[3], weight=pixels, bias=pixels, scale=pixels, shift=pixels,
                residual=1)


def _check_gradients(backend, case, dtype, layout, epilogue):
    """The op's gradients of every input against float64 autograd of the specification."""
    x, w, bias, kw, (s, p, d, g), _ = _make(case, dtype, layout, epilogue)
    inputs = dict(zip(GRAD_NAMES, (x, w, bias, kw["scale"], kw["shift"], kw["residual"])))
    inputs = {name: t.requires_grad_() for name, t in inputs.items() if t is not None}
    leaves = list(inputs.values())

    def parts(values):
        return [values.get(name) for name in GRAD_NAMES]

    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(*parts(inputs)[:3], s, p, d, g, scale=inputs.get("scale"),
                                   shift=inputs.get("shift"), residual=inputs.get("residual"),
                                   activation=kw["activation"])
    grad_out = torch.randn(got.shape, dtype=dtype)
    got_grads = dict(zip(inputs, torch.autograd.grad(got, leaves, grad_out)))
    # float64 gradients through the same ReLU mask (the op's output decides which side of 0)
    z = _expected(*parts(inputs), s, p, d, g, None)
    mask = got.detach() > 0 if kw["activation"] == "relu" else torch.ones((), dtype=torch.bool)
    expected = dict(zip(inputs, torch.autograd.grad(z, leaves, grad_out.double() * mask)))
    reductions = _grad_reductions(x, w, got.shape)
    for name, leaf in inputs.items():
        a, e = got_grads[name], expected[name]
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert not a.isnan().any(), f"grad {name}: NaN"
        torch.testing.assert_close(a.double(), e.double(), **_tolerance(dtype, reductions[name] * 4, e),
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    if layout == "channels_last" and g == 1 and backend == "triton":
        assert got_grads["x"].is_contiguous(memory_format=torch.channels_last), "grad x: x's memory format"


@pytest.mark.parametrize("index", range(4))
def test_gradcheck_reference_float64(index):
    """The op's backward (epilogue chain rule + torch's conv backward) against finite differences."""
    x, w, bias, kw, (s, p, d, g), _ = _make(GRAD_CASES[index], torch.float64, "nchw", "all")
    inputs = [t.requires_grad_() for t in (x, w, bias, kw["scale"], kw["shift"], kw["residual"])]

    def fn(x, w, bias, scale, shift, residual):
        return fastseg.fused_conv2d(x, w, bias, s, p, d, g, scale=scale, shift=shift, residual=residual,
                                    activation="relu")

    with fastseg.backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index", range(len(GRAD_CASES)), ids=[_case_ids(c) for c in GRAD_CASES])
def test_gradients_float32(backend, layout, index):
    # Each geometry gets a different epilogue per layout, so every epilogue meets several geometries.
    skip_unless_backend(backend)
    epilogue = EPILOGUE_NAMES[(2 * index + LAYOUTS.index(layout)) % len(EPILOGUE_NAMES)]
    _check_gradients(backend, GRAD_CASES[index], torch.float32, layout, epilogue)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("index", range(len(GRAD_CASES)), ids=[_case_ids(c) for c in GRAD_CASES])
def test_gradients_float16(backend, index):
    skip_unless_backend(backend)
    layout = LAYOUTS[index % 2]
    epilogue = "all" if index % 2 else EPILOGUE_NAMES[(index + 3) % len(EPILOGUE_NAMES)]
    _check_gradients(backend, GRAD_CASES[index], torch.float16, layout, epilogue)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("epilogue", EPILOGUE_NAMES)
def test_gradients_each_epilogue_part(backend, epilogue):
    skip_unless_backend(backend)
    _check_gradients(backend, ((2, 5, 7, 9), 6, 3, 2, 1, 2, 1), torch.float32, "nchw", epilogue)


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """Triton's backward kernels run when the forward ran under backend("triton") (even if backward() is called
    outside the block), not under "reference" or "auto", nor for depthwise convolutions."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels

    calls = []
    for name in ("input_grad", "weight_grad"):
        kernel = getattr(conv_backward_kernels, name)
        monkeypatch.setattr(conv_backward_kernels, name,
                            lambda *args, name=name, kernel=kernel, **kw: calls.append(name) or kernel(*args, **kw))

    def backward_calls(backend, groups):
        calls.clear()
        x = torch.randn(1, 4, 5, 5, requires_grad=True)
        w = torch.randn(4, 4 // groups, 3, 3, requires_grad=True)
        with fastseg.backend(backend):
            out = fastseg.fused_conv2d(x, w, padding=1, groups=groups, activation="relu")
        out.sum().backward()
        return sorted(calls)

    assert backward_calls("triton", 1) == ["input_grad", "weight_grad"]
    assert backward_calls("triton", 4) == []
    assert backward_calls("reference", 1) == []
    assert backward_calls("auto", 1) == []


# --------------------------------------------------------------------------------------------------------------
# the backward kernels directly: poisoned gradients, split-K, every configuration
# --------------------------------------------------------------------------------------------------------------
def _backward_problem(shape, K, ks, stride, padding, dilation, layout="nchw", dtype=torch.float32):
    """x, weight, grad_out, out (ReLU), scale, and the float64 gradients of x and weight."""
    x = _layout(torch.randn(shape, dtype=dtype), layout)
    w = torch.randn((K, shape[1], ks, ks), dtype=dtype) / (shape[1] * ks * ks) ** 0.5
    scale = torch.rand(K) + 0.5
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z = F.conv2d(x64, w64, None, stride, padding, dilation) * scale.double().view(1, -1, 1, 1)
    out = _layout(torch.relu(z).detach().to(dtype), layout)
    grad_out = _layout(torch.randn(z.shape, dtype=dtype), layout)
    grad_x, grad_w = torch.autograd.grad(z, (x64, w64), grad_out.double() * (out > 0))
    return x, w, grad_out, out, scale, grad_x, grad_w


@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last", "strided"])
def test_backward_kernels_write_every_element(grad_layout):
    """Into NaN-poisoned gradients: zeros too where no tap reaches (stride 2 with dilation 2 leaves every other
    input row and column out), nothing outside a strided view."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels

    layout = "channels_last" if grad_layout == "channels_last" else "nchw"
    x, w, grad_out, out, scale, exp_x, exp_w = _backward_problem((2, 5, 9, 8), 6, 3, 2, 1, 2, layout)
    geometry = ((2, 2), (1, 1), (2, 2), False)
    grad_x, base_x = _poisoned_view(x.shape, grad_layout)
    conv_backward_kernels.input_grad(grad_out, out, scale, w, grad_x, *geometry)
    _assert_close(grad_x, exp_x, torch.float32, 54, what="grad x")
    assert (grad_x[:, :, 0::2] == 0).all() and (grad_x[:, :, :, 0::2] == 0).all()
    grad_w, base_w = _poisoned_view(w.shape, grad_layout)
    conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, *geometry)
    _assert_close(grad_w, exp_w, torch.float32, 40, what="grad weight")
    if grad_layout == "strided":
        for base in (base_x, base_w):
            assert base[..., 0::2].isnan().all(), "a kernel wrote outside its output view"


def _poisoned_view(shape, layout):
    """A NaN-filled float32 tensor in the layout, and for "strided" the buffer it is every other element of."""
    if layout == "strided":
        base = poison_(torch.empty(*shape[:3], 2 * shape[3] + 1))
        return base[..., 1::2], base
    return poison_(_layout(torch.empty(shape), layout)), None


def test_weight_grad_split_is_deterministic():
    """Split-K over the pixels: every split count gives the same gradient, the same bits on every run."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels

    x, w, grad_out, out, scale, _, exp_w = _backward_problem((2, 3, 9, 7), 5, 3, 1, 1, 1, "channels_last")
    results = []
    for split in (1, 2, 3, 3):
        grad_w = poisoned(w.shape, w.dtype)
        conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, (1, 1), (1, 1), (1, 1), False,
                                          split=split)
        _assert_close(grad_w, exp_w, torch.float32, 126, what=f"split {split}")
        results.append(grad_w)
    assert torch.equal(results[2], results[3]), "split-K is not deterministic"


@pytest.mark.parametrize("shape", [(5, 3, 4, 3), (2, 3, 9, 40), (3, 2, 6, 6)], ids=["images", "columns", "rows"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_weight_grad_pixel_steps(shape, split):
    """The weight gradient advances its pixels' coordinates by adding a step of BLOCK_K pixels (32 under the
    interpreter): across whole images (12-pixel outputs: 2 images, 2 rows and 2 columns a step), within a row (40
    columns) and across rows (36-pixel images), from chunk starts inside an image (split-K); into poisoned
    gradients."""
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels

    x, w, grad_out, out, scale, _, exp_w = _backward_problem(shape, 4, 3, 1, 1, 1, "channels_last")
    grad_w = poisoned(w.shape, w.dtype)
    conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, (1, 1), (1, 1), (1, 1), False, split=split)
    _assert_close(grad_w, exp_w, torch.float32, shape[0] * shape[2] * shape[3], what=f"grad weight, split {split}")


def test_every_backward_config_interpreted():
    skip_unless_backend("triton")
    from fastseg.ops import conv_backward_kernels, conv_kernels

    x, w, grad_out, out, scale, exp_x, exp_w = _backward_problem((1, 19, 5, 7), 21, 3, 1, 2, 2, "channels_last")
    geometry = ((1, 1), (2, 2), (2, 2), False)
    for config in conv_backward_kernels.DGRAD_CONFIGS:
        grad_x = poisoned(x.shape, x.dtype)
        conv_backward_kernels.input_grad(grad_out, out, scale, w, grad_x, *geometry,
                                         config=conv_kernels.config_kwargs(config))
        _assert_close(grad_x, exp_x, torch.float32, 189, what=f"grad x, config {config}")
    for config in conv_backward_kernels.WGRAD_CONFIGS:
        grad_w = poisoned(w.shape, w.dtype)
        conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, *geometry,
                                          config=conv_kernels.config_kwargs(config))
        _assert_close(grad_w, exp_w, torch.float32, 35, what=f"grad weight, config {config}")


# --------------------------------------------------------------------------------------------------------------
# registered op: opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------------
def _op_args():
    x = torch.randn(1, 3, 5, 4, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b, sc, sh = (torch.randn(4, requires_grad=True) for _ in range(3))
    r = torch.randn(1, 4, 5, 4, requires_grad=True)
    xc = torch.randn(1, 2, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    wd = torch.randn(4, 1, 3, 3, requires_grad=True)
    return [
        (x, w, b, sc, sh, r, [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu"),  # every epilogue part
        (x, w, None, sc, None, None, [2, 1], [2, 1, 2, 2], [2, 1], 1, None),  # asymmetric padding, stride
        (xc, wd, None, None, torch.randn(4, requires_grad=True), None, [1, 1], [2, 2, 2, 2], [2, 2], 2, "relu"),
    ]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_opcheck(backend):
    skip_unless_backend(backend)
    with fastseg.backend(backend):
        for args in _op_args():
            torch.library.opcheck(torch.ops.fastseg.fused_conv2d.default, args)


def test_opcheck_backward_ops():
    skip_unless_backend("triton")
    x = torch.randn(1, 3, 7, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3)
    grad_out = torch.randn(1, 4, 4, 1)  # stride 2, padding (1, 0), dilation (1, 2)
    out = torch.relu(torch.randn(1, 4, 4, 1))
    for args in ((grad_out, out, torch.rand(4), x, w, [2, 2], [1, 0, 1, 1], [1, 2]),
                 (grad_out, None, None, x, w, [2, 2], [1, 0, 1, 1], [1, 2])):
        for op in (torch.ops.fastseg.fused_conv2d_input_grad, torch.ops.fastseg.fused_conv2d_weight_grad):
            torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_compile_aot_eager(backend):
    skip_unless_backend(backend)
    x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    b, sc, sh = torch.randn(5, requires_grad=True), torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)

    def block(x, residual):
        return fastseg.fused_conv2d(x, w, b, 1, "same", 2, scale=sc, shift=sh, residual=residual, activation="relu")

    residual = torch.randn(2, 5, 9, 7)
    with fastseg.backend(backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(x.requires_grad_(), residual)
        got.square().sum().backward()
        grads = [t.grad.clone() for t in (x, w, b, sc, sh)]
        for t in (x, w, b, sc, sh):
            t.grad = None
        eager = block(x, residual)
        eager.square().sum().backward()
    torch.testing.assert_close(got, eager)
    for a, t in zip(grads, (x, w, b, sc, sh)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# errors, as F.conv2d raises them
# --------------------------------------------------------------------------------------------------------------
def test_errors():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="expected input.*4 channels|to have 3 channels"):
        fastseg.fused_conv2d(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(NotImplementedError, match="depthwise"):
        fastseg.fused_conv2d(x, torch.randn(6, 2, 3, 3), groups=2)
    with pytest.raises(RuntimeError, match="weight type"):
        fastseg.fused_conv2d(x, w.half())
    with pytest.raises(RuntimeError, match="bias type"):
        fastseg.fused_conv2d(x, w, torch.zeros(6, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="bias"):
        fastseg.fused_conv2d(x, w, torch.zeros(5))
    with pytest.raises(RuntimeError, match="scale"):
        fastseg.fused_conv2d(x, w, scale=torch.ones(7))
    with pytest.raises(RuntimeError, match="residual"):
        fastseg.fused_conv2d(x, w, residual=torch.zeros(1, 6, 8, 8))
    with pytest.raises(ValueError, match="strided"):
        fastseg.fused_conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding string"):
        fastseg.fused_conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="activation"):
        fastseg.fused_conv2d(x, w, activation="gelu")
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        fastseg.fused_conv2d(torch.randn(1, 4, 3, 3), w, dilation=2)
    with pytest.raises(RuntimeError, match="Expected 3D"):
        fastseg.fused_conv2d(torch.randn(4, 8), w)
    with pytest.raises(RuntimeError, match="dilation"):
        fastseg.fused_conv2d(x, w, dilation=0)
    with pytest.raises(RuntimeError, match="groups"):
        fastseg.fused_conv2d(x, w, groups=0)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_casts_like_conv2d(backend, dtype):
    """Under torch.autocast the output has F.conv2d's dtype (the autocast dtype), and its values."""
    skip_unless_backend(backend)
    if backend == "triton" and dtype == torch.bfloat16 and _backend.triton_interpreting():
        pytest.skip("Triton's CPU interpreter has no bfloat16 arithmetic")
    x, w, b = torch.randn(2, 5, 9, 10), torch.randn(6, 5, 3, 3) / 6, torch.randn(6)
    residual = torch.randn(2, 6, 9, 10)
    with torch.autocast("cpu", dtype=dtype), fastseg.backend(backend):
        expected = F.conv2d(x, w, b, padding=2, dilation=2)
        got = fastseg.fused_conv2d(x, w, b, padding=2, dilation=2)
        with_residual = fastseg.fused_conv2d(x, w, b, padding=1, residual=residual, activation="relu")
    assert got.dtype == expected.dtype == dtype and with_residual.dtype == dtype
    _assert_close(got, expected.double(), dtype, 45)


# --------------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_fused_conv2d_module_is_a_drop_in(backend):
    skip_unless_backend(backend)
    for kwargs in (dict(padding="same", dilation=3), dict(stride=2, padding=1, bias=False),
                   dict(padding=1, padding_mode="reflect"), dict(groups=2, padding=1)):
        torch_conv = nn.Conv2d(4, 6, 3, **kwargs)
        ours = fastseg.nn.FusedConv2d(4, 6, 3, **kwargs)
        assert isinstance(ours, nn.Conv2d)
        assert ours.state_dict().keys() == torch_conv.state_dict().keys()
        ours.load_state_dict(torch_conv.state_dict())
        x = torch.randn(2, 4, 9, 11)
        with fastseg.backend(backend):
            got = ours(x)
        torch.testing.assert_close(got, torch_conv(x), rtol=1e-5, atol=1e-5)
        assert repr(ours).replace("FusedConv2d", "Conv2d") == repr(torch_conv)
    shared = fastseg.nn.FusedConv2d.from_conv(torch_conv)
    assert isinstance(shared, fastseg.nn.FusedConv2d) and shared.weight is torch_conv.weight
    with fastseg.backend(backend):
        torch.testing.assert_close(shared(x), torch_conv(x), rtol=1e-5, atol=1e-5)


def _bn_block(momentum=0.1, track=True, affine=True, dtype=torch.float32):
    conv = nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=True).to(dtype)
    bn = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track, affine=affine).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if track:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_bn_act_eval_folds(backend):
    skip_unless_backend(backend)
    conv, bn = _bn_block()
    torch_block = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 7)
    with fastseg.backend(backend):
        got = block(x)
        residual = torch.randn_like(got)
        got_res = block(x, residual)
    torch.testing.assert_close(got, torch_block(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_res, torch.relu(torch_block[1](torch_block[0](x)) + residual), rtol=1e-5, atol=1e-5)
    # the whole block is one op call in eval mode
    scale, shift = block.folded_scale_shift()
    torch.testing.assert_close(scale, bn.weight / torch.sqrt(bn.running_var + bn.eps))
    torch.testing.assert_close(shift, bn.bias - bn.running_mean * scale)


def _eager_conv_bn_relu(conv, bn, x, residual=None):
    """nn.Conv2d -> nn.BatchNorm2d (eval) -> (+ residual) -> ReLU, in float64: the modules' function."""
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                     None if bn.weight is None else bn.weight.double(), None if bn.bias is None else bn.bias.double(),
                     False, 0.0, bn.eps)
    return torch.relu(y if residual is None else y + residual.double())


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("groups", [1, 3], ids=["dense", "depthwise"])
def test_conv_bn_act_inference_folds_once_and_follows_edits(backend, groups):
    """Under no_grad the BatchNorm is folded into a kept copy of the weight and bias: the same copy while nothing
    changes; every kind of change to any of the six tensors (in place, replaced, moved to another dtype, a
    checkpoint loaded, eps) gives the eager modules' new result on the next call."""
    skip_unless_backend(backend)
    conv = nn.Conv2d(3, 6 if groups == 1 else 3, 3, padding=2, dilation=2, groups=groups)
    bn = nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 7)

    def check(what, residual=None):
        with torch.no_grad(), fastseg.backend(backend):
            got = block(x.to(conv.weight.dtype), residual)
        expected = _eager_conv_bn_relu(conv, bn, x, residual)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")

    check("first call")
    with torch.no_grad():
        kept = block.folded_weights()
        assert block.folded_weights()[0] is kept[0] and block.folded_weights()[1] is kept[1]
        with DispatchedOps() as ops, fastseg.backend(backend):
            block(x)
    assert ops.names == ["fastseg.fused_conv2d.default"], f"a kept fold should leave the op alone: {ops.names}"
    check("residual", torch.randn(2, conv.out_channels, 9, 7))
    with torch.no_grad():
        for name, tensor in [("conv.weight", conv.weight), ("conv.bias", conv.bias), ("bn.weight", bn.weight),
                             ("bn.bias", bn.bias), ("bn.running_mean", bn.running_mean),
                             ("bn.running_var", bn.running_var)]:
            tensor.mul_(1.5).add_(0.25)
            check(f"{name} edited in place")
    bn.weight = nn.Parameter(torch.rand(conv.out_channels) + 0.5)
    check("bn.weight replaced")
    bn.eps = 0.5
    check("eps changed")
    block.load_state_dict({k: v + 0.125 if v.is_floating_point() else v for k, v in block.state_dict().items()})
    check("checkpoint loaded")
    block.double()
    check("moved to float64")
    with torch.no_grad():
        assert block.folded_weights()[0].dtype == torch.float64


def test_conv_bn_act_folded_weights_keep_layout_and_round_once():
    conv, bn = _bn_block()
    conv = conv.to(memory_format=torch.channels_last)
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    with torch.no_grad():
        weight, bias = block.folded_weights()
        scale, shift = block.folded_scale_shift()
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    torch.testing.assert_close(weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(bias, conv.bias * scale + shift)
    half = fastseg.nn.ConvBNAct.from_modules(*_bn_block(dtype=torch.bfloat16), nn.ReLU()).eval()
    with torch.no_grad():
        weight, bias = half.folded_weights()
        scale, shift = half.folded_scale_shift()
    # computed in float32 from the bfloat16 parameters, rounded once
    assert weight.dtype == bias.dtype == torch.bfloat16
    assert torch.equal(weight, (half.conv.weight.float() * scale.view(-1, 1, 1, 1)).bfloat16())
    assert torch.equal(bias, (half.conv.bias.float() * scale + shift).bfloat16())


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_bn_act_eval_with_autograd_trains_the_batchnorm(backend):
    """Eval mode with autograd on (fine-tuning the affine of a frozen BatchNorm): no kept weights, and gradients
    reach the BatchNorm's parameters and the convolution's, as through the eager modules."""
    skip_unless_backend(backend)
    conv, bn = _bn_block(dtype=torch.float64)
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    torch_block = copy.deepcopy(nn.Sequential(conv, bn, nn.ReLU())).eval()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    with fastseg.backend(backend):
        block(x).square().sum().backward()
    torch_block(x).square().sum().backward()
    assert block._folded is None
    for a, b in zip(block.parameters(), torch_block.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_conv_bn_act_inference_mode_and_pickling(tmp_path):
    conv, bn = _bn_block()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    expected = _eager_conv_bn_relu(conv, bn, x)
    with torch.inference_mode():
        torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)
    # weights folded in inference mode are inference tensors: not reused outside it
    with torch.no_grad():
        assert not block.folded_weights()[0].is_inference()
        torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    assert loaded._folded is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("bn_kind", ["momentum", "cumulative", "no_running_stats"])
def test_conv_bn_act_training_is_batchnorm(backend, bn_kind):
    skip_unless_backend(backend)
    conv, bn = _bn_block(momentum=None if bn_kind == "cumulative" else 0.1, track=bn_kind != "no_running_stats")
    torch_block = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).train()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU(inplace=True)).train()
    for step in range(2):
        x = torch.randn(2, 3, 7, 9)
        grad = torch.randn(2, 5, 7, 9)
        with fastseg.backend(backend):
            got = block(x)
            got.backward(grad)
        expected = torch_block(x)
        expected.backward(grad)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for (name, a), b in zip(block.state_dict().items(), torch_block.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"step {step}: {name}")
        # conv.bias's gradient is zero up to rounding (the BatchNorm removes the mean): absolute tolerances
        for a, b in zip(block.parameters(), torch_block.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=2e-4)
    if bn_kind == "no_running_stats":  # batch statistics in eval too, as nn.BatchNorm2d
        block.eval()
        torch_block.eval()
        x = torch.randn(2, 3, 7, 9)
        with fastseg.backend(backend):
            torch.testing.assert_close(block(x), torch_block(x), rtol=1e-5, atol=1e-5)


def test_conv_bn_act_state_dict_loads_checkpoints():
    conv, bn = _bn_block()

    class Original(nn.Module):  # a typical network block: submodules named conv, bn
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = conv, bn, nn.ReLU()

    original = Original()
    block = fastseg.nn.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    assert list(block.state_dict()) == list(original.state_dict())
    fresh = fastseg.nn.ConvBNAct.from_modules(nn.Conv2d(3, 5, 3, padding=2, dilation=2), nn.BatchNorm2d(5), nn.ReLU())
    fresh.load_state_dict(original.state_dict())
    for a, b in zip(fresh.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="activation"):
        fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.GELU())


def test_reference_spec_matches_torch():
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 2, dtype=torch.float64)
    got = reference_fused_conv2d(x, w, None, None, None, None, (1, 1), (1, 1, 2, 2), (1, 3), 1, None)
    torch.testing.assert_close(got, F.conv2d(x, w, padding="same", dilation=(1, 3)))


# --------------------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu tests)
# --------------------------------------------------------------------------------------------------------------
GPU_CASES = [
    ((2, 256, 33, 33), 256, 3, 1, 12, 12, 1),     # ASPP branch (reduced channels)
    ((2, 512, 28, 28), 256, 3, 1, "same", 4, 1),  # ResNet layer4, dilated
    ((1, 64, 130, 130), 64, 3, 1, 0, 1, 1),       # U-Net, valid conv
    ((2, 96, 45, 61), 40, 1, 1, 0, 1, 1),         # 1x1 projection, odd sizes
    ((2, 3, 67, 65), 64, 7, 2, 3, 1, 1),          # ResNet stem
    ((2, 128, 33, 35), 128, 3, 1, 6, 6, 128),     # depthwise atrous
]


GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Each case in two dtype/layout combinations, every combination over the cases: 12 tests, not 36 (each new
# specialization costs seconds of Triton compilation, and gpu_check.sh gives the GPU tests two minutes).
GPU_COMBOS = [(index, GPU_DTYPES[(index + shift) % 3], LAYOUTS[(index + shift) % 2])
              for index in range(len(GPU_CASES)) for shift in (0, 1)]


@pytest.fixture
def one_autotune_config(monkeypatch):
    """The public path with autotuning cut to one configuration (each configuration has its own test)."""
    from fastseg.ops import conv_kernels

    monkeypatch.setattr(conv_kernels._conv2d_igemm_tuned, "configs", conv_kernels.CONFIGS[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("index, dtype, layout", GPU_COMBOS)
def test_gpu_forward_large(one_autotune_config, dtype, layout, index):
    x, w, bias, kw, (s, p, d, g), reduction = _make(GPU_CASES[index], dtype, layout, EPILOGUE_NAMES[index % 7],
                                                    device="cuda")
    with fastseg.backend("triton"):
        got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw)
    expected = _expected(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s, p, d, g, kw["activation"])
    _assert_close(got, expected, dtype, reduction)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.gpu
# A quarter of the combinations, and case 3 (epilogue "all": bias, affine, residual, ReLU) in float16, where the
# cuDNN candidates are cudnn_convolution_add_relu and F.conv2d + add_ + relu_ in half precision.
@pytest.mark.parametrize("index, dtype, layout", GPU_COMBOS[::4] + [(3, torch.float16, "channels_last")])
def test_gpu_auto_times_and_both_candidates_match(one_autotune_config, monkeypatch, dtype, layout, index):
    """"auto" picks one implementation per problem; whichever it picks, every candidate (Triton; cuDNN with the
    affine folded; and where the epilogue ends in a ReLU, cuDNN's cudnn_convolution_(add_)relu fusion) matches
    the specification."""
    from fastseg.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_auto_choices", {})
    x, w, bias, kw, (s, p, d, g), reduction = _make(GPU_CASES[index], dtype, layout, EPILOGUE_NAMES[index % 7],
                                                    device="cuda")
    expected = _expected(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s, p, d, g, kw["activation"])
    _assert_close(fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw), expected, dtype, reduction, what="auto")
    (key, choice), = conv_ops.auto_choices().items()
    candidates = ("triton", "cudnn", "cudnn_fused") if kw["activation"] == "relu" else ("triton", "cudnn")
    assert choice in candidates
    for forced in candidates:
        conv_ops._auto_choices[key] = forced
        got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw)
        _assert_close(got, expected, dtype, reduction, what=forced)
        assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.gpu
def test_gpu_cuda_graph_of_a_first_call(monkeypatch):
    """A CUDA graph captured around a conv-BN-ReLU block's very first call (nothing timed or compiled for the
    problem yet: "auto" runs cuDNN and torch's passes, the fold inside the graph) replays the eager result for new
    input; afterwards eager calls time the problem as usual."""
    from fastseg.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_auto_choices", {})
    conv, bn = _bn_block()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).cuda().eval()
    torch_block = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).cuda().eval()
    x = torch.randn(2, 3, 33, 33, device="cuda").contiguous(memory_format=torch.channels_last)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        torch_block(x)  # cuDNN's handle and workspace exist before the capture, as in any program that ran a layer
        with torch.cuda.graph(graph):
            captured = block(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured, torch_block(x), rtol=1e-4, atol=1e-4)
        assert not conv_ops.auto_choices(), "nothing is timed during a capture"
        torch.testing.assert_close(block(x), torch_block(x), rtol=1e-4, atol=1e-4)  # eager: timed now


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_every_autotune_config(dtype):
    from fastseg.ops import conv_kernels

    x = torch.randn(2, 160, 29, 31, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(200, 160, 3, 3, device="cuda", dtype=dtype) / 38
    bias, scale, shift = (torch.randn(200, device="cuda", dtype=dtype) for _ in range(3))
    expected = _expected(x, w, bias, scale, shift, None, 1, 6, 6, 1, "relu")
    for i, config in enumerate(conv_kernels.CONFIGS):
        # every other configuration split-K, every other pair taps-outer (each variant is one more compilation)
        split, loop_order = 1 + 2 * (i % 2), ("flat", "taps_outer")[i // 2 % 2]
        out = poison_(torch.empty(2, 200, 29, 31, device="cuda", dtype=dtype))
        conv_kernels.forward(x, w, bias, scale, shift, None, out, (1, 1), (6, 6), (6, 6), 1, True, False,
                             conv_kernels.config_kwargs(config), split=split, loop_order=loop_order)
        _assert_close(out, expected, dtype, 1440, what=f"config {config}, split {split}, {loop_order}")


@pytest.mark.gpu
def test_gpu_autotuning_times_only_the_configs_that_fit():
    """On the GPU the autotuner really prunes: a 64-output-channel problem times the 4 configurations whose tile
    fits it, and the result is right."""
    from fastseg.ops import conv_kernels

    x = torch.randn(1, 32, 37, 41, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 32, 3, 3, device="cuda", dtype=torch.float16) / 17
    with fastseg.backend("triton"):
        got = fastseg.fused_conv2d(x, w, padding=1, activation="relu")
    _assert_close(got, _expected(x, w, None, None, None, None, 1, 1, 1, 1, "relu"), torch.float16, 288)
    timed = [config.kwargs["BLOCK_N"] for config in conv_kernels._conv2d_igemm_tuned.configs_timings]
    assert len(timed) == 4 and max(timed) == 64, timed


@pytest.mark.gpu
def test_gpu_split_k_on_a_33x33_aspp_branch(one_autotune_config):
    """The shape split-K is for (DeepLab-v3's ASPP at 33x33, batch 8: too few output tiles to fill the GPU): the
    default split is taken on a GPU of 100+ SMs, and the public Triton path's result is right."""
    from fastseg.ops import conv_kernels

    x = torch.randn(8, 512, 33, 33, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)  # 512 of ASPP's 2048 channels: the same tiles, a shorter reduction
    w = torch.randn(256, 512, 3, 3, device="cuda", dtype=torch.bfloat16) / 68
    scale, shift = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    out = torch.empty(8, 256, 33, 33, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_properties(0).multi_processor_count >= 100:
        assert conv_kernels.reduction_split(x, w, out) > 1
    with fastseg.backend("triton"):
        got = fastseg.fused_conv2d(x, w, None, 1, 12, 12, scale=scale, shift=shift, activation="relu")
    expected = _expected(x, w, None, scale, shift, None, 1, 12, 12, 1, "relu")
    _assert_close(got, expected, torch.bfloat16, 512 * 9, what="split-K ASPP")


@pytest.mark.gpu
def test_gpu_tf32_follows_cudnn_flag(one_autotune_config):
    x = torch.randn(2, 64, 33, 33, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    expected = _expected(x, w, None, None, None, None, 1, 2, 2, 1, None)
    with fastseg.backend("triton"):
        torch.backends.cudnn.allow_tf32 = False
        _assert_close(fastseg.fused_conv2d(x, w, padding=2, dilation=2), expected, torch.float32, 576)
        torch.backends.cudnn.allow_tf32 = True
        got = fastseg.fused_conv2d(x, w, padding=2, dilation=2)
    torch.testing.assert_close(got.double(), expected, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gradients_and_modules(dtype):
    x, w, bias, kw, (s, p, d, g), reduction = _make(GPU_CASES[0], dtype, "channels_last", "all", device="cuda")
    leaves = [t.requires_grad_() for t in (x, w, bias, kw["scale"], kw["shift"], kw["residual"])]
    got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, scale=kw["scale"], shift=kw["shift"],
                               residual=kw["residual"], activation="relu")
    grads = torch.autograd.grad(got.float().square().sum(), leaves)
    mask = got.detach() > 0
    z = _expected(*leaves, s, p, d, g, None)
    exp = torch.autograd.grad((torch.relu(z) * mask).square().sum(), leaves)
    for a, e in zip(grads, exp):
        # autograd returns each reference gradient in its leaf's (half) dtype: compare both in float64. The loss
        # squares the half-precision output, and the backward rounds the gradient at the convolution's output
        # once more: twice _tolerance's roundings.
        tolerance = _tolerance(dtype, reduction, e)
        torch.testing.assert_close(a.double(), e.double(), rtol=2 * tolerance["rtol"], atol=2 * tolerance["atol"])
    conv, bn = _bn_block()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).cuda().eval()
    torch_block = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).cuda().eval()
    xs = torch.randn(2, 3, 65, 65, device="cuda")
    torch.testing.assert_close(block(xs), torch_block(xs), rtol=1e-2, atol=1e-2)


BACKWARD_GPU_CASES = [
    ((2, 256, 33, 33), 256, 3, 1, 12, 12, 1),     # ASPP branch (reduced channels)
    ((2, 128, 57, 57), 256, 3, 2, 1, 1, 1),       # ResNet downsampling 3x3 / 2, odd size
    ((2, 256, 56, 56), 512, 1, 2, 0, 1, 1),       # ResNet projection shortcut 1x1 / 2
    ((2, 64, 130, 130), 64, 3, 1, 0, 1, 1),       # U-Net valid conv: few weight tiles, split-K
]


@pytest.fixture
def one_backward_config(monkeypatch):
    """The backward kernels with autotuning cut to one configuration (each has its own test)."""
    from fastseg.ops import conv_backward_kernels

    monkeypatch.setattr(conv_backward_kernels._conv2d_dgrad_tuned, "configs", conv_backward_kernels.DGRAD_CONFIGS[:1])
    monkeypatch.setattr(conv_backward_kernels._conv2d_wgrad_tuned, "configs", conv_backward_kernels.WGRAD_CONFIGS[:1])


def _relative_error(got, expected):
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", range(len(BACKWARD_GPU_CASES)))
def test_gpu_triton_backward_matches_torch(one_autotune_config, one_backward_config, monkeypatch, dtype, index):
    """backend("triton")'s backward kernels against torch's backward (cuDNN, what "auto" runs) and float64."""
    from fastseg.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_auto_impl", lambda *args: "triton")
    x, w, _, kw, (s, p, d, g), _ = _make(BACKWARD_GPU_CASES[index], dtype, "channels_last", "bn_relu",
                                         device="cuda")
    x.requires_grad_()
    w.requires_grad_()
    grad_out = None
    grads = {}
    for backend in ("triton", "auto"):  # the same Triton forward both times: the same ReLU mask
        with fastseg.backend(backend):
            out = fastseg.fused_conv2d(x, w, None, s, p, d, g, **kw)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        grads[backend] = torch.autograd.grad(out, (x, w), grad_out)
    z = _expected(x, w, None, kw["scale"], None, None, s, p, d, g, None)
    expected = torch.autograd.grad(z, (x, w), grad_out.double() * (out.detach() > 0))
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-2
    for name, ours, torchs, e in zip(("x", "weight"), grads["triton"], grads["auto"], expected):
        assert ours.dtype == dtype and not ours.isnan().any(), name
        error, torch_error = _relative_error(ours, e), _relative_error(torchs, e)
        assert error <= tolerance and error <= 3 * torch_error + tolerance / 10, (
            f"grad {name}: max |diff| / max |float64| {error:.2e}, torch's {torch_error:.2e}")
    assert grads["triton"][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_gpu_every_backward_config():
    from fastseg.ops import conv_backward_kernels, conv_kernels

    dtype = torch.bfloat16
    x = torch.randn(2, 160, 29, 31, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(200, 160, 3, 3, device="cuda", dtype=dtype) / 38
    scale = torch.rand(200, device="cuda") + 0.5
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z = F.conv2d(x64, w64, None, 2, 2, 2) * scale.double().view(1, -1, 1, 1)
    out = torch.relu(z).detach().to(dtype).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(out)
    exp_x, exp_w = torch.autograd.grad(z, (x64, w64), grad_out.double() * (out > 0))
    geometry = ((2, 2), (2, 2), (2, 2), False)
    for config in conv_backward_kernels.DGRAD_CONFIGS:
        grad_x = poisoned(x.shape, dtype, device="cuda", layout="channels_last")
        conv_backward_kernels.input_grad(grad_out, out, scale, w, grad_x, *geometry,
                                         config=conv_kernels.config_kwargs(config))
        assert _relative_error(grad_x, exp_x) < 3e-2, f"grad x, config {config}"
    for config in conv_backward_kernels.WGRAD_CONFIGS:
        for split in (1, 5):
            grad_w = poisoned(w.shape, dtype, device="cuda")
            conv_backward_kernels.weight_grad(grad_out, out, scale, x, grad_w, *geometry,
                                              config=conv_kernels.config_kwargs(config), split=split)
            assert _relative_error(grad_w, exp_w) < 3e-2, f"grad weight, config {config}, split {split}"
