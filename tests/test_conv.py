"""fastseg.fused_conv2d, FusedConv2d and ConvBNAct against F.conv2d + affine + ReLU, on every backend.

Layers tested:
- the public function under "reference" and "triton" (Triton's interpreter on CPU): odd spatial sizes,
  channel counts that are not multiples of the block sizes, dilation 1/2/6/12, stride 1/2, padding 0 / int /
  "same" (also the asymmetric "same" of even kernels), 1x1/3x3/5x5/7x7 and non-square kernels, depthwise,
  each epilogue part on and off, NCHW and channels_last, float32 and float16; errors;
- the kernels directly, into NaN-poisoned outputs (also strided ones), with every autotune configuration;
- autograd: gradcheck of the reference path in float64 (through the registered op's backward), and the
  triton path's gradients against torch's;
- the registered op (torch.library.opcheck, torch.compile fullgraph with aot_eager);
- the modules: state_dict compatibility, eval-mode BatchNorm folding, training-mode batch and running
  statistics identical to nn.BatchNorm2d's;
- on CUDA (marker gpu): bfloat16, float16 channels_last at network sizes, every autotune configuration, TF32.

Inputs are random and fresh each run; a failing test prints its seed (see conftest.py).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg
from conftest import poison_, skip_unless_backend
from fastseg import _backend
from fastseg.ops.conv import reference_fused_conv2d

CONV_BACKENDS = ("reference", "triton")
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


def _tolerance(dtype, reduction):
    # float32: accumulation-order differences grow with the reduction length; float16: one output rounding.
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3 * reduction**0.5)
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1.6e-2 * reduction**0.5)
    return dict(rtol=1e-5, atol=1e-5 * reduction**0.5)


def _assert_close(got, expected, dtype, reduction, what="output"):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert not got.isnan().any(), f"{what}: NaN in the output (an element was not written)"
    torch.testing.assert_close(got.double(), expected.double(), **_tolerance(dtype, reduction), msg=lambda m: f"{what}: {m}")


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


def _run_case(backend, case, dtype, layout, epilogue):
    skip_unless_backend(backend)
    x, w, bias, kw, (s, p, d, g), reduction = _make(case, dtype, layout, epilogue)
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw)
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
def test_forward_float32(backend, layout, index):
    # Each geometry gets a different epilogue per layout, so every epilogue meets several geometries.
    epilogue = EPILOGUE_NAMES[(2 * index + LAYOUTS.index(layout)) % len(EPILOGUE_NAMES)]
    _run_case(backend, CASES[index], torch.float32, layout, epilogue)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_ids(c) for c in CASES])
def test_forward_float16(backend, index):
    layout = LAYOUTS[index % 2]
    epilogue = EPILOGUE_NAMES[(index + 3) % len(EPILOGUE_NAMES)]
    _run_case(backend, CASES[index], torch.float16, layout, epilogue)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("epilogue", EPILOGUE_NAMES)
def test_each_epilogue_part(backend, epilogue):
    _run_case(backend, ((2, 5, 7, 9), 6, 3, 1, 1, 1, 1), torch.float32, "nchw", epilogue)


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


def test_auto_dispatch():
    assert _backend.registered_ops()["fused_conv2d"] == frozenset({"triton", "reference"})
    assert _backend.select("fused_conv2d", torch.device("cpu")) == "reference"
    if torch.cuda.is_available():
        assert _backend.select("fused_conv2d", torch.device("cuda")) == "triton"


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


# --------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------
GRAD_CASES = [
    ((1, 3, 6, 5), 4, 3, 1, "same", 2, 1),
    ((2, 2, 5, 4), 3, (4, 2), 1, "same", (1, 2), 1),     # asymmetric "same"
    ((1, 4, 5, 5), 4, 3, 2, 1, 1, 4),                     # depthwise, stride 2
    ((1, 2, 9, 8), 3, 5, 2, 4, 2, 1),
]


@pytest.mark.parametrize("index", range(len(GRAD_CASES)))
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index", range(len(GRAD_CASES)))
def test_gradients_against_torch(backend, dtype, index):
    skip_unless_backend(backend)
    layout = LAYOUTS[index % 2]
    x, w, bias, kw, (s, p, d, g), reduction = _make(GRAD_CASES[index], dtype, layout, "all")
    leaves = [t.requires_grad_() for t in (x, w, bias, kw["scale"], kw["shift"], kw["residual"])]
    with fastseg.backend(backend):
        got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, scale=kw["scale"], shift=kw["shift"],
                                   residual=kw["residual"], activation="relu")
    expected = _expected(*leaves, s, p, d, g, "relu")
    grad = torch.randn(got.shape, dtype=dtype)
    got_grads = torch.autograd.grad(got, leaves, grad)
    # torch's gradients in float64 through the same ReLU mask (the kernel's output decides which side of 0)
    mask = got.detach() > 0
    z = _expected(*leaves, s, p, d, g, None)
    exp_grads = torch.autograd.grad(z, leaves, (grad.double() * mask))
    names = ("x", "weight", "bias", "scale", "shift", "residual")
    for name, a, e, leaf in zip(names, got_grads, exp_grads, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        n = max(e.numel() // max(e.shape[0], 1), reduction) if name in ("bias", "scale", "shift", "weight") else reduction
        torch.testing.assert_close(a.double(), e.double(), **_tolerance(dtype, n * 4), msg=lambda m, name=name: f"grad {name}: {m}")
    assert got.shape == expected.shape


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
    got = fastseg.fused_conv2d(x, w, bias, s, p, d, g, **kw)
    expected = _expected(x, w, bias, kw["scale"], kw["shift"], kw["residual"], s, p, d, g, kw["activation"])
    _assert_close(got, expected, dtype, reduction)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_every_autotune_config(dtype):
    from fastseg.ops import conv_kernels

    x = torch.randn(2, 160, 29, 31, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(200, 160, 3, 3, device="cuda", dtype=dtype) / 38
    bias, scale, shift = (torch.randn(200, device="cuda", dtype=dtype) for _ in range(3))
    expected = _expected(x, w, bias, scale, shift, None, 1, 6, 6, 1, "relu")
    for config in conv_kernels.CONFIGS:
        out = poison_(torch.empty(2, 200, 29, 31, device="cuda", dtype=dtype))
        conv_kernels.forward(x, w, bias, scale, shift, None, out, (1, 1), (6, 6), (6, 6), 1, True, False,
                             conv_kernels.config_kwargs(config))
        _assert_close(out, expected, dtype, 1440, what=f"config {config}")


@pytest.mark.gpu
def test_gpu_tf32_follows_cudnn_flag(one_autotune_config):
    x = torch.randn(2, 64, 33, 33, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    expected = _expected(x, w, None, None, None, None, 1, 2, 2, 1, None)
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
        # autograd returns each reference gradient in its leaf's (half) dtype: compare both in float64
        torch.testing.assert_close(a.double(), e.double(), rtol=5e-2, atol=5e-2 * reduction**0.5)
    conv, bn = _bn_block()
    block = fastseg.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU()).cuda().eval()
    torch_block = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).cuda().eval()
    xs = torch.randn(2, 3, 65, 65, device="cuda")
    torch.testing.assert_close(block(xs), torch_block(xs), rtol=1e-2, atol=1e-2)
