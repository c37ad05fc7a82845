"""Shared test setup for fastseg.

Runs before any test module, so it decides TRITON_INTERPRET before anything imports triton: without a CUDA
device the Triton kernels can only run on CPU tensors through the interpreter.

Helpers for the test modules live here too (they import them: `from conftest import ...`).

Random inputs are fresh on every run. Each test gets its own seed (printed when the test fails); set
FASTSEG_TEST_SEED=<seed> to replay a failure.
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import torch
import torch.utils._python_dispatch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import triton now, under that setting: its language module's own @jit functions (tl.zeros, ...) are made
    # interpreted or compiled at import. Imported later by chance (torch._dynamo imports it) inside a test that
    # sets TRITON_INTERPRET=0, they would be compiled ones, and every later interpreted kernel calling them fails.
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass

import random
import secrets

import numpy as np
import pytest

NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"
NO_EXTENSION_REASON = (
    "fastseg._C is not built: run `python setup.py build_ext --inplace` (CI builds it, so these tests run there)"
)
NO_TRITON_CPU_REASON = "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
# CI (.ci/run) sets FASTSEG_REQUIRE_TEST_DEPS=1: what it installs (the compiled extension, pydensecrf) must be
# there, so that a broken build or install fails the tests that need it instead of skipping them.
REQUIRE_TEST_DEPS = os.environ.get("FASTSEG_REQUIRE_TEST_DEPS") == "1"

BACKENDS = ("reference", "triton", "extension")


# --------------------------------------------------------------------------------------------------------------
# markers, seeds
# --------------------------------------------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run them with `pytest -m gpu tests`")
    config.addinivalue_line("markers", "slow: takes tens of seconds on a 2-core CPU; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test (or FASTSEG_TEST_SEED), applied to torch, numpy and random."""
    s = int(os.environ.get("FASTSEG_TEST_SEED") or secrets.randbits(31))
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    request.node._fastseg_seed = s
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    s = getattr(item, "_fastseg_seed", None)
    if rep.failed and s is not None:
        rep.sections.append(("fastseg seed", f"rerun with FASTSEG_TEST_SEED={s} to get the same random inputs"))


# --------------------------------------------------------------------------------------------------------------
# what is available
# --------------------------------------------------------------------------------------------------------------
def triton_runs_on_cpu():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def extension_available():
    """True when fastseg._C is loaded and its kernel ops are registered; False when it was never built (a source
    checkout: its tests skip). A compiled extension that is there but does not load (a bad build, another
    torch), or none at all under REQUIRE_TEST_DEPS, raises: its tests must fail, not skip."""
    import fastseg
    from fastseg import _backend

    if _backend.extension() is not None and hasattr(torch.ops.fastseg, "ext_max_pool2d_out"):
        return True
    built = [name for name in os.listdir(os.path.dirname(fastseg.__file__)) if name.startswith("_C.")]
    if built or REQUIRE_TEST_DEPS:
        raise RuntimeError(f"fastseg._C ({', '.join(built) or 'not built'}) does not load or lacks its ops: "
                           f"{_backend.extension_error()}")
    return False


def skip_unless_backend(name, device="cpu"):
    """Skip the calling test when backend `name` cannot run on `device` here."""
    if name == "extension" and not extension_available():
        pytest.skip(NO_EXTENSION_REASON)
    if name == "triton" and device == "cpu" and not triton_runs_on_cpu():
        pytest.skip(NO_TRITON_CPU_REASON)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
INT_SENTINEL = -7


def poison_(t):
    """Fill t with garbage a kernel must overwrite: NaN for floats, -7 for integers."""
    with torch.no_grad():
        t.fill_(float("nan") if t.is_floating_point() else INT_SENTINEL)
    return t


@contextlib.contextmanager
def nan_filled_allocations():
    """Inside, every tensor torch allocates starts as NaN (integers: their largest value), the ones the C++ and
    CUDA kernels allocate for their outputs (at::empty) included: torch's deterministic mode fills
    uninitialised memory. An output element a kernel leaves unwritten then fails the comparison. Ops without a
    deterministic implementation only warn (warn_only)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


@pytest.fixture
def nan_filled():
    """nan_filled_allocations() around the test: the test modules of kernels that allocate their own outputs use
    it for every test (pytest.mark.usefixtures("nan_filled"))."""
    with nan_filled_allocations():
        yield


def channels_far_apart(shape, dtype):
    """A poisoned (1, C, H, W) tensor whose channels lie 2**30 elements apart in one buffer: from channel 2 on, a
    channel's offset passes 2**31, as in an image of more than 2**31 elements, so kernels need 64-bit offsets,
    with few elements (the rest of the buffer is never written, so never paged in)."""
    _, C, H, W = shape
    try:
        buffer = torch.empty((C - 1) * 2**30 + H * W, dtype=dtype)
    except RuntimeError as error:  # a machine that refuses to reserve the address space (overcommit off)
        pytest.skip(f"cannot reserve a {(C - 1) * 2**30 * dtype.itemsize / 2**30:.0f} GiB sparse buffer: {error}")
    return poison_(buffer.as_strided(shape, (C * 2**30, 2**30, W, 1)))


def poisoned(shape, dtype, device="cpu", layout="nchw"):
    """A freshly poisoned (N, C, H, W) output in the given layout ("nchw", "channels_last" or "strided", the
    last a non-contiguous view into a larger buffer whose other elements are poisoned too)."""
    if layout == "strided":
        n, c, h, w = shape
        base = poison_(torch.empty((n, c, h, 2 * w + 1), dtype=dtype, device=device))
        return base[..., 1::2]
    t = torch.empty(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return poison_(t)


def to_layout(x, layout):
    """x (any rank-4 tensor) with the same values in layout "nchw", "channels_last", "strided" (every other
    element of a wider tensor) or "transposed" (a permuted view of a tensor stored (N, W, H, C))."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        n, c, h, w = x.shape
        fill = float("nan") if x.is_floating_point() else INT_SENTINEL
        base = torch.full((n, c, h, 2 * w), fill, dtype=x.dtype, device=x.device)
        base[..., ::2] = x
        return base[..., ::2]
    if layout == "transposed":
        return x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    raise ValueError(layout)


LAYOUTS = ("nchw", "channels_last", "strided", "transposed")


def make_input(shape, dtype=torch.float32, kind="randn", device="cpu"):
    """Random input of one of these kinds:
    randn  - normal values, almost surely no ties;
    ties   - small integers, many equal maxima in a window;
    nan    - normal values with NaN at random positions (several per window at times);
    nanwin - whole 3x3 blocks of NaN plus random NaNs;
    neginf - -inf at random positions and whole -inf blocks;
    mixed  - integers with NaN, -inf and +inf sprinkled in;
    unique - a permutation of distinct values (no ties, for gradcheck)."""
    numel = int(np.prod(shape))
    if kind == "unique":
        x = torch.randperm(numel, dtype=torch.float64, device=device).reshape(shape) / max(numel, 1) - 0.5
        return x.to(dtype=dtype)
    if kind in ("ties", "mixed"):
        x = torch.randint(-3, 4, shape, device=device).to(torch.float64)
    else:
        x = torch.randn(shape, dtype=torch.float64, device=device)

    def sprinkle(p, value):
        x[torch.rand(shape, device=device) < p] = value

    if kind in ("nan", "nanwin", "mixed"):
        sprinkle(0.15, float("nan"))
    if kind in ("nanwin", "neginf"):
        fill = float("nan") if kind == "nanwin" else float("-inf")
        h, w = shape[-2], shape[-1]
        for _ in range(2):
            i, j = random.randrange(h), random.randrange(w)
            x[..., i : i + 3, j : j + 3] = fill
    if kind == "neginf":
        sprinkle(0.2, float("-inf"))
    if kind == "mixed":
        sprinkle(0.1, float("-inf"))
        sprinkle(0.05, float("inf"))
    return x.to(dtype=dtype)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def pool_out_size(size, k, s, p, d, ceil_mode):
    """PyTorch's pooling output size (one dimension)."""
    num = size + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def window_offsets_from_indices(idx, kernel_size, stride, padding, dilation, in_w):
    """Turn torch's int64 plane indices (ih * W + iw) of an (N, C, OH, OW) pooling result into the compact
    window offsets r * kw + c of the contract."""
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    oh = torch.arange(idx.shape[-2], device=idx.device).view(-1, 1)
    ow = torch.arange(idx.shape[-1], device=idx.device).view(1, -1)
    ih = torch.div(idx, in_w, rounding_mode="floor")
    iw = idx - ih * in_w
    r = ih - (oh * sh - ph)
    c = iw - (ow * sw - pw)
    assert bool(((r % dh) == 0).all() and ((c % dw) == 0).all()), "torch index is not a tap of its window"
    r, c = r // dh, c // dw
    assert bool(((r >= 0) & (r < kh) & (c >= 0) & (c < kw)).all()), "torch index outside its window"
    return r * kw + c


def assert_same(actual, expected, what="values"):
    """Exact equality, NaN == NaN, same dtype and shape; the message says where the first mismatch is."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    a, e = actual, expected
    if a.is_floating_point():
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    else:
        same = a == e
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
            f"got {a[first].item()!r}, expected {e[first].item()!r}"
        )


def torch_max_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """PyTorch's (out, int64 indices). Computed on CPU in float64 for half types (exact: every fp16 / bf16
    value is a float64 value, so comparisons and therefore indices are the same) and cast back."""
    import torch.nn.functional as F

    xd = x.double() if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" else x
    out, idx = F.max_pool2d(xd, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    if x.device.type == "cuda":
        # torch's channels_last CUDA kernel starts every window's argmax at 0 rather than at the window's first
        # tap, so a window holding only -inf reports index 0; its NCHW CUDA kernel and the CPU kernels report
        # the first tap, which is the contract fastseg follows in every layout (CONTRACT_max_pool.md).
        nchw_idx = F.max_pool2d(xd.contiguous(), kernel_size, stride, padding, dilation, ceil_mode,
                                return_indices=True)[1]
        idx = torch.empty_like(idx).copy_(nchw_idx)  # the indices torch gives, in the strides torch gives
    return out.to(x.dtype), idx


class DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the operators a block of code dispatches, in order (a custom op counts once: what it runs
    inside is not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def run_at_baseline_simd_target(script):
    """Runs a Python script (dedented; it must print "ok" last) in a process whose CPU kernels are those built for
    the baseline SIMD target: ATEN_CPU_CAPABILITY=default lowers torch's capability, which fastseg's C++ kernels
    follow (csrc/common/cpu_target.h); the tests and the repository are on its path."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([tests, os.path.dirname(tests), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
