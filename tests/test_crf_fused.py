"""The dense CRF's CPU inference path: ext_crf_update (one fused mean-field update), ext_lattice_filter_scaled
(the lattice filter with per-point scales) and mean_field's use of them, each against the plain-PyTorch loop.

The fused ops allocate their outputs; each test first frees a NaN-filled block of the output's size so that
the allocator is likely to hand the op poisoned memory, which the op must overwrite entirely.
"""

import pytest
import torch

from conftest import extension_available

import fastseg
import fastseg.ops.crf as crf_ops

pytestmark = pytest.mark.skipif(
    not (extension_available() and hasattr(torch.ops.fastseg, "ext_crf_update")),
    reason="fastseg._C is not built (or predates ext_crf_update)")

DTYPES = (torch.float32, torch.float64)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)


def _poison_heap(shape, dtype):
    torch.full(shape, float("nan"), dtype=dtype)


def _reference_update(logits, messages, compat):
    acc = logits.clone()
    for m, c in zip(messages, compat):
        acc = acc + m if c is None else acc - m @ c.transpose(0, 1)
    return torch.softmax(acc, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kinds", [(), ("potts",), ("potts", "potts"), ("matrix",), ("potts", "matrix")])
@pytest.mark.parametrize("B,N,L", [(1, 1000, 21), (3, 257, 5), (2, 64, 1), (1, 33, 9)])
def test_crf_update_matches_torch(dtype, kinds, B, N, L):
    logits = 4 * torch.randn(B, N, L, dtype=dtype)
    messages, compat = [], []
    for i, kind in enumerate(kinds):
        m = 3 * torch.randn(B, N, L, dtype=dtype)
        if i == 1:  # a strided message: batch and points permuted (unit label stride)
            m = 3 * torch.randn(N, B, L, dtype=dtype).permute(1, 0, 2)
        messages.append(m)
        compat.append(torch.randn(L, L, dtype=dtype) if kind == "matrix" else None)
    _poison_heap((B, N, L), dtype)
    q = torch.ops.fastseg.ext_crf_update(logits, messages, compat)
    assert q.shape == (B, N, L) and q.is_contiguous() and bool(torch.isfinite(q).all())
    torch.testing.assert_close(q, _reference_update(logits, messages, compat), **_tol(dtype))


def test_crf_update_extremes_and_errors():
    logits = torch.tensor([[[0.0, -200.0, 100.0, 100.0, -1e4]]])
    q = torch.ops.fastseg.ext_crf_update(logits, [], [])
    torch.testing.assert_close(q, torch.softmax(logits, -1), rtol=1e-6, atol=1e-30)
    with pytest.raises(RuntimeError, match="compat"):
        torch.ops.fastseg.ext_crf_update(logits, [logits], [])
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastseg.ext_crf_update(logits, [torch.zeros(1, 1, 4)], [None])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastseg.ext_crf_update(logits, [logits.double()], [None])


def _features(B, d, spatial, dtype):
    N = 1
    for s in spatial:
        N *= s
    return (torch.rand(B, d, N, dtype=dtype) * 4).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,N,C", [(1, 2, 5000, 21), (2, 5, 3000, 7), (2, 3, 700, 1), (1, 4, 9000, 3)])
@pytest.mark.parametrize("scales", ["both", "pre", "post", "none"])
@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_filter_scaled_matches_filter(dtype, B, d, N, C, scales, layout):
    from fastseg.ops.lattice import PermutohedralLattice

    lattice = PermutohedralLattice(_features(B, d, (N,), dtype))
    tables = lattice._tables_for(dtype)
    values = torch.randn(B, N, C, dtype=dtype).transpose(1, 2) if layout == "rows" else torch.randn(
        B, C, N, dtype=dtype)
    pre = torch.rand(B, N, dtype=dtype) + 0.5 if scales in ("both", "pre") else None
    post = torch.rand(B, N, dtype=dtype) + 0.5 if scales in ("both", "post") else None
    scaled = values if pre is None else values * pre[:, None, :]
    expected = torch.ops.fastseg.ext_lattice_filter(scaled, *tables, False)
    if post is not None:
        expected = expected * post[:, None, :]
    _poison_heap((B, C, N), dtype)
    out = torch.ops.fastseg.ext_lattice_filter_scaled(values, pre, post, *tables, False)
    assert out.shape == values.shape and out.stride() == expected.stride()
    # float32 sums of signed values cancel: the tolerance scales with the largest output
    scale = float(expected.abs().max())
    tol = dict(rtol=1e-5, atol=1e-6 * scale) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12 * scale)
    torch.testing.assert_close(out, expected, **tol)


def test_filter_scaled_errors():
    from fastseg.ops.lattice import PermutohedralLattice

    lattice = PermutohedralLattice(_features(1, 2, (100,), torch.float32))
    values = torch.randn(1, 3, 100)
    with pytest.raises(RuntimeError, match="splat_scale"):
        torch.ops.fastseg.ext_lattice_filter_scaled(values, torch.ones(1, 99), None, *lattice.tables, False)
    with pytest.raises(RuntimeError, match="slice_scale"):
        torch.ops.fastseg.ext_lattice_filter_scaled(values, None, torch.ones(1, 100).double(), *lattice.tables,
                                                    False)


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
    # iterated updates with a random compatibility matrix amplify float32 rounding
    tol = dict(rtol=1e-4, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused, reference, **tol)


def test_dense_crf_single_kernel_and_zero_iterations(monkeypatch):
    logits, image = _crf_inputs(2, 4, (20, 21), torch.float32)
    for kw in (dict(gaussian_weight=0.0), dict(bilateral_weight=None), dict(iterations=0)):
        fused = _run(logits, image, True, monkeypatch, **kw)
        reference = _run(logits, image, False, monkeypatch, **kw)
        # 10 iterated float32 updates whose exp and sums round differently (a few ulp each) drift by ~1e-6:
        # the iterated tolerance of test_dense_crf_fused_matches_torch_loop, not the single-update one.
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=3e-5)


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


def test_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(2, 10, 3)
        q = torch.ops.fastseg.ext_crf_update(logits, [logits], [None])
        assert q.shape == (2, 10, 3)
