"""fastseg's CUDA kernels, run on the CPU by tests/cuda_emulation, against the CPU kernels.

The .cu sources are compiled as C++ (each CUDA thread a fiber, warp shuffles exchanged between the 32 fibers
of a warp; cuda_emulation.h) and registered as torch.ops.fastseg_cuda_emu.*, so their host code (allocation
sizes, strides, the order of the passes, launch configurations, grid-stride loops that wrap around: the
emulated device has one multiprocessor) and every kernel run here as written, without a GPU. Races, the memory
model and speed stay for the GPU tests (-m gpu, benchmarks/gpu_check.sh).

Outputs are NaN-filled before each call (the ops' own allocations through the nan_filled fixture), so an element
no kernel writes fails the comparison.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import LAYOUTS, REQUIRE_TEST_DEPS, extension_available, to_layout

pytestmark = [
    pytest.mark.skipif(not extension_available(), reason="fastseg._C is not built: nothing to compare against"),
    pytest.mark.usefixtures("nan_filled"),
]


# Set by test_kernels_under_address_sanitizer for the run of this module it starts.
ADDRESS_SANITIZER = os.environ.get("FASTSEG_CUDA_EMULATION_ASAN") == "1"


@pytest.fixture(scope="module")
def emu():
    from cuda_emulation import build

    try:
        return build.load(address_sanitizer=ADDRESS_SANITIZER)
    except Exception as error:  # no compiler or ninja here: CI has both and must not skip
        if REQUIRE_TEST_DEPS:
            raise
        pytest.skip(f"the CUDA emulation did not build: {str(error).splitlines()[0]}")


# --------------------------------------------------------------------------------------------------------------
# max-pooling
# --------------------------------------------------------------------------------------------------------------
POOL_CASES = [  # kernel, stride, padding, dilation, ceil_mode
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 2), (1, 3), (1, 0), (2, 1), False),
    ((2, 3), (3, 2), (1, 1), (2, 2), True),
]


def _pool_output(x, k, s, p, d, ceil_mode):
    out = torch.nn.functional.max_pool2d(x, k, s, p, d, ceil_mode)
    return out.shape[2], out.shape[3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argmax_dtype", [torch.int8, torch.int64])
def test_max_pool_matches_cpu_kernel(emu, dtype, layout, argmax_dtype):
    """Forward (values and argmax) and backward of the CUDA kernels equal the CPU kernels' bit for bit (both run
    the shared per-element math, pool/max_pool_math.h), with NaNs and ties in the input."""
    for k, s, p, d, ceil_mode in POOL_CASES:
        x = torch.randn(2, 5, 11, 9).round().to(dtype)  # rounded: ties
        x[0, 1, 3, 4] = float("nan")
        x = to_layout(x, layout)
        OH, OW = _pool_output(x.float(), k, s, p, d, ceil_mode)
        grad_out = to_layout(torch.randn(2, 5, OH, OW).to(dtype), layout)
        results = []
        for ops in (torch.ops.fastseg, emu):
            out = to_layout(torch.full((2, 5, OH, OW), float("nan"), dtype=dtype), layout)
            argmax = to_layout(torch.full((2, 5, OH, OW), -99, dtype=argmax_dtype), layout)
            ops.ext_max_pool2d_out(x, out, argmax, k, s, p, d)
            grad_in = to_layout(torch.full(x.shape, float("nan"), dtype=dtype), layout)
            ops.ext_max_pool2d_backward_out(grad_out, argmax, grad_in, k, s, p, d)
            results.append((out, argmax, grad_in))
        for cpu, cuda in zip(*results):
            assert torch.equal(cpu.isnan(), cuda.isnan()), (k, s, p, d)
            assert torch.equal(cpu.nan_to_num(), cuda.nan_to_num()), (k, s, p, d)
        assert not results[1][2].isnan()[torch.isfinite(x)].any()  # every gradient written


# --------------------------------------------------------------------------------------------------------------
# the permutohedral lattice
# --------------------------------------------------------------------------------------------------------------
def _features(B, d, N, dtype, layout="contiguous"):
    f = torch.randn(B, d, N, dtype=dtype) * 3
    return f.transpose(1, 2).contiguous().transpose(1, 2) if layout == "points_major" else f


def _vertex_map(cpu_tables, cuda_tables):
    """Per image, the CUDA build's vertex ids renamed to the CPU build's (the builds number vertices in different
    orders): the two builds put each (point, simplex corner) at the same place of splat_vertex."""
    maps = []
    for b in range(cpu_tables[0].shape[0]):
        M = int(cuda_tables[3][b])
        rename = torch.full((M,), -1, dtype=torch.long)
        rename[cuda_tables[0][b].reshape(-1).long()] = cpu_tables[0][b].reshape(-1).long()
        assert bool((rename >= 0).all()), "a CUDA vertex no point touches"
        assert rename.unique().numel() == M, "two CUDA vertices for one CPU vertex"
        maps.append(rename)
    return maps


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lattice_build_matches_cpu_build(emu, d, dtype):
    """The CUDA build finds the CPU build's lattice: the same vertex counts and barycentric weights, and after
    renaming its vertices, the same neighbours and the same splat CSR rows."""
    B, N = 3, 61
    features = _features(B, d, N, dtype)
    features[1] *= 0.2  # images of different vertex counts: padding vertices in the smaller ones
    cpu = torch.ops.fastseg.ext_lattice_build(features)
    cuda = emu.ext_lattice_build(features)
    assert [t.shape[:2] for t in cpu] == [t.shape[:2] for t in cuda]
    assert [t.dtype for t in cpu] == [t.dtype for t in cuda]
    splat_vertex, splat_weight, neighbors, num_vertices, offsets, points, points_weight = cuda
    assert torch.equal(num_vertices, cpu[3])
    assert torch.equal(splat_weight, cpu[1])
    assert neighbors.shape == cpu[2].shape and offsets.shape == cpu[4].shape
    for b, rename in enumerate(_vertex_map(cpu, cuda)):
        M = rename.numel()
        mapped = torch.where(neighbors[b, :, :M] >= 0, rename[neighbors[b, :, :M].long().clamp(min=0)], -1)
        assert torch.equal(mapped, cpu[2][b][:, rename].long())  # CUDA vertex v is CPU vertex rename[v]
        assert bool((neighbors[b, :, M:] == -1).all())  # padding vertices: no neighbours
        cuda_rows = offsets[b].diff()
        cpu_rows = cpu[4][b].diff()
        assert torch.equal(cuda_rows[:M], cpu_rows[rename]) and not cuda_rows[M:].any()
        for v in range(M):  # each row: the same points (ascending) with the same weights
            lo, hi = int(offsets[b, v]), int(offsets[b, v + 1])
            clo, chi = int(cpu[4][b, rename[v]]), int(cpu[4][b, rename[v] + 1])
            assert torch.equal(points[b, lo:hi], cpu[5][b, clo:chi])
            assert torch.equal(points_weight[b, lo:hi], cpu[6][b, clo:chi])


def test_lattice_build_rejects_bad_points(emu):
    features = _features(2, 3, 40, torch.float32)
    features[1, 2, 17] = float("nan")
    with pytest.raises(ValueError, match="image 1 point 17"):
        emu.ext_lattice_build(features)
    features[1, 2, 17] = 1e30  # too large for the int32 keys
    with pytest.raises(ValueError, match="image 1 point 17"):
        emu.ext_lattice_build(features)
    empty = emu.ext_lattice_build(torch.empty(2, 3, 0))
    assert empty[0].shape == (2, 0, 4) and not empty[3].any()


def _strides(t):
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 3, 40])
def test_lattice_filter_matches_cpu_filter(emu, d, dtype, C):
    """The CUDA filter (its splat cut into chunks: a row longer than a chunk of 64 entries comes from features
    that crowd onto few vertices) against the CPU filter, forward and reverse, on either build's tables, with
    the CPU filter's output strides."""
    B, N = 2, 300
    features = _features(B, d, N, dtype) * 0.05  # few vertices, long rows
    features[1] *= 40
    cpu_tables = torch.ops.fastseg.ext_lattice_build(features)
    cuda_tables = emu.ext_lattice_build(features)
    longest_row = int(cpu_tables[4].diff().max())
    assert longest_row > 64
    for values in (torch.randn(B, C, N, dtype=dtype), torch.randn(B, N, C, dtype=dtype).transpose(1, 2)):
        for reverse in (False, True):
            expected = torch.ops.fastseg.ext_lattice_filter(values, *cpu_tables, reverse)
            # The two filters add the same terms in different orders (the CUDA splat in chunks). Each result is
            # within (n - 1) eps sum|terms| of the exact one, n the terms on an output's path: a splat row, then
            # per axis the blur's two neighbours, then the slice's d + 1 vertices; sum|terms| is the filter of
            # |values|. So they differ by at most twice that (first order in eps).
            terms = longest_row + 3 * (d + 1)
            bound = 2 * terms * torch.finfo(dtype).eps * torch.ops.fastseg.ext_lattice_filter(
                values.abs(), *cpu_tables, reverse)
            for tables in (cpu_tables, cuda_tables):
                got = emu.ext_lattice_filter(values, *tables, reverse)
                assert _strides(got) == _strides(expected)
                excess = (got - expected).abs() - bound
                assert excess.max() <= 0, f"filter differs by {excess.max():.3g} beyond the rounding bound"


# --------------------------------------------------------------------------------------------------------------
# dense-CRF mean field
# --------------------------------------------------------------------------------------------------------------
def _crf_tables(ops, B, N, dtype, shared_gaussian, seed):
    """A Gaussian term over a 1-D grid (one lattice for the batch when shared_gaussian) and a bilateral term per
    image (position and three colour channels), built by ops.ext_lattice_build."""
    g = torch.Generator().manual_seed(seed)
    position = (torch.arange(N, dtype=dtype) / 2.0).view(1, 1, N)
    colour = torch.rand(B, 3, N, generator=g, dtype=dtype) * 10
    gaussian = position if shared_gaussian else position.expand(B, 1, N)
    bilateral = torch.cat([position.expand(B, 1, N) / 3.0, colour], 1)
    return [ops.ext_lattice_build(f.contiguous()) for f in (gaussian, bilateral)]


def _mean_field(ops, logits, tables, normalization, weight, compat, iterations):
    return ops.ext_crf_mean_field(logits, *([t[i] for t in tables] for i in range(7)), list(normalization),
                                  list(weight), list(compat), iterations)


def _crf_tol(dtype):
    # the CUDA splat sums chunk rows, the CPU kernel scatters point by point: float32 sums round apart
    return dict(rtol=1e-4, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_mean_field_matches_cpu_kernel(emu, dtype, normalization, compat):
    """Two terms, a Gaussian lattice shared by the batch or one per image; strided logits; the CUDA kernel on the
    CPU build's tables and on its own."""
    B, L, N = 2, 5, 83
    for shared_gaussian in (True, False):
        cpu_tables = _crf_tables(torch.ops.fastseg, B, N, dtype, shared_gaussian, seed=1)
        cuda_tables = _crf_tables(emu, B, N, dtype, shared_gaussian, seed=1)
        logits = (3 * torch.randn(B, N, L, dtype=dtype)).transpose(1, 2)
        matrices = [torch.randn(L, L, dtype=dtype) if compat == "matrix" else None for _ in range(2)]
        weight = [1.0, 1.0] if compat == "matrix" else [3.0, 5.0]
        for iterations in (0, 1, 4):
            args = ([normalization] * 2, weight, matrices, iterations)
            expected = _mean_field(torch.ops.fastseg, logits, cpu_tables, *args)
            for tables in (cpu_tables, cuda_tables):
                torch.testing.assert_close(_mean_field(emu, logits, tables, *args), expected, **_crf_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 9, 21, 40, 70])
def test_mean_field_label_layouts(emu, dtype, L):
    """Every layout of the update kernel's groups (G = 1 .. 32 lanes per point; 1, 2 or 4 labels per lane in
    registers, or more through the rows of Q), whose softmax runs on warp shuffles."""
    B, N = 2, 37
    tables = _crf_tables(torch.ops.fastseg, B, N, dtype, True, seed=2)
    logits = 4 * torch.randn(B, L, N, dtype=dtype)
    args = (["symmetric"] * 2, [3.0, 5.0], [None, None], 3)
    torch.testing.assert_close(_mean_field(emu, logits, tables, *args),
                               _mean_field(torch.ops.fastseg, logits, tables, *args), **_crf_tol(dtype))


def test_mean_field_many_terms(emu):
    """More Potts terms than the update kernel slices itself (the rest through the message buffer), mixed with
    matrix terms, each with its own normalisation."""
    B, L, N, dtype = 2, 6, 45, torch.float64
    pairs = [_crf_tables(torch.ops.fastseg, B, N, dtype, shared, seed) for seed, shared in enumerate([True, False] * 2)]
    tables = [t for pair in pairs for t in pair]  # eight terms
    normalization = ["symmetric", "before", "after", "none"] * 2
    weight = [1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.5, 1.0]
    compat = [None, None, None, torch.randn(L, L, dtype=dtype), None, torch.randn(L, L, dtype=dtype), None, None]
    logits = 3 * torch.randn(B, L, N, dtype=dtype)
    args = (normalization, weight, compat, 3)
    torch.testing.assert_close(_mean_field(emu, logits, tables, *args),
                               _mean_field(torch.ops.fastseg, logits, tables, *args), **_crf_tol(dtype))


def test_mean_field_malformed_tables_stay_in_bounds(emu):
    """Out-of-range ids and overlapping splat rows, which the CUDA kernel clamps instead of validating: wrong
    numbers but finite ones, computed from in-bounds reads (a read past a table would be garbage or NaN here)."""
    B, L, N, dtype = 1, 4, 30, torch.float32
    tables = _crf_tables(torch.ops.fastseg, B, N, dtype, True, seed=3)
    logits = torch.randn(B, L, N, dtype=dtype)
    args = (["symmetric"] * 2, [3.0, 5.0], [None, None], 2)
    E = tables[0][5].shape[1]
    backwards = tables[0][4].clone()
    backwards[0, 1::2], backwards[0, 2::2] = E, 0  # rows overlap: more chunks than the kernel sizes for
    for table, index, value in ((0, (0, 3, 1), 10**6), (2, (0, 0, 0, 1), 10**6), (4, (0, 2), 2**31 - 1),
                                (5, (0, 5), -7), (4, None, backwards)):
        broken = [list(t) for t in tables]
        if index is None:
            broken[0][table] = value
        else:
            broken[0][table] = broken[0][table].clone()
            broken[0][table][index] = value
        q = _mean_field(emu, logits, broken, *args)
        assert q.shape == (B, L, N) and bool(torch.isfinite(q).all())


# --------------------------------------------------------------------------------------------------------------
# every test above, with the kernels' memory accesses checked
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(ADDRESS_SANITIZER, reason="this test starts the sanitized run itself")
def test_kernels_under_address_sanitizer(emu):
    """This module's tests again (the mean field's normalisations but "symmetric" left out: the sanitized fibers
    run several times slower), in a process of their own with the emulation compiled with AddressSanitizer: a
    kernel's read or write outside a tensor's memory (say an id that the CUDA kernels' clamping misses in
    test_mean_field_malformed_tables_stay_in_bounds) aborts that run with a report, which fails this test."""
    from cuda_emulation import build

    env = dict(build.asan_environment(), FASTSEG_CUDA_EMULATION_ASAN="1")
    selection = "not address_sanitizer and not (mean_field_matches_cpu_kernel and not symmetric)"
    # -s: the sanitizer's report goes to the process's stderr, not to pytest's capture (lost when it aborts)
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-s", "-p", "no:xdist", "-p",
                          "no:cacheprovider", "-k", selection], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, f"the sanitized run failed:\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
