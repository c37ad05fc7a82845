"""The dense CRF's fused inference: ext_crf_mean_field (every mean-field iteration, and the normalisations,
in one call) against the differentiable torch loop of fastseg.ops.crf.mean_field, on real lattices; its
errors, its determinism across thread counts, both of the CPU kernel's SIMD targets, and when mean_field takes
it. The CUDA kernel's tests (marked gpu) compare it with the CPU kernel and the torch loop.

The op allocates its output; the CPU tests first free a NaN-filled block of the output's size so that the
allocator is likely to hand the op poisoned memory, which the op must overwrite entirely.
"""

import pytest
import torch

from conftest import extension_available, run_at_baseline_simd_target

import fastseg
import fastseg.ops.crf as crf_ops

pytestmark = [
    pytest.mark.skipif(not (extension_available() and hasattr(torch.ops.fastseg, "ext_crf_mean_field")),
                       reason="fastseg._C is not built (or predates ext_crf_mean_field)"),
    # the fused kernels allocate their outputs and buffers themselves: NaN-filled, so nothing unwritten passes
    pytest.mark.usefixtures("nan_filled"),
]

DTYPES = (torch.float32, torch.float64)


def _terms(B, spatial, dtype, normalization="symmetric", compat="potts", L=None, shared_gaussian=True, seed=0,
           device="cpu", build_dtype=None):
    """A Gaussian term over the grid (one lattice for the batch when shared_gaussian) and a bilateral one per
    image, as dense_crf builds them, with the given normalisation and compatibility; the same seed gives the
    same terms on every device. build_dtype: the terms built in that dtype from the same values (drawn in
    dtype), e.g. float64 copies of float32 terms."""
    g = torch.Generator().manual_seed(seed)
    N = 1
    for s in spatial:
        N *= s
    coords = crf_ops._coordinates(spatial, [2.0] * len(spatial), "cpu", dtype).reshape(1, len(spatial), N)
    colour = torch.rand(B, 3, N, generator=g, dtype=dtype) * 255 / 20.0
    gaussian = coords if shared_gaussian else coords.expand(B, -1, -1)
    bilateral = torch.cat([coords.expand(B, -1, -1) / 3.0, colour], 1)
    compat_of = {
        "potts": lambda w: w,
        "tensor_weight": lambda w: torch.tensor(w, dtype=torch.float64),
        "diagonal": lambda w: -w * torch.rand(L, generator=g, dtype=dtype).to(device),
        "matrix": lambda w: w * torch.randn(L, L, generator=g, dtype=dtype).to(device),
    }[compat]
    build_dtype = build_dtype or dtype

    def cast(c):
        return c.to(build_dtype) if isinstance(c, torch.Tensor) and c.is_floating_point() and c.dtype == dtype else c

    return [crf_ops.PairwiseTerm.build(f.contiguous().to(device, build_dtype), cast(compat_of(w)), normalization)
            for f, w in ((gaussian, 3.0), (bilateral, 5.0))]


def _torch_loop(logits, terms, iterations, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(crf_ops, "_can_fuse", lambda *a: False)
        return crf_ops.mean_field(logits, terms, iterations)


def _tol(dtype):
    # iterated float32 updates whose exp and sums round differently (a few ulp each) drift by ~1e-6
    return dict(rtol=1e-4, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


def _fused(logits, terms, iterations):
    B, L, N = logits.shape
    q = crf_ops._mean_field_fused(logits, terms, iterations)
    assert q.shape == (B, L, N) and q.dtype == logits.dtype and q.is_contiguous()
    assert bool(torch.isfinite(q).all())
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
@pytest.mark.parametrize("compat", ["potts", "tensor_weight", "diagonal", "matrix"])
def test_matches_torch_loop(dtype, normalization, compat, monkeypatch):
    """float64: the fused op and the torch loop agree to rounding. float32: the fused op's error against the
    same problem in float64 stays within a multiple of the float32 torch loop's own error (the flash-attention
    criterion): unnormalised filters with a random matrix compatibility make logits of hundreds, where one
    rounding moves Q by 1e-4, so no fixed absolute bound fits every draw (seed 1013076712 reached 7.8e-5 between
    the two float32 results, past the 3e-5 of _tol). The fused kernel's exp is a ~1 ulp polynomial and its splat
    sums float32 chunk rows: its error ran up to 8.8x the loop's over 960 draws (60 seeds, every case here);
    16x leaves margin, and a wrong term or normalisation lands orders of magnitude past it."""
    B, L, spatial = 2, 7, (13, 17)
    terms = _terms(B, spatial, dtype, normalization, compat, L)
    logits = 3 * torch.randn(B, L, 13 * 17, dtype=dtype)
    q = _fused(logits, terms, 4)
    assert all(t._scales is None for t in terms)  # the op normalised; the Python filter never ran
    loop = _torch_loop(logits, terms, 4, monkeypatch)
    if dtype == torch.float64:
        torch.testing.assert_close(q, loop, **_tol(dtype))
        return
    exact = _torch_loop(logits.double(), _terms(B, spatial, dtype, normalization, compat, L,
                                                build_dtype=torch.float64), 4, monkeypatch)
    fused_error = float((q.double() - exact).abs().max())
    torch_error = float((loop.double() - exact).abs().max())
    assert fused_error <= 16 * torch_error + 1e-6, (
        f"fused float32 error {fused_error:.2e} against float64, the torch loop's {torch_error:.2e}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 3, 8, 21, 33, 70])  # one, several, and more SIMD vectors than the fixed kernels
@pytest.mark.parametrize("shared_gaussian", [True, False])
def test_label_counts_and_batches(dtype, L, shared_gaussian, monkeypatch):
    B, spatial = 2, (9, 11)
    terms = _terms(B, spatial, dtype, L=L, shared_gaussian=shared_gaussian)
    logits = 4 * torch.randn(B, L, 99, dtype=dtype)
    q = _fused(logits, terms, 3)
    torch.testing.assert_close(q, _torch_loop(logits, terms, 3, monkeypatch), **_tol(dtype))


@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_iterations_and_strided_logits(iterations, monkeypatch):
    terms = _terms(1, (10, 12), torch.float32)
    logits = (5 * torch.randn(1, 120, 6)).transpose(1, 2)  # [B, L, N] with unit label stride
    q = _fused(logits, terms, iterations)
    torch.testing.assert_close(q, _torch_loop(logits, terms, iterations, monkeypatch), **_tol(torch.float32))
    if iterations == 0:
        torch.testing.assert_close(q, torch.softmax(logits, 1), rtol=1e-6, atol=1e-7)


def test_many_chunks_and_thread_counts(monkeypatch):
    """Enough points for several chunks of the splat (8192 points each): the same bits on one thread and on
    all of them, and the torch loop's result."""
    terms = _terms(2, (160, 110), torch.float32, shared_gaussian=False)
    logits = 3 * torch.randn(2, 5, 160 * 110)
    q = _fused(logits, terms, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = _fused(logits, terms, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(q, one_thread)
    assert torch.equal(q, _fused(logits, terms, 3))
    torch.testing.assert_close(q, _torch_loop(logits, terms, 3, monkeypatch), **_tol(torch.float32))


def test_extremes():
    """Huge logit gaps: exp underflows to 0 for the losers, never NaN; no terms: softmax."""
    logits = torch.tensor([[[0.0], [-200.0], [100.0], [100.0], [-1e4]]])
    q = torch.ops.fastseg.ext_crf_mean_field(logits, [], [], [], [], [], [], [], [], [], [], 3)
    torch.testing.assert_close(q, torch.softmax(logits, 1), rtol=1e-6, atol=1e-30)


def test_baseline_simd_target():
    """ATEN_CPU_CAPABILITY=default selects the kernels built for the baseline target (16-byte vectors), which
    must agree with the torch loop too (the in-process tests run the AVX2 kernels on CPUs that have them)."""
    run_at_baseline_simd_target("""
        import torch, fastseg.ops.crf as crf_ops
        from test_crf_fused import _terms
        for dtype, L in ((torch.float32, 21), (torch.float32, 70), (torch.float64, 5)):
            terms = _terms(2, (12, 9), dtype, compat="matrix", L=L, shared_gaussian=False)
            logits = 3 * torch.randn(2, L, 108, dtype=dtype)
            fused = crf_ops._mean_field_fused(logits, terms, 3)
            crf_ops._can_fuse = lambda *a: False
            loop = crf_ops.mean_field(logits, terms, 3)
            del crf_ops._can_fuse
            tol = dict(rtol=1e-4, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(fused, loop, **tol)
        print("ok")
    """)


def _op_args(logits, terms, iterations, normalization=None, weight=None, compat=None):
    """ext_crf_mean_field's arguments for these terms (as _mean_field_fused passes them, unless overridden)."""
    fused = [crf_ops._FusedTerm(t, logits.dtype) for t in terms]
    return (logits, *([list(f.tables)[i] for f in fused] for i in range(7)),
            list(normalization or [f.normalization for f in fused]), list(weight or [f.weight for f in fused]),
            list(compat or [f.compat for f in fused]), iterations)


def _call_with(args, term, table, value):
    """ext_crf_mean_field(*args) with table `table` (0..6) of term `term` replaced."""
    tables = list(args[1 + table])
    tables[term] = value
    return torch.ops.fastseg.ext_crf_mean_field(*args[:1 + table], tables, *args[2 + table:])


def test_errors():
    terms = _terms(1, (5, 6), torch.float32)
    tables = [f.tables for f in (crf_ops._FusedTerm(t, torch.float32) for t in terms)]
    logits = torch.randn(1, 4, 30)

    def call(lg=logits, tabs=tables, normalization=("symmetric", "symmetric"), weight=(1.0, 1.0),
             compat=(None, None), iterations=2):
        return torch.ops.fastseg.ext_crf_mean_field(lg, *([t[i] for t in tabs] for i in range(7)),
                                                    list(normalization), list(weight), list(compat), iterations)

    call()
    args = _op_args(logits, terms, 2)
    for table, name in ((4, "splat_offsets"), (5, "splat_points"), (6, "splat_points_weight")):
        with pytest.raises(RuntimeError, match=f"term 1: {name} must be"):
            _call_with(args, 1, table, args[1 + table][1][:, :-1])
    with pytest.raises(RuntimeError, match="one entry per term"):  # the CSR lists count too
        torch.ops.fastseg.ext_crf_mean_field(*args[:5], args[5][:1], *args[6:])
    with pytest.raises(RuntimeError, match="normalization\\[1\\]"):
        call(normalization=("symmetric", "sideways"))
    with pytest.raises(RuntimeError, match="one entry per term"):
        call(weight=(1.0,))
    with pytest.raises(RuntimeError, match="compat\\[0\\] must be \\[L, L\\]"):
        call(compat=(torch.eye(3), None))
    with pytest.raises(RuntimeError, match="compat\\[1\\] must be a CPU tensor of the logits' dtype"):
        call(compat=(None, torch.eye(4, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="points"):
        call(lg=torch.randn(1, 4, 31))
    with pytest.raises(RuntimeError, match="images"):
        call(lg=torch.randn(3, 4, 30), tabs=[tables[0], [t.expand(2, *t.shape[1:]) for t in tables[1]]])
    with pytest.raises(RuntimeError, match="dtype"):
        call(lg=logits.double())
    with pytest.raises(RuntimeError, match="iterations"):
        call(iterations=-1)
    with pytest.raises(RuntimeError, match="\\[B, L, N\\]"):
        call(lg=logits[0])
    bad = [list(tables[0]), tables[1]]
    bad[0][0] = bad[0][0].clone()
    bad[0][0][0, 3, 1] = 10**6
    with pytest.raises(RuntimeError, match="out of range"):
        call(tabs=bad)


# --------------------------------------------------------------------------------------------------------------
# dense_crf: when it takes the fused path
# --------------------------------------------------------------------------------------------------------------
def _crf_inputs(B, L, spatial, dtype):
    logits = 3 * torch.randn(B, L, *spatial, dtype=dtype)
    image = torch.rand(B, 3, *spatial, dtype=dtype) * 255
    return logits, image


def _run(logits, image, fused, monkeypatch, **kw):
    calls = []
    real = crf_ops._mean_field_fused

    def spy(*args):
        calls.append(1)
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(crf_ops, "_mean_field_fused", spy)
        if not fused:
            m.setattr(crf_ops, "_can_fuse", lambda *a: False)
        q = fastseg.dense_crf(logits, image, **kw)
    assert bool(calls) == fused
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial", [(24, 31), (5, 9, 11)])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("compat", ["potts", "matrix", "tensor_weights"])
def test_dense_crf_fused_matches_torch_loop(dtype, spatial, B, compat, monkeypatch):
    L = 6
    logits, image = _crf_inputs(B, L, spatial, dtype)
    kw = dict(iterations=5, gaussian_sxy=2.0, gaussian_weight=3.0, bilateral_sxy=6.0, bilateral_srgb=20.0,
              bilateral_weight=5.0)
    if compat == "matrix":
        kw["compatibility"] = torch.randn(L, L, dtype=dtype)
    if compat == "tensor_weights":  # one-element weight tensors that do not require grad
        kw["gaussian_weight"] = torch.tensor([2.0])
        kw["bilateral_weight"] = torch.tensor(4.0, dtype=torch.float64)
    with torch.no_grad():
        fused = _run(logits, image, True, monkeypatch, **kw)
    reference = _run(logits, image, False, monkeypatch, **kw)
    assert fused.shape == logits.shape and fused.dtype == logits.dtype
    torch.testing.assert_close(fused, reference, **_tol(dtype))


def test_dense_crf_single_kernel_and_zero_iterations(monkeypatch):
    """dense_crf's plumbing of a dropped kernel and of zero iterations into the fused op, against the torch loop.
    In float64: in float32 ten iterations amplified the two paths' rounding past _tol for some seeds (seen
    7.5e-5 at one pixel); test_matches_torch_loop bounds the float32 kernel itself."""
    logits, image = _crf_inputs(2, 4, (20, 21), torch.float64)
    for kw in (dict(gaussian_weight=0.0), dict(bilateral_weight=None), dict(iterations=0),
               dict(gaussian_weight=0.0, bilateral_weight=0.0)):
        fused = _run(logits, image, True, monkeypatch, **kw)
        reference = _run(logits, image, False, monkeypatch, **kw)
        torch.testing.assert_close(fused, reference, **_tol(torch.float64))


def test_gradients_use_the_torch_loop(monkeypatch):
    """Anything that requires grad (logits, a learnable weight) runs the differentiable loop; no_grad or
    inputs without grad run the fused path."""
    logits, image = _crf_inputs(1, 4, (16, 17), torch.float64)
    lg = logits.clone().requires_grad_()
    calls = []
    real = crf_ops._mean_field_fused
    monkeypatch.setattr(crf_ops, "_mean_field_fused", lambda *a: calls.append(1) or real(*a))
    q = fastseg.dense_crf(lg, image, iterations=3)
    (q * torch.randn_like(q)).sum().backward()
    assert not calls and lg.grad is not None and bool(torch.isfinite(lg.grad).all())
    w = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    q = fastseg.dense_crf(logits, image, iterations=3, bilateral_weight=w)
    (q * torch.randn_like(q)).sum().backward()
    assert not calls and w.grad is not None
    with torch.no_grad():
        fastseg.dense_crf(lg, image, iterations=3, bilateral_weight=w)
    assert calls == [1]


def test_reference_backend_is_not_fused(monkeypatch):
    logits, image = _crf_inputs(1, 3, (12, 13), torch.float32)
    calls = []
    real = crf_ops._mean_field_fused
    monkeypatch.setattr(crf_ops, "_mean_field_fused", lambda *a: calls.append(1) or real(*a))
    with fastseg.backend("reference"):
        fastseg.dense_crf(logits, image, iterations=2)
    assert not calls


def test_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(2, 3, 10)
        q = torch.ops.fastseg.ext_crf_mean_field(logits, [], [], [], [], [], [], [], [], [], [], 4)
        assert q.shape == (2, 3, 10)


def test_opcheck():
    terms = _terms(2, (6, 7), torch.float64, compat="matrix", L=3)
    args = _op_args(torch.randn(2, 3, 42, dtype=torch.float64), terms, 2)
    torch.library.opcheck(torch.ops.fastseg.ext_crf_mean_field.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------------------------
# CUDA: the CUDA kernel against the CPU kernel and the torch loop
# --------------------------------------------------------------------------------------------------------------
def _skip_without_cuda_kernel():
    if not fastseg.build_info()["cuda_kernels"]:
        pytest.skip("fastseg._C was built without the CUDA kernel of ext_crf_mean_field")


def _check_cuda(logits, terms_cpu, terms_cuda, terms_exact, iterations, monkeypatch):
    """The CUDA op on logits.cuda() against the CPU op and against the torch loop on CUDA: directly in float64
    (and before any iteration); in float32 by test_matches_torch_loop's criterion: its error against the same
    problem in float64 (terms_exact: the terms built in float64 on CUDA) within 16x the larger of the other two
    float32 results' errors. (A fixed float32 bound failed a correct kernel by chance: the CPU fused op itself
    lands up to 1.5e-4 from float64 after 5 iterations with a matrix compatibility.)"""
    q = crf_ops._mean_field_fused(logits.cuda(), terms_cuda, iterations)
    B, L, N = logits.shape
    assert q.device.type == "cuda" and q.shape == (B, L, N) and q.dtype == logits.dtype and q.is_contiguous()
    assert bool(torch.isfinite(q).all())
    torch.testing.assert_close(q.sum(1), torch.ones(B, N, dtype=q.dtype, device=q.device), **_tol(q.dtype))
    cpu = crf_ops._mean_field_fused(logits, terms_cpu, iterations).cuda()
    loop = _torch_loop(logits.cuda(), terms_cuda, iterations, monkeypatch)
    if q.dtype == torch.float64 or iterations == 0:
        torch.testing.assert_close(q, cpu, **_tol(q.dtype))
        torch.testing.assert_close(q, loop, **_tol(q.dtype))
        return q
    exact = _torch_loop(logits.cuda().double(), terms_exact, iterations, monkeypatch)
    error = {name: float((r.double() - exact).abs().max()) for name, r in (("cuda", q), ("cpu", cpu), ("loop", loop))}
    assert error["cuda"] <= 16 * max(error["cpu"], error["loop"]) + 1e-6, f"errors against float64: {error}"
    return q


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_cuda_matches_cpu_and_torch_loop(dtype, normalization, compat, monkeypatch):
    """B = 2, odd N; 2-D and 3-D; a Gaussian lattice of one image shared by the batch, or one per image."""
    _skip_without_cuda_kernel()
    for L, spatial, shared_gaussian in ((3, (9, 13), True), (21, (5, 7, 9), True), (21, (9, 13), False)):
        N = 1
        for s in spatial:
            N *= s
        kw = dict(normalization=normalization, compat=compat, L=L, shared_gaussian=shared_gaussian)
        terms_cpu = _terms(2, spatial, dtype, **kw)
        terms_cuda = _terms(2, spatial, dtype, device="cuda", **kw)
        terms_exact = _terms(2, spatial, dtype, device="cuda", build_dtype=torch.float64, **kw)
        logits = 3 * torch.randn(2, L, N, dtype=dtype)
        assert crf_ops._can_fuse(logits.cuda(), terms_cuda)
        assert not crf_ops._can_fuse(logits.cuda().requires_grad_(), terms_cuda)  # autograd: the torch loop
        with fastseg.backend("reference"):
            assert not crf_ops._can_fuse(logits.cuda(), terms_cuda)
        for iterations in (0, 1, 5):
            _check_cuda(logits, terms_cpu, terms_cuda, terms_exact, iterations, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_label_counts_and_many_terms(dtype, monkeypatch):
    """Every label layout of the update kernel (one label per lane, 2 and 4 per lane, and more than fit in
    registers) and more Potts terms than the update slices itself (the others go through the message buffer),
    mixed with matrix terms."""
    _skip_without_cuda_kernel()
    spatial, N = (7, 11), 77
    def on_each(*args, **kw):  # the terms on the CPU, on CUDA, and built in float64 on CUDA
        return (_terms(*args, **kw), _terms(*args, device="cuda", **kw),
                _terms(*args, device="cuda", build_dtype=torch.float64, **kw))

    for L in (1, 5, 40, 70, 300):
        terms = on_each(2, spatial, dtype, L=L)
        _check_cuda(3 * torch.randn(2, L, N, dtype=dtype), *(t * 3 for t in terms), 3, monkeypatch)
    L = 6
    potts, matrix = on_each(2, spatial, dtype, L=L), on_each(2, spatial, dtype, "after", "matrix", L, seed=1)
    _check_cuda(3 * torch.randn(2, L, N, dtype=dtype), *(p * 2 + m for p, m in zip(potts, matrix)), 3, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dense_crf_matches_cpu(dtype, monkeypatch):
    """dense_crf on CUDA takes the fused path and agrees with the CPU's."""
    _skip_without_cuda_kernel()
    L = 21
    logits, image = _crf_inputs(2, L, (37, 45), dtype)
    matrix = torch.randn(L, L, dtype=dtype)
    for compat in (None, matrix):
        q_cpu = _run(logits, image, True, monkeypatch, compatibility=compat)
        q_cuda = _run(logits.cuda(), image.cuda(), True, monkeypatch,
                      compatibility=None if compat is None else compat.cuda())
        assert q_cuda.device.type == "cuda" and q_cuda.dtype == dtype
        agreement = (q_cuda.argmax(1).cpu() == q_cpu.argmax(1)).double().mean().item()
        assert agreement >= 0.999, agreement
        mean_dq = (q_cuda.cpu() - q_cpu).abs().mean().item()
        assert mean_dq < (1e-5 if dtype == torch.float32 else 1e-12), mean_dq


@pytest.mark.gpu
def test_cuda_side_stream_and_determinism():
    """The op runs on the current stream (a side stream here) and gathers only: the same bits every time."""
    _skip_without_cuda_kernel()
    terms = _terms(2, (20, 23), torch.float32, compat="matrix", L=5, device="cuda")
    args = _op_args(3 * torch.randn(2, 5, 460, device="cuda"), terms, 4)
    expected = torch.ops.fastseg.ext_crf_mean_field(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = torch.ops.fastseg.ext_crf_mean_field(*args)
        again = torch.ops.fastseg.ext_crf_mean_field(*args)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(q, expected) and torch.equal(again, expected)


@pytest.mark.gpu
def test_cuda_errors_and_malformed_tables():
    """Wrong shapes, dtypes and devices raise on the host; out-of-range ids and backwards splat offsets (which
    the CUDA kernel does not validate) are clamped: wrong numbers, no crash."""
    _skip_without_cuda_kernel()
    terms = _terms(1, (5, 6), torch.float32, device="cuda")
    args = _op_args(torch.randn(1, 4, 30, device="cuda"), terms, 2)
    op = torch.ops.fastseg.ext_crf_mean_field
    op(*args)
    with pytest.raises(RuntimeError, match="device"):
        _call_with(args, 0, 0, args[1][0].cpu())
    with pytest.raises(RuntimeError, match="term 1: the splat CSR tables must be on one device"):
        _call_with(args, 1, 5, args[6][1].cpu())
    with pytest.raises(RuntimeError, match="term 0: splat_offsets must be"):
        _call_with(args, 0, 4, args[5][0][:, 1:])
    with pytest.raises(RuntimeError, match="dtype"):
        _call_with(args, 1, 6, args[7][1].double())
    with pytest.raises(RuntimeError, match="logits must be on the CUDA"):
        op(args[0].cpu(), *args[1:])
    with pytest.raises(RuntimeError, match="compat\\[1\\] must be a CUDA tensor"):
        op(*args[:10], [None, torch.eye(4)], args[11])
    with pytest.raises(RuntimeError, match="normalization\\[0\\]"):
        op(*args[:8], ["sideways", "none"], *args[9:])
    bad = [t.clone() for t in (args[1][0], args[3][0], args[5][0], args[6][0])]
    bad[0][0, 3, 1] = 10**6  # splat_vertex
    bad[1][0, 0, 0, 1] = 10**6  # blur_neighbors
    bad[2][0, 2] = 2**31 - 1  # splat_offsets
    bad[3][0, 5] = -7  # splat_points
    backwards = args[5][0].clone()
    E = args[6][0].shape[1]
    backwards[0, 1::2], backwards[0, 2::2] = E, 0  # [0, E, 0, E, ...]: rows overlap, more chunks than S
    for table, value in zip((0, 2, 4, 5, 4), bad + [backwards]):
        q = _call_with(args, 0, table, value)
        torch.cuda.synchronize()  # an out-of-bounds access would surface here
        assert q.shape == (1, 4, 30)


@pytest.mark.gpu
def test_cuda_opcheck():
    _skip_without_cuda_kernel()
    terms = _terms(2, (6, 7), torch.float64, compat="matrix", L=3, device="cuda")
    args = _op_args(torch.randn(2, 3, 42, dtype=torch.float64, device="cuda"), terms, 2)
    torch.library.opcheck(torch.ops.fastseg.ext_crf_mean_field.default, args,
                          test_utils=("test_schema", "test_faketensor"))
