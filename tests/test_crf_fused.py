"""The dense CRF's fused CPU inference: ext_crf_mean_field (every mean-field iteration, and the normalisations,
in one C++ call) against the differentiable torch loop of fastseg.ops.crf.mean_field, on real lattices; its
errors, its determinism across thread counts, both of its SIMD targets, and when mean_field takes it.

The op allocates its output; the tests first free a NaN-filled block of the output's size so that the
allocator is likely to hand the op poisoned memory, which the op must overwrite entirely.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import extension_available

import fastseg
import fastseg.ops.crf as crf_ops

pytestmark = pytest.mark.skipif(
    not (extension_available() and hasattr(torch.ops.fastseg, "ext_crf_mean_field")),
    reason="fastseg._C is not built (or predates ext_crf_mean_field)")

DTYPES = (torch.float32, torch.float64)


def _poison_heap(numel, dtype):
    torch.full((numel,), float("nan"), dtype=dtype)


def _terms(B, spatial, dtype, normalization="symmetric", compat="potts", L=None, shared_gaussian=True, seed=0):
    """A Gaussian term over the grid (one lattice for the batch when shared_gaussian) and a bilateral one per
    image, as dense_crf builds them, with the given normalisation and compatibility."""
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
        "diagonal": lambda w: -w * torch.rand(L, generator=g, dtype=dtype),
        "matrix": lambda w: w * torch.randn(L, L, generator=g, dtype=dtype),
    }[compat]
    return [crf_ops.PairwiseTerm.build(f.contiguous(), compat_of(w), normalization)
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
    _poison_heap(B * L * N, logits.dtype)
    q = crf_ops._mean_field_fused(logits, terms, iterations)
    assert q.shape == (B, L, N) and q.dtype == logits.dtype and q.is_contiguous()
    assert bool(torch.isfinite(q).all())
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
@pytest.mark.parametrize("compat", ["potts", "tensor_weight", "diagonal", "matrix"])
def test_matches_torch_loop(dtype, normalization, compat, monkeypatch):
    B, L, spatial = 2, 7, (13, 17)
    terms = _terms(B, spatial, dtype, normalization, compat, L)
    logits = 3 * torch.randn(B, L, 13 * 17, dtype=dtype)
    q = _fused(logits, terms, 4)
    assert all(t._scales is None for t in terms)  # the op normalised; the Python filter never ran
    torch.testing.assert_close(q, _torch_loop(logits, terms, 4, monkeypatch), **_tol(dtype))


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
    q = torch.ops.fastseg.ext_crf_mean_field(logits, [], [], [], [], [], [], [], 3)
    torch.testing.assert_close(q, torch.softmax(logits, 1), rtol=1e-6, atol=1e-30)


def test_baseline_simd_target():
    """ATEN_CPU_CAPABILITY=default selects the kernels built for the baseline target (16-byte vectors), which
    must agree with the torch loop too (the in-process tests run the AVX2 kernels on CPUs that have them)."""
    script = textwrap.dedent("""
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
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([tests, os.path.dirname(tests), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_errors():
    terms = _terms(1, (5, 6), torch.float32)
    tables = [f.tables for f in (crf_ops._FusedTerm(t, torch.float32) for t in terms)]
    logits = torch.randn(1, 4, 30)

    def call(lg=logits, tabs=tables, normalization=("symmetric", "symmetric"), weight=(1.0, 1.0),
             compat=(None, None), iterations=2):
        return torch.ops.fastseg.ext_crf_mean_field(lg, *([t[i] for t in tabs] for i in range(4)),
                                                    list(normalization), list(weight), list(compat), iterations)

    call()
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
    logits, image = _crf_inputs(2, 4, (20, 21), torch.float32)
    for kw in (dict(gaussian_weight=0.0), dict(bilateral_weight=None), dict(iterations=0),
               dict(gaussian_weight=0.0, bilateral_weight=0.0)):
        fused = _run(logits, image, True, monkeypatch, **kw)
        reference = _run(logits, image, False, monkeypatch, **kw)
        torch.testing.assert_close(fused, reference, **_tol(torch.float32))


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
        q = torch.ops.fastseg.ext_crf_mean_field(logits, [], [], [], [], [], [], [], 4)
        assert q.shape == (2, 3, 10)
