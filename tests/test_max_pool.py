"""fastseg's max_pool2d / max_pool2d_with_indices / max_unpool2d against PyTorch, on every backend.

Layers tested:
- the public functions and nn modules, under each backend ("reference", "triton" through Triton's interpreter
  on CPU, "extension" = fastseg._C's C++ kernels), against torch.nn.functional: values, indices, NaN, ties,
  -inf, output sizes, memory formats, errors, gradients;
- the registered custom ops (torch.library.opcheck, torch.compile);
- the out-style kernels directly (poisoned outputs, every argmax encoding, strided outputs);
- the plain-PyTorch reference (gradcheck);
- on CUDA (marker gpu): Triton and CUDA kernels on large shapes, 64-bit offsets, compile with inductor.

Inputs are random and fresh each run; a failing test prints its seed (see conftest.py).
"""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import (
    BACKENDS,
    INT_SENTINEL,
    LAYOUTS,
    assert_same,
    channels_far_apart,
    extension_available,
    make_input,
    pair,
    poison_,
    pool_out_size,
    run_at_baseline_simd_target,
    skip_unless_backend,
    to_layout,
    torch_max_pool,
    window_offsets_from_indices,
)

NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------------------------------------------
# the parameter matrix
# --------------------------------------------------------------------------------------------------------------
SHAPES = [(2, 3, 7, 9), (1, 2, 5, 11), (2, 2, 1, 10), (3, 9, 7), (1, 3, 12, 12), (2, 1, 6, 5), (1, 2, 8, 1)]
KINDS = ["randn", "ties", "nan", "neginf", "mixed", "nanwin"]


def _pads(kh, kw):
    if kh == kw:
        return [(p, p) for p in range(kh // 2 + 1)]
    return list(itertools.product(range(kh // 2 + 1), range(kw // 2 + 1)))


def _valid(shape, k, s, p, d, ceil_mode):
    return all(
        pool_out_size(shape[-2 + i], k[i], s[i], p[i], d[i], ceil_mode) >= 1 for i in range(2)
    )


def _configs():
    """Every kernel (1, 2, 3, (2, 3)) x stride (1, 2, 3, default) x padding (0..k//2) x dilation (1, 2) x
    ceil_mode, each with a shape, layout, dtype slot and input kind chosen by rotation (so every value of each
    appears with many of the others, without the full product)."""
    out = []
    i = 0
    for k in [1, 2, 3, (2, 3)]:
        kh, kw = pair(k)
        for stride in [1, 2, 3, None]:
            for p in _pads(kh, kw):
                for d in [1, 2]:
                    for ceil_mode in [False, True]:
                        s = (kh, kw) if stride is None else pair(stride)
                        for j in range(len(SHAPES)):
                            shape = SHAPES[(i + j) % len(SHAPES)]
                            if _valid(shape, (kh, kw), s, p, (d, d), ceil_mode):
                                break
                        else:
                            continue
                        cfg = dict(
                            shape=shape,
                            kernel_size=k,
                            stride=stride,
                            padding=p if p[0] != p[1] else p[0],
                            dilation=d,
                            ceil_mode=ceil_mode,
                            layout=LAYOUTS[i % len(LAYOUTS)],
                            dtype_slot=(i // len(LAYOUTS)) % 4,
                            kind=KINDS[(i * 5 // 3) % len(KINDS)],
                        )
                        cid = (
                            f"k{kh}x{kw}-s{'def' if stride is None else stride}-p{p[0]}{p[1]}-d{d}"
                            f"-{'ceil' if ceil_mode else 'floor'}-{'x'.join(map(str, shape))}-{cfg['layout']}"
                            f"-{cfg['kind']}"
                        )
                        out.append(pytest.param(cfg, id=cid))
                        i += 1
    return out


CONFIGS = _configs()
# A smaller sample (every third) for the slower checks (gradients).
GRAD_CONFIGS = CONFIGS[::3]


def dtypes_for(backend, device="cpu"):
    """Float dtypes a backend handles here: Triton's interpreter has no bf16 arithmetic (float64 is kept out
    of it too, to keep the interpreted runs short); the extension and reference take all four."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.float64, torch.bfloat16]


def pick_dtype(backend, slot):
    ds = dtypes_for(backend)
    return ds[slot % len(ds)]


def pool_args(cfg):
    return (cfg["kernel_size"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["ceil_mode"])


def norm_args(kernel_size, stride, padding, dilation):
    k = pair(kernel_size)
    return k, (k if stride is None else pair(stride)), pair(padding), pair(dilation)


def has_impl(op, backend):
    """Whether `op` has a `backend` implementation (forcing a missing one raises, by design)."""
    from fastseg import _backend

    return backend in _backend.registered_ops()[op]


def skip_unless_unpool(backend):
    if not has_impl("max_unpool2d", backend):
        pytest.skip(f"max_unpool2d has no {backend!r} implementation")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test under fastseg.backend(name) for every backend that can run here."""
    skip_unless_backend(request.param)
    with fastseg.backend(request.param):
        yield request.param


# --------------------------------------------------------------------------------------------------------------
# forward: values, indices, memory format
# --------------------------------------------------------------------------------------------------------------
def check_forward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """fastseg's max_pool2d with and without indices == PyTorch's: values, int64 indices, strides."""
    exp_out, exp_idx = torch_max_pool(x, kernel_size, stride, padding, dilation, ceil_mode)
    out, idx = fastseg.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    assert_same(out, exp_out, "max_pool2d_with_indices values")
    assert_same(idx, exp_idx, "max_pool2d_with_indices indices")
    assert out.stride() == exp_out.stride(), f"output strides {out.stride()} != torch's {exp_out.stride()}"
    assert idx.stride() == exp_idx.stride(), f"indices strides {idx.stride()} != torch's {exp_idx.stride()}"

    out2 = fastseg.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    assert isinstance(out2, torch.Tensor)
    assert_same(out2, exp_out, "max_pool2d values (no indices)")
    assert out2.stride() == exp_out.stride()
    return out, idx


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matrix(backend, cfg):
    dtype = pick_dtype(backend, cfg["dtype_slot"])
    x = to_layout(make_input(cfg["shape"], dtype, cfg["kind"]).reshape(-1, *cfg["shape"][-3:]), cfg["layout"])
    x = x.reshape(cfg["shape"]) if len(cfg["shape"]) == 3 else x
    check_forward(x, *pool_args(cfg))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_layouts_and_kinds(backend, layout, kind):
    """Every input kind (NaN, whole-NaN windows, ties, -inf, +inf) in every layout, float32 or float16, with
    overlapping windows so NaNs and ties are seen by several windows."""
    dtype = dtypes_for(backend)[(LAYOUTS.index(layout) + KINDS.index(kind)) % 2]
    x = to_layout(make_input((2, 3, 7, 9), dtype, kind), layout)
    check_forward(x, 3, 1, 1, 1, False)
    check_forward(x, (2, 3), (2, 1), (1, 0), (1, 2), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=str)
def test_forward_all_dtypes(backend, dtype):
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} is not run on the {backend} backend on CPU (Triton's interpreter)")
    for kind in ("randn", "ties", "mixed"):
        x = make_input((2, 2, 6, 7), dtype, kind)
        check_forward(x, 2, 1, 1, 1, True)
        check_forward(x.contiguous(memory_format=torch.channels_last), 3, 2, 1, 2, False)


def test_forward_view_inputs(backend):
    """Inputs that are views: a column slice, a transposed plane, a channel slice, an expanded batch."""
    base = make_input((2, 4, 9, 14), torch.float32, "ties")
    views = [
        base[..., ::2],
        base[:, 1:3],
        base[:, :, 1:8, 2:13],
        base.transpose(2, 3),
        base[:1].expand(3, -1, -1, -1),
        base.permute(0, 2, 3, 1)[..., 1:3].permute(0, 3, 1, 2),
    ]
    for v in views:
        check_forward(v, 3, 2, 1)
        check_forward(v, (2, 3), 1, 0, 2, True)


def test_forward_return_indices_flag(backend):
    x = make_input((2, 3, 7, 9), torch.float32, "mixed")
    exp_out, exp_idx = torch_max_pool(x, 3, 2, 1, 1, True)
    out, idx = fastseg.max_pool2d(x, 3, 2, 1, 1, True, return_indices=True)
    assert_same(out, exp_out, "max_pool2d(return_indices=True) values")
    assert_same(idx, exp_idx, "max_pool2d(return_indices=True) indices")
    out, idx = fastseg.max_pool2d(x, 3, 2, 1, 1, True, True)
    assert_same(idx, exp_idx)


def test_forward_3d_input(backend):
    x = make_input((3, 7, 9), torch.float32, "nan")
    out, idx = check_forward(x, 3, 2, 1, 1, True)
    assert out.dim() == 3 and idx.dim() == 3
    check_forward(to_layout(x[None], "channels_last")[0], 2)


def test_forward_empty_batch(backend):
    x = torch.randn(0, 3, 6, 6)
    check_forward(x, 2)


def test_forward_ties_keep_first_maximum(backend):
    """A constant input: every window's argmax is its first in-bounds tap."""
    for value in (0.0, -INF, 5.0):
        x = torch.full((1, 2, 6, 7), value)
        check_forward(x, 3, 1, 1)
        check_forward(x, (3, 2), 2, (1, 1), 2, True)


def test_forward_nan_windows(backend):
    """NaN wins over every number; with several NaNs the last one in row-major window order wins."""
    x = torch.randn(1, 1, 6, 6)
    x[0, 0, 1, 1] = NAN
    x[0, 0, 1, 2] = NAN
    x[0, 0, 2, 0] = NAN
    x[0, 0, 4:, 4:] = NAN
    x[0, 0, 0, 5] = INF
    x[0, 0, 5, 0] = -INF
    check_forward(x, 3, 1, 1)
    check_forward(x, 2, 2)
    check_forward(to_layout(x, "channels_last"), 3, 2, 1, 2, True)


def test_forward_degenerate_window(backend):
    """Dilation can leave a window with no in-bounds tap: -inf, and the index of its first tap at or after 0
    (outside the plane), as PyTorch gives."""
    x = torch.randn(1, 2, 1, 4)
    check_forward(x, (2, 1), 1, (1, 0), (2, 1))


def test_forward_big_window_narrow_offsets(backend):
    """Windows of more than 128 taps (int16 window offsets in the no-indices path)."""
    x = make_input((1, 2, 13, 12), torch.float32, "ties")
    check_forward(x, (13, 12))
    check_forward(x, (12, 11), 1, (6, 5))


def test_forward_argument_forms(backend):
    """Sizes as ints, 1- and 2-sequences, lists, torch.Size; an empty stride means the default."""
    x = make_input((1, 2, 7, 8), torch.float32, "ties")
    forms = [
        dict(kernel_size=[2], stride=[]),
        dict(kernel_size=torch.Size([3, 2]), stride=(1,), padding=[1, 0]),
        dict(kernel_size=(3,), stride=[2, 1], padding=(1,), dilation=[2]),
        dict(kernel_size=2, stride=None, padding=(0, 1), dilation=(1, 2), ceil_mode=True),
    ]
    for kw in forms:
        check_forward(x, **kw)


def test_forward_signed_zero_ties(backend):
    """-0.0 == 0.0: the first one in the window wins and its sign is kept (the value is stored unchanged)."""
    for dtype in dtypes_for(backend)[:2]:
        z = torch.tensor([[-0.0, 0.0, -0.0], [0.0, -0.0, 0.0], [-0.0, -0.0, 0.0]], dtype=dtype)
        x = z.repeat(1, 2, 2, 3)
        for sign in (1, -1):
            for args in ((2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 1), (2, 1), True)):
                out, _ = check_forward(sign * x, *args)
                exp = F.max_pool2d((sign * x).double(), *args).to(dtype)
                assert torch.equal(out.signbit(), exp.signbit()), f"sign of zero differs for {args}"


def test_forward_no_grad_and_inference_mode(backend):
    x = make_input((1, 2, 6, 7), torch.float32, "ties").requires_grad_()
    with torch.no_grad():
        out = fastseg.max_pool2d(x, 2)
    assert not out.requires_grad
    assert_same(out, F.max_pool2d(x.detach(), 2))
    with torch.inference_mode():
        out, idx = fastseg.max_pool2d_with_indices(x.detach(), 3, 1, 1)
    assert_same(idx, F.max_pool2d(x.detach(), 3, 1, 1, return_indices=True)[1])


def test_forward_integer_valued_float16_extremes(backend):
    x = make_input((2, 2, 7, 8), torch.float16, "ties") * 1000
    x[0, 0, 0, 0] = 65504.0
    x[1, 1, 3, 3] = -65504.0
    check_forward(x, 3, 2, 1, 1, True)


# --------------------------------------------------------------------------------------------------------------
# invalid arguments raise like torch
# --------------------------------------------------------------------------------------------------------------
BAD_POOL_ARGS = [
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, padding=2), r"pad", id="padding>kernel/2"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=3, padding=2), r"pad", id="padding>kernel/2-k3"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=(3, 2), padding=(1, 2)), r"pad", id="padding>kernel/2-w"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, padding=-1), r"pad", id="negative-padding"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, stride=0), r"stride", id="stride0"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, stride=-1), r"stride", id="stride-negative"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, stride=(1, 0)), r"stride", id="stride-w0"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=0), r"kernel|stride", id="kernel0"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=-1, stride=1), r"kernel", id="kernel-negative"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=(2, 0), stride=1), r"kernel", id="kernel-w0"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=2, dilation=0), r"dilation", id="dilation0"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=6), r"too small|output size", id="output-too-small"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=3, dilation=3), r"too small|output size", id="dilated-too-small"),
    pytest.param((1, 2, 5, 5), dict(kernel_size=(2, 2, 2)), r"kernel_size", id="kernel-3-tuple"),
    pytest.param((5, 5), dict(kernel_size=2), r"3D or 4D", id="rank2"),
    pytest.param((1, 1, 2, 5, 5), dict(kernel_size=2), r"3D or 4D", id="rank5"),
    pytest.param((2, 0, 5, 5), dict(kernel_size=2), r"3D or 4D", id="zero-channels"),
    pytest.param((2, 2, 0, 5), dict(kernel_size=2), r"3D or 4D", id="zero-height"),
]


@pytest.mark.parametrize("shape,kwargs,pattern", BAD_POOL_ARGS)
def test_bad_arguments_raise_like_torch(backend, shape, kwargs, pattern):
    x = torch.randn(shape)
    with pytest.raises(Exception) as expected:
        F.max_pool2d(x, return_indices=True, **kwargs)
    for fn in (fastseg.max_pool2d_with_indices, fastseg.max_pool2d):
        with pytest.raises(expected.type, match=f"(?i){pattern}"):
            fn(x, **kwargs)


@pytest.mark.parametrize("module", ["functional", "nn"])
def test_bad_arguments_through_module(module):
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="(?i)pad"):
        if module == "nn":
            fastseg.nn.MaxPool2d(2, padding=2)(x)
        else:
            fastseg.max_pool2d(x, 2, padding=2)


# --------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------
def _overlapping(kernel_size, stride, dilation):
    k, s, _, d = norm_args(kernel_size, stride, 0, dilation)
    return any(s[i] < d[i] * (k[i] - 1) + 1 for i in range(2))


def _has_empty_window(size, kernel_size, stride, padding, dilation, ceil_mode):
    """Whether some window has no tap inside the input (possible with dilation, e.g. k=2, p=1, d=2, H=1)."""
    k, s, p, d = norm_args(kernel_size, stride, padding, dilation)
    for i in range(2):
        for o in range(pool_out_size(size[i], k[i], s[i], p[i], d[i], ceil_mode)):
            if not any(0 <= o * s[i] - p[i] + r * d[i] < size[i] for r in range(k[i])):
                return True
    return False


def _scatter_grad(g, idx, in_shape):
    """torch's max_pool2d backward, sum of g at its (in-range) indices, in float64."""
    N, C, H, W = (1, *in_shape) if len(in_shape) == 3 else in_shape
    inside = (idx >= 0) & (idx < H * W)
    out = torch.zeros(N, C, H * W, dtype=torch.float64, device=g.device)
    out.scatter_add_(2, torch.where(inside, idx, 0).reshape(N, C, -1),
                     torch.where(inside, g.double(), 0.0).reshape(N, C, -1))
    return out.view(in_shape)


def check_backward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, grad="randn"):
    """Gradient of fastseg's max_pool2d (with and without indices) == torch's.

    Exact where windows do not overlap (each input gets at most one output's gradient); where they do, the
    sums may be taken in another order: float32 / float64 allclose, float16 / bfloat16 within one rounding
    of the exact (float64) sum.

    Where a window has no tap inside the input, torch's CPU backward scatters to its out-of-plane index (a
    write out of bounds that can abort the process), so the expected gradient is then torch's backward
    done here: the sum of grad_out at torch's in-range forward indices."""
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    overlap = _overlapping(kernel_size, stride, dilation)
    exact_dtype = x.dtype if not overlap else torch.float64

    xt = x.detach().to(exact_dtype).requires_grad_()
    ref, ref_idx = F.max_pool2d(xt, *args, return_indices=True)
    if grad == "randn":
        g = torch.randn(ref.shape, dtype=torch.float64, device=x.device).to(x.dtype)
        if g.dim() == 4:
            g = to_layout(g, random.choice(["nchw", "channels_last", "strided"]))
    else:  # the expanded (stride 0) gradient of .sum()
        g = torch.ones((), dtype=x.dtype, device=x.device).expand(ref.shape)
    if _has_empty_window(x.shape[-2:], *args):
        expected = _scatter_grad(g, ref_idx, x.shape).to(exact_dtype)
    else:
        (expected,) = torch.autograd.grad(ref, xt, g.to(exact_dtype))

    for with_indices in (False, True):
        xf = x.detach().clone().requires_grad_()
        out = fastseg.max_pool2d(xf, *args, return_indices=with_indices)
        out = out[0] if with_indices else out
        (got,) = torch.autograd.grad(out, xf, g)
        what = f"grad (with_indices={with_indices}, overlapping={overlap})"
        assert got.dtype == x.dtype and got.shape == x.shape, what
        if not overlap:
            assert_same(got, expected, what)
        elif x.dtype in (torch.float16, torch.bfloat16):
            eps = torch.finfo(x.dtype).eps
            torch.testing.assert_close(got.double(), expected, rtol=eps, atol=1e-5, msg=what)
        else:
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("cfg", GRAD_CONFIGS)
def test_backward_matrix(backend, cfg):
    dtype = pick_dtype(backend, cfg["dtype_slot"] + 1)
    kind = "randn" if cfg["kind"] in ("randn", "nan", "nanwin") else cfg["kind"]
    x = make_input(cfg["shape"], dtype, kind)
    if len(cfg["shape"]) == 4:
        x = to_layout(x, cfg["layout"])
    check_backward(x, *pool_args(cfg), grad="sum" if cfg["dtype_slot"] % 2 else "randn")


@pytest.mark.parametrize("grad", ["randn", "sum"])
def test_backward_overlapping_ties_and_layouts(backend, grad):
    """Overlapping windows (stride < kernel) where one input is the argmax of several windows, ties,
    NaN (its gradient goes to the NaN), -inf, in each layout."""
    for layout, kind in zip(LAYOUTS, ["ties", "nan", "neginf", "mixed"]):
        for dtype in dtypes_for(backend)[:2]:
            x = to_layout(make_input((2, 2, 7, 9), dtype, kind), layout)
            check_backward(x, 3, 1, 1, grad=grad)
            check_backward(x, (2, 3), (1, 2), (1, 1), (2, 1), True, grad=grad)


def test_backward_channel_blocks(backend):
    """More channels than one block of the CPU kernels (64), overlapping and disjoint windows, with a padded
    last block, in a float type and a half type (summed in a float buffer)."""
    for dtype in dtypes_for(backend)[::-1][:2]:
        x = to_layout(make_input((1, 70, 5, 6), dtype, "ties"), "channels_last")
        check_backward(x, 3, 1, 1)
        check_backward(x, 2, 2, 0, 1, True)


@pytest.mark.parametrize("padding", [0, 1])
def test_backward_two_wide_windows_rows(backend, padding):
    """2x2 stride-2 windows over NCHW rows (the CPU kernel's vectorised column pairs, eight windows a step):
    rows of fewer windows than a step, of several steps and a remainder, odd widths and heights (a last column
    and row in no window), padding (edge windows with one column outside), ceil_mode, float and half types."""
    for dtype in dtypes_for(backend)[:2]:
        for W in (2, 3, 16, 17, 41):
            x = make_input((2, 3, 5, W), dtype, "ties" if W % 2 else "randn")
            check_backward(x, 2, 2, padding, 1, ceil_mode=W == 17)


def test_backward_3d_input(backend):
    x = make_input((2, 6, 7), torch.float32, "ties")
    check_backward(x, 3, 2, 1)


def test_backward_bf16_float64(backend):
    if backend == "triton":
        pytest.skip("bf16/float64 are not run through Triton's interpreter (no bf16 arithmetic)")
    for dtype in (torch.bfloat16, torch.float64):
        x = make_input((2, 2, 7, 8), dtype, "ties")
        check_backward(x, 3, 1, 1)
        check_backward(to_layout(x, "channels_last"), 2, 2, 0, 1, True)


def test_backward_saves_narrow_offsets(backend):
    """Without return_indices the op returns (and autograd saves) an int8 window offset, not int64."""
    x = torch.randn(1, 2, 6, 6)
    out, argmax = torch.ops.fastseg.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False)
    assert argmax.dtype == torch.int8
    out, argmax = torch.ops.fastseg.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, True)
    assert argmax.dtype == torch.int64


def test_double_backward_refuses_loudly(backend):
    """Double backward is not implemented: differentiating the backward raises, naming the op (it must never
    return a silently wrong or zero gradient)."""
    x = make_input((1, 2, 5, 6), torch.float64, "ties").requires_grad_()
    v = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fastseg.max_pool2d(x, 2, 1), x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="max_pool2d_backward"):
        torch.autograd.grad((g * torch.randn_like(g)).sum(), v)


# --------------------------------------------------------------------------------------------------------------
# max_unpool2d
# --------------------------------------------------------------------------------------------------------------
UNPOOL_BACKENDS = ("reference", "triton", "aten")


@pytest.fixture(params=UNPOOL_BACKENDS)
def unpool_backend(request):
    """Runs an unpool test under fastseg.backend(name) for every backend of max_unpool2d that can run here."""
    assert has_impl("max_unpool2d", request.param)
    skip_unless_backend(request.param)
    with fastseg.backend(request.param):
        yield request.param


def pooling_under(backend):
    """fastseg's pooling inside an unpool test: on the test's backend, or "auto" where max_pool2d has none."""
    return fastseg.backend(backend if has_impl("max_pool2d", backend) else "auto")


UNPOOL_CASES = [
    pytest.param((2, 3, 8, 10), 2, None, 0, id="k2"),
    pytest.param((1, 2, 7, 9), 3, 2, 1, id="k3s2p1"),
    pytest.param((2, 2, 7, 7), 3, 1, 1, id="k3s1p1-overlap"),
    pytest.param((1, 3, 5, 11), (2, 3), (2, 1), (1, 0), id="k2x3"),
    pytest.param((3, 6, 8), 2, 2, 0, id="3d"),
]


@pytest.mark.parametrize("shape,k,s,p", UNPOOL_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_unpool_round_trip(unpool_backend, shape, k, s, p, layout):
    """pool -> unpool gives the same tensor through torch and fastseg, from torch's indices and from fastseg's
    (overlapping windows give duplicate indices, all with the same value)."""
    x = make_input(shape, torch.float32, "ties")
    if len(shape) == 4:
        x = to_layout(x, layout)
    out, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    expected = F.max_unpool2d(out, idx, k, s, p, output_size=x.shape[-2:])
    got = fastseg.max_unpool2d(out, idx, k, s, p, output_size=x.shape[-2:])
    assert_same(got, expected, "unpool of torch's pooling")
    assert got.stride() == expected.stride(), f"unpool output strides {got.stride()} != torch's {expected.stride()}"
    with pooling_under(unpool_backend):
        fout, fidx = fastseg.max_pool2d_with_indices(x, k, s, p)
    got2 = fastseg.max_unpool2d(fout, fidx, k, s, p, output_size=x.shape[-2:])
    assert_same(got2, expected, "unpool of fastseg's pooling")
    kk, ss, pp, _ = norm_args(k, s, p, 1)
    if all((out.shape[-2 + i] - 1) * ss[i] + kk[i] - 2 * pp[i] == x.shape[-2 + i] for i in range(2)):
        assert_same(fastseg.max_unpool2d(out, idx, k, s, p), F.max_unpool2d(out, idx, k, s, p), "default size")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=str)
def test_unpool_dtypes(unpool_backend, dtype):
    if dtype not in dtypes_for(unpool_backend):
        pytest.skip(f"{dtype} is not run on the {unpool_backend} backend on CPU (Triton's interpreter)")
    x = make_input((2, 2, 6, 8), dtype, "mixed")
    out, idx = F.max_pool2d(x.double(), 2, return_indices=True)
    out = out.to(dtype)
    assert_same(fastseg.max_unpool2d(out, idx, 2), F.max_unpool2d(out, idx, 2))


def test_unpool_mixed_layouts(unpool_backend):
    """Values and indices in different layouts (and a non-contiguous view)."""
    x = make_input((2, 3, 8, 10), torch.float32, "unique")
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    for lo, li in [("nchw", "channels_last"), ("channels_last", "nchw"), ("strided", "transposed"),
                   ("transposed", "strided")]:
        o, i = to_layout(out, lo), to_layout(idx, li)
        assert_same(fastseg.max_unpool2d(o, i, 2), F.max_unpool2d(o, i, 2), f"values {lo}, indices {li}")


def test_unpool_output_size_variants(unpool_backend):
    x = torch.randn(2, 3, 9, 11)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    for size in [(9, 11), (9, 10), [1, 1, 9, 10], torch.Size([2, 3, 8, 11])]:  # every plane holds index 86
        assert_same(
            fastseg.max_unpool2d(out, idx, 2, output_size=size),
            F.max_unpool2d(out, idx, 2, output_size=size),
            f"output_size={size}",
        )


def test_unpool_duplicate_indices_any_one_wins(unpool_backend):
    """Random indices with many duplicates: each output element is 0 where no index points, else one of the
    values whose index points there."""
    N, C, H, W, OH, OW = 2, 2, 4, 5, 7, 9  # an output_size kernel 2 allows for a 4x5 input
    x = make_input((N, C, H, W), torch.float32, "unique") + 1.0  # distinct and non-zero
    idx = torch.randint(0, 5, (N, C, H, W))  # only 5 targets: heavy duplication
    idx[..., -1, -1] = OH * OW - 1
    got = fastseg.max_unpool2d(x, idx, 2, output_size=(OH, OW))
    assert got.shape == (N, C, OH, OW)
    for n in range(N):
        for c in range(C):
            flat = got[n, c].reshape(-1)
            for j in range(OH * OW):
                candidates = x[n, c].reshape(-1)[idx[n, c].reshape(-1) == j]
                if candidates.numel() == 0:
                    assert flat[j].item() == 0.0, f"[{n},{c}].flat[{j}] should be 0, got {flat[j].item()}"
                else:
                    assert bool((candidates == flat[j]).any()), (
                        f"[{n},{c}].flat[{j}] = {flat[j].item()} is none of {candidates.tolist()}")


def test_unpool_gradient(unpool_backend):
    """Gradient of max_unpool2d == torch's (a gather, exact), including duplicate indices."""
    for layout in ("nchw", "channels_last"):
        x = to_layout(make_input((2, 3, 5, 6), torch.float32, "unique"), layout)
        out, idx = F.max_pool2d(x, 3, 1, 1, return_indices=True)  # overlapping: duplicate indices
        a = out.detach().clone().requires_grad_()
        b = out.detach().clone().requires_grad_()
        ut = F.max_unpool2d(a, idx, 3, 1, 1, output_size=x.shape[-2:])
        uf = fastseg.max_unpool2d(b, idx, 3, 1, 1, output_size=x.shape[-2:])
        g = torch.randn_like(ut)
        (ga,) = torch.autograd.grad(ut, a, g)
        (gb,) = torch.autograd.grad(uf, b, g)
        assert_same(gb, ga, "unpool gradient")


def test_pool_unpool_chain_gradient(unpool_backend):
    """SegNet's pattern: pool with indices, unpool with them; gradient to the input == torch's."""
    x = make_input((2, 2, 8, 9), torch.float32, "ties")
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    o, i = F.max_pool2d(xa, 2, return_indices=True)
    ya = F.max_unpool2d(o * 2, i, 2, output_size=x.shape[-2:])
    with pooling_under(unpool_backend):
        o, i = fastseg.max_pool2d_with_indices(xb, 2)
    yb = fastseg.max_unpool2d(o * 2, i, 2, output_size=x.shape[-2:])
    assert_same(yb, ya)
    g = torch.randn_like(ya)
    assert_same(torch.autograd.grad(yb, xb, g)[0], torch.autograd.grad(ya, xa, g)[0], "chain gradient")


def _raises_like_torch(torch_fn, fast_fn, pattern):
    with pytest.raises(Exception) as expected:
        torch_fn()
    with pytest.raises(expected.type, match=f"(?i){pattern}"):
        fast_fn()


def test_unpool_bad_arguments_raise_like_torch(unpool_backend):
    x = torch.randn(1, 2, 4, 4)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    cases = [
        (dict(output_size=(9, 9)), out, idx, r"output_size"),
        (dict(output_size=(4,)), out, idx, r"output_size"),
        (dict(output_size=(1, 2, 3)), out, idx, r"output_size"),
        ({}, out, idx[..., :1], r"shape"),
        ({}, out, idx.float(), r"int64|indices"),
        ({}, out, idx * 100, r"invalid|index"),  # out of range: CPU raises, as torch's CPU kernel
        ({}, out, idx - 100, r"invalid|index"),
        (dict(output_size=(3, 3)), out, idx, r"invalid|index"),
    ]
    for kwargs, o, i, pattern in cases:
        _raises_like_torch(
            lambda: F.max_unpool2d(o, i, 2, **kwargs), lambda: fastseg.max_unpool2d(o, i, 2, **kwargs), pattern
        )


# --------------------------------------------------------------------------------------------------------------
# nn modules
# --------------------------------------------------------------------------------------------------------------
POOL_CTORS = [
    ((2,), {}),
    ((3, 2, 1), {}),
    ((3,), dict(stride=2, padding=1, dilation=2, ceil_mode=True)),
    (((2, 3), (1, 2), (1, 0), (2, 1), True, True), {}),
    ((3,), dict(return_indices=True)),
]


@pytest.mark.parametrize("args,kwargs", POOL_CTORS)
def test_nn_maxpool2d_matches_torch_module(args, kwargs):
    ours, theirs = fastseg.nn.MaxPool2d(*args, **kwargs), torch.nn.MaxPool2d(*args, **kwargs)
    assert isinstance(ours, torch.nn.Module)
    for name in ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 3, 9, 8), torch.float32, "mixed")
    a, b = ours(x), theirs(x)
    if ours.return_indices:
        assert_same(a[0], b[0])
        assert_same(a[1], b[1])
    else:
        assert_same(a, b)


@pytest.mark.parametrize("args,kwargs", [((2,), {}), ((3, 2, 1), {}), (((2, 3),), dict(stride=(1, 2), padding=(1, 1)))])
def test_nn_maxunpool2d_matches_torch_module(args, kwargs):
    ours, theirs = fastseg.nn.MaxUnpool2d(*args, **kwargs), torch.nn.MaxUnpool2d(*args, **kwargs)
    for name in ("kernel_size", "stride", "padding"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    x = make_input((2, 3, 9, 8), torch.float32, "unique")
    pool = torch.nn.MaxPool2d(*args, **kwargs, return_indices=True)
    o, i = pool(x)
    assert_same(ours(o, i, output_size=x.shape), theirs(o, i, output_size=x.shape))
    assert_same(ours(o, i, output_size=x.shape[-2:]), theirs(o, i, output_size=x.shape[-2:]))
    k, s, p = ours.kernel_size, ours.stride, ours.padding
    if all((o.shape[-2 + j] - 1) * s[j] + k[j] - 2 * p[j] == x.shape[-2 + j] for j in range(2)):
        assert_same(ours(o, i), theirs(o, i))


class _SegNetish(torch.nn.Module):
    def __init__(self, pool_cls, unpool_cls, use_unpool=True):
        super().__init__()
        self.use_unpool = use_unpool
        self.enc = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pool_cls(2, return_indices=True)
        self.pool2 = pool_cls(3, stride=1, padding=1)
        self.mid = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.unpool = unpool_cls(2)
        self.dec = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.enc(x))
        y, idx = self.pool(y)
        y = self.pool2(torch.relu(self.mid(y)))
        if self.use_unpool:
            y = self.unpool(y, idx, output_size=x.shape[-2:])
        return self.dec(y)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_swapped_model_identical(backend, layout):
    """A model built with torch.nn's pooling, its state loaded into the same model built with fastseg.nn's:
    identical outputs and parameter gradients (up to summation order of the conv backward)."""
    unpool = has_impl("max_unpool2d", backend)
    theirs = _SegNetish(torch.nn.MaxPool2d, torch.nn.MaxUnpool2d, unpool)
    ours = _SegNetish(fastseg.nn.MaxPool2d, fastseg.nn.MaxUnpool2d, unpool)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = to_layout(torch.randn(2, 3, 10, 11), layout)
    a, b = theirs(x), ours(x)
    assert_same(b, a, "model output")
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, pa), (_, pb) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


# --------------------------------------------------------------------------------------------------------------
# registered custom ops: opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------------
def _opcheck_cases(dtype=torch.float32, device="cpu", unpool=True):
    x = make_input((2, 3, 7, 9), dtype, "randn", device)
    xcl = x.contiguous(memory_format=torch.channels_last)
    cases = []
    for inp in (x, xcl):
        for ri in (False, True):
            cases.append((torch.ops.fastseg.max_pool2d.default, (inp, [3, 3], [2, 2], [1, 1], [1, 1], True, ri)))
        cases.append((torch.ops.fastseg.max_pool2d.default, (inp, [2, 3], [1, 2], [1, 0], [2, 1], False, False)))
    out, argmax = torch.ops.fastseg.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, False)
    g = torch.randn_like(out)
    _, idx = torch.ops.fastseg.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, True)
    for am in (argmax, idx):
        cases.append((torch.ops.fastseg.max_pool2d_backward.default, (g, am, [7, 9], [3, 3], [2, 2], [1, 1], [1, 1])))
    if not unpool:
        return cases
    o2, i2 = torch.ops.fastseg.max_pool2d(xcl, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    cases.append((torch.ops.fastseg.max_unpool2d.default, (o2, i2, [7, 9])))
    cases.append((torch.ops.fastseg.max_unpool2d_backward.default, (torch.randn(2, 3, 7, 9, dtype=dtype, device=device), i2)))
    return cases


def test_opcheck(backend):
    for op, args in _opcheck_cases(unpool=has_impl("max_unpool2d", backend)):
        torch.library.opcheck(op, args)


def test_custom_op_schemas():
    """The ops and argument orders the spec names."""
    x = torch.randn(1, 2, 12, 13)
    out, am = torch.ops.fastseg.max_pool2d(x, [12, 12], [1, 1], [6, 6], [1, 1], False, False)
    assert am.dtype == torch.int16, "a 144-tap window needs int16 offsets"
    out, am = torch.ops.fastseg.max_pool2d(x, [11, 11], [1, 1], [5, 5], [1, 1], False, False)
    assert am.dtype == torch.int8, "a 121-tap window fits int8 offsets"
    o, idx = torch.ops.fastseg.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    et, ei = F.max_pool2d(x, 2, return_indices=True)
    assert_same(o, et)
    assert_same(idx, ei)
    u = torch.ops.fastseg.max_unpool2d(o, idx, [12, 13])
    assert_same(u, F.max_unpool2d(et, ei, 2, output_size=(12, 13)))
    g = torch.randn_like(u)
    assert_same(torch.ops.fastseg.max_unpool2d_backward(g, idx), g.reshape(1, 2, -1).gather(2, idx.reshape(1, 2, -1)).view_as(idx))


@pytest.mark.parametrize("with_indices", [False, True])
def test_custom_op_backward_both_encodings(backend, with_indices):
    """torch.ops.fastseg.max_pool2d_backward from int8 offsets and from int64 indices == torch's gradient."""
    x = make_input((2, 2, 7, 9), torch.float32, "ties")
    k, s, p, d = [3, 2], [1, 2], [1, 1], [1, 2]
    out, am = torch.ops.fastseg.max_pool2d(x, k, s, p, d, True, with_indices)
    xt = x.double().requires_grad_()
    ref = F.max_pool2d(xt, k, s, p, d, True)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(ref, xt, g.double())
    got = torch.ops.fastseg.max_pool2d_backward(g, am, [7, 9], k, s, p, d)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


class _Small(torch.nn.Module):
    def __init__(self, use_unpool=True):
        super().__init__()
        self.use_unpool = use_unpool
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.pool = fastseg.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.pool_i = fastseg.nn.MaxPool2d(2, return_indices=True)
        self.unpool = fastseg.nn.MaxUnpool2d(2)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        z, i = self.pool_i(y)
        if not self.use_unpool:
            return z
        return self.unpool(z * 2, i, output_size=y.shape[-2:]) + y


def _check_compiled(model, x, compile_backend):
    eager_x = x.clone().requires_grad_()
    comp_x = x.clone().requires_grad_()
    expected = model(eager_x)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    got = compiled(comp_x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(expected)
    expected.backward(g)
    got.backward(g)
    torch.testing.assert_close(comp_x.grad, eager_x.grad, rtol=1e-5, atol=1e-5)


def test_compile_aot_eager(backend):
    torch._dynamo.reset()
    model = _Small(has_impl("max_unpool2d", backend))
    _check_compiled(model, torch.randn(2, 2, 11, 10), "aot_eager")
    _check_compiled(model, torch.randn(1, 2, 9, 12).contiguous(memory_format=torch.channels_last), "aot_eager")


@pytest.mark.slow
def test_compile_inductor_cpu():
    torch._dynamo.reset()
    _check_compiled(_Small(), torch.randn(2, 2, 11, 10), "inductor")


# --------------------------------------------------------------------------------------------------------------
# the out-style kernels, one backend at a time, poisoned outputs
# --------------------------------------------------------------------------------------------------------------
def _kernel_impl(name, device="cpu"):
    """(forward, backward) callables of one kernel backend with the contract's argument order."""
    skip_unless_backend(name, device)
    if name == "triton":
        from fastseg.ops import max_pool_kernels as K

        return K.forward, K.backward
    return torch.ops.fastseg.ext_max_pool2d_out, torch.ops.fastseg.ext_max_pool2d_backward_out


def _out_buffer(shape, dtype, device, layout):
    """A poisoned output in `layout`; for "strided" a view into a wider poisoned buffer (returned too, so the
    test can check the kernel wrote nothing outside the view)."""
    n, c, h, w = shape
    if layout == "strided":
        base = poison_(torch.empty((n, c, h, 2 * w + 1), dtype=dtype, device=device))
        return base[..., 1::2], base
    t = torch.empty(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return poison_(t), None


def _assert_outside_view_untouched(base, what):
    if base is None:
        return
    outside = base[..., 0::2]
    if outside.is_floating_point():
        assert bool(torch.isnan(outside).all()), f"{what}: kernel wrote outside its output view"
    else:
        assert bool((outside == INT_SENTINEL).all()), f"{what}: kernel wrote outside its output view"


OUT_LAYOUTS = ["nchw", "channels_last", "strided"]


def kernel_forward_case(fwd, x, kernel_size, stride, padding, dilation, ceil_mode, argmax_dtype, out_layout,
                        argmax_layout=None):
    """Forward kernel into poisoned out / argmax (argmax in another layout than out unless given)."""
    if argmax_layout is None:
        argmax_layout = OUT_LAYOUTS[(OUT_LAYOUTS.index(out_layout) + 1) % len(OUT_LAYOUTS)]
    k, s, p, d = norm_args(kernel_size, stride, padding, dilation)
    H, W = x.shape[-2:]
    OH, OW = (pool_out_size((H, W)[i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(2))
    exp_out, exp_idx = torch_max_pool(x, k, s, p, d, ceil_mode)
    assert exp_out.shape[-2:] == (OH, OW)
    out, out_base = _out_buffer((x.shape[0], x.shape[1], OH, OW), x.dtype, x.device, out_layout)
    am, am_base = _out_buffer((x.shape[0], x.shape[1], OH, OW), argmax_dtype, x.device, argmax_layout)
    fwd(x, out, am, k, s, p, d)
    assert_same(out, exp_out.to(x.device), "kernel out")
    if argmax_dtype == torch.int64:
        assert_same(am, exp_idx.to(x.device), "kernel argmax (int64 plane indices)")
    else:
        exp_off = window_offsets_from_indices(exp_idx, k, s, p, d, W).to(argmax_dtype)
        assert_same(am, exp_off.to(x.device), f"kernel argmax ({argmax_dtype} window offsets)")
    _assert_outside_view_untouched(out_base, "out")
    _assert_outside_view_untouched(am_base, "argmax")
    return out, am, exp_idx


def kernel_backward_case(bwd, am, exp_idx, x, kernel_size, stride, padding, dilation, in_layout):
    """Backward kernel: grad_in from grad_out and the argmax (either encoding) == scatter of torch's indices,
    every element written (poisoned first). grad_out comes in yet another layout."""
    k, s, p, d = norm_args(kernel_size, stride, padding, dilation)
    N, C, H, W = x.shape
    g = torch.randn(am.shape, dtype=torch.float64).to(x.dtype)
    g_layout = OUT_LAYOUTS[(OUT_LAYOUTS.index(in_layout) + 2) % len(OUT_LAYOUTS)]
    g = to_layout(g, g_layout)
    exp_idx = exp_idx.cpu()
    expected = torch.zeros(N, C, H * W, dtype=torch.float64)
    inside = (exp_idx >= 0) & (exp_idx < H * W)
    expected.scatter_add_(
        2, torch.where(inside, exp_idx, 0).reshape(N, C, -1), torch.where(inside, g.double(), 0).reshape(N, C, -1)
    )
    expected = expected.view(N, C, H, W)
    grad_in, base = _out_buffer((N, C, H, W), x.dtype, x.device, in_layout)
    bwd(g.to(x.device), am, grad_in, k, s, p, d)
    _assert_outside_view_untouched(base, "grad_in")
    assert not bool(torch.isnan(grad_in).any()), "backward kernel left poisoned (unwritten) elements"
    if _overlapping(k, s, d):
        eps = torch.finfo(x.dtype).eps if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(grad_in.cpu().double(), expected, rtol=eps, atol=1e-5)
    else:
        assert_same(grad_in.cpu(), expected.to(x.dtype), "backward kernel grad_in")
    return grad_in


KERNEL_PARAMS = [pytest.param(i, c.values[0], id=c.id) for i, c in enumerate(CONFIGS[1::4])]
ARGMAX_DTYPES = [torch.int64, torch.int8, torch.int16, torch.int32]


@pytest.mark.parametrize("impl", ["triton", "extension"])
@pytest.mark.parametrize("i,cfg", KERNEL_PARAMS)
def test_kernels_poisoned(impl, i, cfg):
    fwd, bwd = _kernel_impl(impl)
    dtype = pick_dtype(impl, cfg["dtype_slot"])
    shape = cfg["shape"] if len(cfg["shape"]) == 4 else (1, *cfg["shape"])
    x = to_layout(make_input(shape, dtype, cfg["kind"]), cfg["layout"])
    argmax_dtype = ARGMAX_DTYPES[i % len(ARGMAX_DTYPES)]
    out_layout = ["nchw", "channels_last", "strided"][i % 3]
    k, s, p, d, ceil_mode = pool_args(cfg)
    _, am, exp_idx = kernel_forward_case(fwd, x, k, s, p, d, ceil_mode, argmax_dtype, out_layout)
    if cfg["kind"] in ("randn", "ties", "neginf"):  # NaN inputs: the backward only sees the argmax anyway
        kernel_backward_case(bwd, am, exp_idx, x, k, s, p, d, ["strided", "nchw", "channels_last"][i % 3])


def test_extension_baseline_simd_target():
    """ATEN_CPU_CAPABILITY=default selects the C++ kernels built for the baseline target (16-byte vectors), which
    must match torch too (the in-process tests run the AVX2 build on CPUs that have AVX2)."""
    skip_unless_backend("extension")
    run_at_baseline_simd_target("""
        import itertools, torch, fastseg
        from conftest import make_input, to_layout
        from test_max_pool import KINDS, ARGMAX_DTYPES, check_forward, kernel_forward_case
        with fastseg.backend("extension"):
            for dtype, layout in itertools.product(
                    (torch.float32, torch.float16, torch.bfloat16, torch.float64), ("channels_last", "nchw")):
                for kind in KINDS:
                    x = to_layout(make_input((2, 70, 7, 19), dtype, kind), layout)
                    check_forward(x, 3, 1, 1, 1, False)
                    check_forward(x, (2, 3), (2, 1), (1, 0), (1, 2), True)
                for argmax_dtype in ARGMAX_DTYPES:
                    kernel_forward_case(torch.ops.fastseg.ext_max_pool2d_out, x, 3, 2, 1, 1, False, argmax_dtype,
                                        layout, layout)
                for k, s in ((2, 2), (3, 2)):  # the backward of disjoint windows, and the scatter
                    x = to_layout(make_input((2, 70, 8, 21), dtype), layout)
                    x.requires_grad_()
                    out = fastseg.max_pool2d(x, k, s)
                    g = torch.randn_like(out)
                    # overlapping windows: the sums rounded once (torch's CPU kernel adds in the half type)
                    expected = torch.autograd.grad(torch.nn.functional.max_pool2d(x.double(), k, s), x, g.double())[0]
                    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], expected)
        print("ok")
    """)


@pytest.mark.parametrize("impl", ["triton", "extension"])
@pytest.mark.parametrize("argmax_dtype", ARGMAX_DTYPES, ids=str)
def test_kernels_every_encoding(impl, argmax_dtype):
    fwd, bwd = _kernel_impl(impl)
    for dtype in dtypes_for(impl)[:2]:
        x = make_input((2, 2, 7, 9), dtype, "ties")
        for layout in ("nchw", "channels_last", "strided"):
            _, am, idx = kernel_forward_case(fwd, x, 3, 1, 1, 1, False, argmax_dtype, layout)
            kernel_backward_case(bwd, am, idx, x, 3, 1, 1, 1, layout)
            _, am, idx = kernel_forward_case(fwd, to_layout(x, "strided"), (2, 3), 2, (1, 0), 2, True, argmax_dtype, layout)
            kernel_backward_case(bwd, am, idx, x, (2, 3), 2, (1, 0), 2, layout)


@pytest.mark.parametrize("impl", ["triton", "extension"])
def test_kernels_big_window_int16(impl):
    fwd, bwd = _kernel_impl(impl)
    x = make_input((1, 2, 12, 13), torch.float32, "ties")
    _, am, idx = kernel_forward_case(fwd, x, (12, 12), 1, (6, 6), 1, False, torch.int16, "nchw")
    kernel_backward_case(bwd, am, idx, x, (12, 12), 1, (6, 6), 1, "nchw")


@pytest.mark.parametrize("impl", ["triton", "extension"])
def test_kernels_degenerate_window(impl):
    fwd, _ = _kernel_impl(impl)
    x = torch.randn(1, 2, 1, 4)
    out, am, _ = kernel_forward_case(fwd, x, (2, 1), 1, (1, 0), (2, 1), False, torch.int64, "nchw")
    assert bool(torch.isneginf(out).all())
    for argmax_dtype in (torch.int64, torch.int8):  # channels-contiguous everywhere: the C++ channel-block scan
        kernel_forward_case(fwd, x.contiguous(memory_format=torch.channels_last), (2, 1), 1, (1, 0), (2, 1), False,
                            argmax_dtype, "channels_last", "channels_last")
    out = torch.empty(1, 2, 1, 4)
    am = torch.full((1, 2, 1, 4), INT_SENTINEL, dtype=torch.int8)
    fwd(x, poison_(out), am, (2, 1), (1, 1), (1, 0), (2, 1))
    assert bool((am == 1).all()), f"no tap in bounds: argmax should encode the first tap at or after 0 (r=1): {am}"


def test_extension_float64_bf16_kernels():
    fwd, bwd = _kernel_impl("extension")
    for dtype in (torch.float64, torch.bfloat16):
        x = make_input((2, 3, 7, 9), dtype, "mixed")
        kernel_forward_case(fwd, x, 3, 1, 1, 1, False, torch.int8, "channels_last")
        x = make_input((2, 3, 7, 9), dtype, "ties")
        _, am, idx = kernel_forward_case(fwd, x, 3, 2, 1, 1, True, torch.int64, "nchw")
        kernel_backward_case(bwd, am, idx, x, 3, 2, 1, 1, "strided")


@pytest.mark.parametrize("impl", ["triton", "extension"])
def test_kernels_offsets_past_int32(impl):
    """NCHW tensors whose channel offsets pass 2**31 (conftest.channels_far_apart), float16 with int8 window
    offsets: the forward reads x and writes out and argmax there, the backward writes grad_in there, each in
    64-bit offsets (32-bit channel offsets wrap past channel 1). The same values, argmax and gradient as torch."""
    fwd, bwd = _kernel_impl(impl)
    k, s, p, d = norm_args(2, 2, 0, 1)
    x = channels_far_apart((1, 3, 7, 5), torch.float16)
    x.copy_(make_input((1, 3, 7, 5), torch.float16, "ties"))
    exp_out, exp_idx = torch_max_pool(x, k, s, p, d, True)
    out = channels_far_apart(exp_out.shape, torch.float16)
    am = channels_far_apart(exp_out.shape, torch.int8)
    fwd(x, out, am, k, s, p, d)
    assert_same(out, exp_out, "out")
    assert_same(am, window_offsets_from_indices(exp_idx, k, s, p, d, 5).to(torch.int8), "argmax")
    g = torch.randn(exp_out.shape).to(torch.float16)
    expected = torch.zeros(1, 3, 35, dtype=torch.float16).scatter_(2, exp_idx.reshape(1, 3, -1), g.reshape(1, 3, -1))
    grad_in = channels_far_apart(x.shape, torch.float16)
    bwd(g, am, grad_in, k, s, p, d)
    assert_same(grad_in, expected.view(1, 3, 7, 5), "grad_in")


# --- unpool kernels (Triton only: the extension has no unpool) --------------------------------------------------
def _unpool_kernels():
    skip_unless_backend("triton")
    from fastseg.ops import max_pool_kernels as K

    return K.unpool, K.unpool_backward


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_unpool_kernels(index_dtype, layout):
    unpool, unpool_backward = _unpool_kernels()
    N, C, H, W, OH, OW = 2, 3, 4, 5, 8, 9
    x = to_layout(make_input((N, C, H, W), torch.float32, "unique") + 1.0, layout)
    idx = torch.stack([torch.randperm(OH * OW)[: H * W] for _ in range(N * C)]).view(N, C, H, W)
    idx[0, 0, 0, 0] = -1  # out of range on both sides: skipped, never written out of bounds
    idx[1, 2, 3, 4] = OH * OW
    idx = to_layout(idx, layout).to(index_dtype)

    # out: zero-filled by the wrapper; a view into a poisoned buffer, so writes outside it show
    base = poison_(torch.empty(N, C, OH, 2 * OW + 1))
    out = base[..., 1::2] if layout == "strided" else base[..., 1 : OW + 1]
    out.zero_()
    unpool(x, idx, out)
    inside = (idx >= 0) & (idx < OH * OW)
    expected = torch.zeros(N, C, OH * OW + 1)  # the last slot takes the out-of-range entries
    expected.scatter_(2, torch.where(inside, idx, OH * OW).long().reshape(N, C, -1), x.reshape(N, C, -1))
    assert_same(out, expected[..., :-1].reshape(N, C, OH, OW), "unpool kernel")
    mask = torch.ones_like(base, dtype=torch.bool)
    if layout == "strided":
        mask[..., 1::2] = False
    else:
        mask[..., 1 : OW + 1] = False
    assert bool(torch.isnan(base[mask]).all()), "unpool kernel wrote outside its output"

    g = make_input((N, C, OH, OW), torch.float32, "randn")
    grad_in, gbase = _out_buffer((N, C, H, W), torch.float32, "cpu", layout)
    unpool_backward(g, idx, grad_in)
    exp = g.reshape(N, C, -1).gather(2, torch.where(inside, idx, 0).long().reshape(N, C, -1)).view(N, C, H, W)
    exp = torch.where(inside, exp, 0.0)
    assert_same(grad_in, exp, "unpool backward kernel")
    _assert_outside_view_untouched(gbase, "unpool grad_in")


# --------------------------------------------------------------------------------------------------------------
# the plain-PyTorch reference
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS[2::5])
def test_reference_matches_torch(cfg):
    from fastseg.ops.max_pool import reference_max_pool2d

    shape = cfg["shape"] if len(cfg["shape"]) == 4 else (1, *cfg["shape"])
    x = to_layout(make_input(shape, torch.float32, cfg["kind"]), cfg["layout"])
    k, s, p, d, ceil_mode = pool_args(cfg)
    k, s, p, d = norm_args(k, s, p, d)
    exp_out, exp_idx = torch_max_pool(x, k, s, p, d, ceil_mode)
    out, off = reference_max_pool2d(x, k, s, p, d, tuple(exp_out.shape[-2:]))
    assert off.dtype == torch.int64
    assert_same(out, exp_out, "reference values")
    assert_same(off, window_offsets_from_indices(exp_idx, k, s, p, d, x.shape[-1]), "reference window offsets")


@pytest.mark.parametrize("k,s,p,d,ceil_mode", [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (1, 1), (1, 1), (1, 1), False),
    ((2, 3), (1, 2), (1, 1), (2, 1), True),
])
def test_reference_gradcheck(k, s, p, d, ceil_mode):
    from fastseg.ops.max_pool import reference_max_pool2d

    x = make_input((1, 2, 6, 7), torch.float64, "unique").requires_grad_()
    size = torch_max_pool(x.detach(), k, s, p, d, ceil_mode)[0].shape[-2:]
    torch.autograd.gradcheck(lambda t: reference_max_pool2d(t, k, s, p, d, tuple(size))[0], (x,))


# --------------------------------------------------------------------------------------------------------------
# fuzz: a few random configurations per run, on top of the fixed matrix
# --------------------------------------------------------------------------------------------------------------
def test_fuzz_random_configs(backend, seed):
    rng = random.Random(seed)
    done = 0
    while done < 4:
        kh, kw = rng.randint(1, 4), rng.randint(1, 4)
        k = (kh, kw)
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, kh // 2), rng.randint(0, kw // 2))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        ceil_mode = rng.random() < 0.5
        shape = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 12), rng.randint(1, 12))
        if not _valid(shape, k, s, p, d, ceil_mode):
            continue
        dtype = rng.choice(dtypes_for(backend))
        x = to_layout(make_input(shape, dtype, rng.choice(KINDS)), rng.choice(LAYOUTS))
        print(f"fuzz case: shape={shape} k={k} s={s} p={p} d={d} ceil={ceil_mode} dtype={dtype}")
        check_forward(x, k, s, p, d, ceil_mode)
        if not _overlapping(k, s, d):
            check_backward(x.nan_to_num(0.0), k, s, p, d, ceil_mode)
        done += 1


# --------------------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu tests)
#
# benchmarks/gpu_check.sh gives these about 90 s on an H100, Triton compiles included: most tests share one
# pooling configuration (GPU_CFG) so the kernels compile for few constexpr combinations.
# --------------------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GPU_CFG = (3, 2, 1, 1, True)  # kernel, stride, padding, dilation, ceil_mode: overlapping windows, padding, ceil
GPU_CFG_RECT = ((2, 3), (1, 2), (1, 1), (2, 1), False)  # rectangular, dilated


def _cuda_backends():
    names = ["triton"]
    if extension_available() and fastseg.build_info().get("cuda_kernels"):
        names.append("extension")
    return names


@pytest.fixture(params=["triton", "extension"])
def cuda_backend(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "extension":
        if not extension_available():
            pytest.skip("fastseg._C is not built: run `python setup.py build_ext --inplace`")
        if not fastseg.build_info().get("cuda_kernels"):
            pytest.skip("fastseg._C was built without CUDA kernels (FASTSEG_CUDA=1 to force them)")
    with fastseg.backend(request.param):
        yield request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_forward_backward_large(cuda_backend, dtype, layout):
    """8x64x257x263 (odd sizes) with NaN, +-inf and ties: values, indices, strides == torch's; gradients."""
    x = to_layout(make_input((8, 64, 257, 263), dtype, "mixed", "cuda"), layout)
    check_forward(x, *GPU_CFG)
    check_forward(x[..., 1:-2:2], *GPU_CFG)  # a strided view
    xs = to_layout(make_input((4, 16, 67, 73), dtype, "ties", "cuda"), layout)
    check_backward(xs, *GPU_CFG)
    check_backward(xs, *GPU_CFG, grad="sum")


@pytest.mark.gpu
def test_gpu_rectangular_dilated(cuda_backend):
    for layout in ("nchw", "channels_last"):
        x = to_layout(make_input((4, 16, 67, 73), torch.float32, "mixed", "cuda"), layout)
        check_forward(x, *GPU_CFG_RECT)
        check_backward(x.nan_to_num(0.0), *GPU_CFG_RECT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_nan_ties_neginf(cuda_backend, dtype):
    for kind in KINDS:
        for layout in LAYOUTS:
            check_forward(to_layout(make_input((4, 8, 37, 41), dtype, kind, "cuda"), layout), *GPU_CFG)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_twins_identical(dtype):
    """The CUDA twin and the Triton kernels: bit-identical out, argmax (both encodings) and grad_in."""
    if "extension" not in _cuda_backends():
        pytest.skip("fastseg._C with CUDA kernels is not built")
    from fastseg.ops import max_pool_kernels as K

    x = make_input((4, 32, 129, 131), dtype, "mixed", "cuda").contiguous(memory_format=torch.channels_last)
    k, s, p, d = norm_args(*GPU_CFG[:4])
    OH, OW = (pool_out_size(x.shape[2 + i], k[i], s[i], p[i], d[i], GPU_CFG[4]) for i in range(2))
    twins = ((K.forward, K.backward),
             (torch.ops.fastseg.ext_max_pool2d_out, torch.ops.fastseg.ext_max_pool2d_backward_out))
    for am_dtype in (torch.int64, torch.int8):
        g = torch.randn(4, 32, OH, OW, device="cuda").to(dtype)
        results = []
        for fwd, bwd in twins:
            out = poison_(torch.empty(4, 32, OH, OW, dtype=dtype, device="cuda"))
            am = poison_(torch.empty(4, 32, OH, OW, dtype=am_dtype, device="cuda"))
            fwd(x, out, am, k, s, p, d)
            gi = poison_(torch.empty_like(x))
            bwd(g, am, gi, k, s, p, d)
            results.append((out, am, gi))
        for what, a, b in zip(("out", "argmax", "grad_in"), *results):
            assert_same(a, b, f"triton vs CUDA twin: {what} ({am_dtype})")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """More than 2**31 elements: every offset past 2**31 must be computed in 64 bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    shape = (2, 16, 8192, 8200)  # 2.15e9 fp16 elements, 4.3 GB
    numel = 2 * 16 * 8192 * 8200
    assert numel > 2**31
    need = 8 * numel + (1 << 30)  # x, and out + int64 indices (numel / 4 each) for fastseg and for torch
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(shape, dtype=torch.float16, device="cuda")
    x.normal_()
    x[-1, -1, -2:, -2:] = 7.0  # a maximum in the last window, far past 2**31
    x[-1, -1, -1, -1] = 9.0
    for name in _cuda_backends():
        with fastseg.backend(name):
            exp_out, exp_idx = F.max_pool2d(x, 2, return_indices=True)
            out, idx = fastseg.max_pool2d_with_indices(x, 2)
            assert_same(out, exp_out, f"{name} values")
            assert_same(idx, exp_idx, f"{name} indices")
            assert out[-1, -1, -1, -1].item() == 9.0
            assert idx[-1, -1, -1, -1].item() == 8192 * 8200 - 1
            del out, idx, exp_out, exp_idx
            torch.cuda.empty_cache()
            xr = x.detach().requires_grad_()
            out = fastseg.max_pool2d(xr, 2)
            (g,) = torch.autograd.grad(out, xr, torch.ones_like(out))
            assert g[-1, -1, -1, -1].item() == 1.0 and g[-1, -1, -2, -2].item() == 0.0
            assert g.sum(dtype=torch.float64).item() == out.numel()
            del out, g, xr
            torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_opcheck(cuda_backend):
    for op, args in _opcheck_cases(torch.float16, "cuda", has_impl("max_unpool2d", cuda_backend)):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_gpu_compile_inductor(cuda_backend):
    torch._dynamo.reset()
    model = _Small(has_impl("max_unpool2d", cuda_backend)).cuda()
    x = torch.randn(2, 2, 33, 31, device="cuda").contiguous(memory_format=torch.channels_last)
    _check_compiled(model, x, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_unpool(cuda_backend, layout):
    skip_unless_unpool(cuda_backend)
    x = to_layout(make_input((4, 16, 64, 66), torch.float32, "unique", "cuda"), layout)
    out, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    expected = F.max_unpool2d(out, idx, 3, 2, 1, output_size=x.shape[-2:])
    got = fastseg.max_unpool2d(out, idx, 3, 2, 1, output_size=x.shape[-2:])
    assert_same(got, expected)
    assert got.stride() == expected.stride()
    a = out.clone().requires_grad_()
    b = out.clone().requires_grad_()
    g = torch.randn_like(expected)
    (ga,) = torch.autograd.grad(fastseg.max_unpool2d(a, idx, 3, 2, 1, output_size=x.shape[-2:]), a, g)
    (gb,) = torch.autograd.grad(F.max_unpool2d(b, idx, 3, 2, 1, output_size=x.shape[-2:]), b, g)
    assert_same(ga, gb)


def test_suggested_memory_format_is_torchs():
    """The eager fast path of the output-layout choice == torch's suggest_memory_format, on random sizes
    (0 and 1 included), permuted strides, slices and broadcasts."""
    from torch._prims_common import suggest_memory_format

    from fastseg.ops.max_pool import _suggested_memory_format

    for _ in range(500):
        shape = [int(v) for v in torch.randint(0, 5, (4,))]
        perm = torch.randperm(4).tolist()
        permuted = torch.empty([shape[i] for i in perm]).permute(*[perm.index(i) for i in range(4)])
        dense = torch.empty(shape)
        for t in (dense, permuted, dense.contiguous(memory_format=torch.channels_last), permuted[:, :, ::2],
                  permuted[..., 1:], torch.empty(1, shape[1], 1, 1).expand(shape[0], -1, shape[2], shape[3])):
            assert _suggested_memory_format(t) == suggest_memory_format(t), (tuple(t.shape), t.stride())
