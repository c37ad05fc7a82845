"""Dense CRF (fastseg.dense_crf, fastseg.nn.DenseCRF, fastseg.compat.pydensecrf).

Three references:
- an exact O(N^2) brute-force mean field written here in numpy (float64), with the lattice replaced by an
  exact Gaussian filter: pins the plumbing (features, axis order, spacing, normalisations, compatibility,
  batches, 3-D) to rounding error, independently of the lattice approximation;
- the same loop driven by fastseg's real lattice one image at a time (3-D, batches);
- pydensecrf itself (pip package pydensecrf2), on real photographs (scikit-image) and random unaries:
  argmax agreement >= 99.5 % and mean |dQ| < 1e-3 after 10 iterations.
"""

import math

import numpy as np
import pytest
import torch

from conftest import REQUIRE_TEST_DEPS

import fastseg
import fastseg.ops.crf as crf_ops
from fastseg.compat.pydensecrf import densecrf as fdcrf
from fastseg.compat.pydensecrf import utils as futils

NO_PYDENSECRF = "pydensecrf is not installed (pip install pydensecrf2; .ci/run installs it)"
NO_SKIMAGE = "scikit-image is not installed (pip install scikit-image)"

# The README workload's kernels (pydensecrf's README example).
G_SXY, G_W, B_SXY, B_SRGB, B_W = 3.0, 3.0, 80.0, 13.0, 10.0
AGREEMENT = 0.995
MEAN_ABS_DQ = 1e-3
FAITHFUL_MEAN_ABS_DQ = 1e-5  # what the same lattice in the same precision gives (measured ~1e-8 on the CPU)


def have_pydensecrf():
    try:
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        return False
    return True


def pydensecrf():
    """pydensecrf.densecrf, or skip the calling test (fail it under REQUIRE_TEST_DEPS: CI installs pydensecrf)."""
    if not have_pydensecrf():
        if REQUIRE_TEST_DEPS:
            pytest.fail(f"FASTSEG_REQUIRE_TEST_DEPS=1 but pydensecrf does not import: {NO_PYDENSECRF}")
        pytest.skip(NO_PYDENSECRF)
    import pydensecrf.densecrf as dcrf

    return dcrf


# ----------------------------------------------------------------------------------------------------------
# exact references
# ----------------------------------------------------------------------------------------------------------
class ExactGaussian:
    """The lattice's API computed exactly: sum_j exp(-|f_i - f_j|^2 / 2) v_j, self included, O(N^2)."""

    def __init__(self, features):
        f = features.detach().reshape(features.shape[0], features.shape[1], -1).transpose(1, 2).double()
        self.k = torch.exp(-0.5 * torch.cdist(f, f) ** 2)

    def filter(self, values, normalization="none"):
        assert normalization == "none"
        v = values.reshape(values.shape[0], values.shape[1], -1)
        k = self.k.to(v.dtype)
        if k.shape[0] != v.shape[0]:
            k = k.expand(v.shape[0], -1, -1)
        return torch.einsum("bij,bcj->bci", k, v).reshape(values.shape)


@pytest.fixture
def exact_lattice(monkeypatch):
    monkeypatch.setattr(crf_ops, "_build_lattice", ExactGaussian)


def _softmax(x):
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def brute_force_crf(logits, image, iterations=10, g_sxy=G_SXY, g_w=G_W, b_sxy=B_SXY, b_srgb=B_SRGB, b_w=B_W,
                    compatibility=None, spacing=None):
    """Mean field with exact Gaussian kernels, one image at a time, numpy float64. logits [B, L, *S]."""
    logits, image = np.asarray(logits, np.float64), np.asarray(image, np.float64)
    B, L, S = logits.shape[0], logits.shape[1], logits.shape[2:]
    nd = len(S)
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, np.float64)
    position = np.indices(S).reshape(nd, -1) * spacing[:, None]  # (z,) y, x: the order does not matter here
    compat = -np.eye(L) if compatibility is None else 0.5 * (compatibility + compatibility.T)

    def normalised_kernel(features):
        d2 = ((features[:, :, None] - features[:, None, :]) ** 2).sum(0)
        k = np.exp(-0.5 * d2)
        n = 1 / np.sqrt(k.sum(1))
        return n[:, None] * k * n[None, :]

    out = []
    for b in range(B):
        srgb = np.broadcast_to(np.asarray(b_srgb, np.float64), (image.shape[1],))
        kg = normalised_kernel(position / np.broadcast_to(np.asarray(g_sxy, np.float64), (nd,))[:, None])
        kb = normalised_kernel(np.vstack([position / np.broadcast_to(np.asarray(b_sxy, np.float64), (nd,))[:, None],
                                          image[b].reshape(image.shape[1], -1) / srgb[:, None]]))
        u = logits[b].reshape(L, -1)
        q = _softmax(u)
        for _ in range(iterations):
            q = _softmax(u - compat @ (g_w * q @ kg.T + b_w * q @ kb.T))
        out.append(q.reshape(L, *S))
    return np.stack(out)


def mean_field_with_lattice(logits, image, iterations=10, spacing=None):
    """The README kernels, Potts, driven by fastseg's lattice, one image at a time, features built here."""
    from fastseg.ops.lattice import PermutohedralLattice

    out = []
    for b in range(logits.shape[0]):
        lg, im = logits[b:b + 1], image[b:b + 1]
        S = lg.shape[2:]
        sp = [1.0] * len(S) if spacing is None else spacing

        def xyz(sxy):  # x (last axis) first, as pydensecrf; index / (sxy / spacing), rounded as dense_crf does
            grids = torch.meshgrid(*[torch.arange(n, dtype=lg.dtype) / (sxy / s) for n, s in zip(S, sp)],
                                   indexing="ij")
            return torch.stack(grids[::-1])[None]

        lat_g = PermutohedralLattice(xyz(G_SXY))
        lat_b = PermutohedralLattice(torch.cat([xyz(B_SXY), im / B_SRGB], 1))
        q = torch.softmax(lg, 1)
        for _ in range(iterations):
            q = torch.softmax(lg + G_W * lat_g.filter(q, normalization="symmetric")
                              + B_W * lat_b.filter(q, normalization="symmetric"), 1)
        out.append(q)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def photograph(name, height, width, step=1):
    try:
        import skimage.data
    except ImportError:
        pytest.skip(NO_SKIMAGE)

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    image = image[::step, ::step, :3]
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top:top + height, left:left + width])


def segmentation_unary(image, labels, rng):
    """A plausible, noisy segmentation of a photograph: colour quantised into `labels` classes, softened and
    corrupted by noise; returned as pydensecrf's unary energy [L, H*W] float32 (= -log p)."""
    grey = image.astype(np.float64).mean(-1)
    edges = np.quantile(grey, np.linspace(0, 1, labels + 1)[1:-1])
    truth = np.digitize(grey, edges)
    logits = 2.0 * np.eye(labels)[truth].transpose(2, 0, 1) + rng.normal(0, 1.2, (labels, *grey.shape))
    return futils.unary_from_softmax(_softmax(logits))


def seeded_rng():
    """A numpy Generator drawn from the test's seed (conftest's fixture seeds numpy's global state), so that
    FASTSEG_TEST_SEED replays a failure."""
    return np.random.default_rng(np.random.randint(2**31))


def random_unary(labels, height, width, rng):
    return futils.unary_from_softmax(rng.dirichlet(np.ones(labels), size=height * width).T)


def run_pydensecrf(unary, image, compat_g=G_W, compat_b=B_W, iterations=10):
    dcrf = pydensecrf()
    labels, (h, w) = unary.shape[0], image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=G_SXY, compat=compat_g)
    d.addPairwiseBilateral(sxy=B_SXY, srgb=B_SRGB, rgbim=np.ascontiguousarray(image), compat=compat_b)
    return np.array(d.inference(iterations)).reshape(labels, h, w)


def assert_agrees(q, expected, what):
    q, expected = np.asarray(q, np.float64), np.asarray(expected, np.float64)
    assert q.shape == expected.shape
    agreement = float((q.argmax(0) == expected.argmax(0)).mean())
    mean_dq = float(np.abs(q - expected).mean())
    assert agreement >= AGREEMENT and mean_dq < MEAN_ABS_DQ, (
        f"{what}: argmax agreement {agreement:.5f} (need >= {AGREEMENT}), mean |dQ| {mean_dq:.2e} "
        f"(need < {MEAN_ABS_DQ})")
    return agreement, mean_dq


def fastseg_q(unary, image, compatibility=None):
    logits = -torch.from_numpy(unary).reshape(1, unary.shape[0], *image.shape[:2])
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return fastseg.dense_crf(logits, img, compatibility=compatibility)[0].numpy()


def random_compatibility(labels, rng):
    """A full (asymmetric, pydensecrf symmetrises it) compatibility: Potts-like diagonal plus label-pair terms."""
    return (-np.eye(labels) + rng.uniform(-0.3, 0.6, (labels, labels))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# the plumbing, against the exact brute force (no lattice approximation)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("full_compat", [False, True])
def test_matches_exact_brute_force_2d_batch(exact_lattice, full_compat):
    B, L, H, W, C = 2, 4, 5, 7, 3
    logits = torch.randn(B, L, H, W, dtype=torch.float64) * 2
    image = torch.rand(B, C, H, W, dtype=torch.float64) * 60
    compat = torch.randn(L, L, dtype=torch.float64) if full_compat else None
    kw = dict(gaussian_sxy=(1.5, 2.5), gaussian_weight=2.0, bilateral_sxy=4.0, bilateral_srgb=(20.0, 30.0, 40.0),
              bilateral_weight=1.5)
    q = fastseg.dense_crf(logits, image, iterations=5, compatibility=compat, **kw)
    expected = brute_force_crf(logits, image, 5, g_sxy=(1.5, 2.5), g_w=2.0, b_sxy=4.0, b_srgb=(20.0, 30.0, 40.0),
                               b_w=1.5, compatibility=None if compat is None else compat.numpy())
    np.testing.assert_allclose(q.numpy(), expected, rtol=0, atol=1e-10)


def test_matches_exact_brute_force_3d_anisotropic(exact_lattice):
    B, L, D, H, W = 2, 3, 3, 4, 5
    logits = torch.randn(B, L, D, H, W, dtype=torch.float64) * 2
    image = torch.rand(B, 1, D, H, W, dtype=torch.float64) * 40  # one channel (CT-like)
    spacing = (2.5, 1.0, 0.75)
    q = fastseg.dense_crf(logits, image, iterations=4, gaussian_sxy=2.0, bilateral_sxy=3.0, bilateral_srgb=10.0,
                          spacing=spacing)
    expected = brute_force_crf(logits, image, 4, g_sxy=2.0, b_sxy=3.0, b_srgb=10.0, spacing=spacing)
    np.testing.assert_allclose(q.numpy(), expected, rtol=0, atol=1e-10)


def test_zero_iterations_is_softmax_and_dtypes(exact_lattice):
    logits = torch.randn(1, 3, 4, 4)
    image = torch.rand(1, 3, 4, 4) * 255
    torch.testing.assert_close(fastseg.dense_crf(logits, image, iterations=0), torch.softmax(logits, 1))
    q = fastseg.dense_crf(logits.half(), image, iterations=2)
    assert q.dtype == torch.float16 and q.shape == logits.shape
    q64 = fastseg.dense_crf(logits.half().double(), image.double(), iterations=2)
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q.float(), q64.float(), atol=1e-3, rtol=0)  # computed in float32, rounded to half


def test_weights_zero_or_none_drop_kernels(exact_lattice):
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    image = torch.rand(1, 3, 4, 5, dtype=torch.float64) * 255
    q = fastseg.dense_crf(logits, image, iterations=3, bilateral_weight=None)
    expected = brute_force_crf(logits, image, 3, b_w=0.0)
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-10)
    q0 = fastseg.dense_crf(logits, image, iterations=3, gaussian_weight=0, bilateral_weight=0)
    torch.testing.assert_close(q0, torch.softmax(logits, 1))


def test_non_contiguous_and_channels_last(exact_lattice):
    logits = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    image = torch.rand(2, 3, 6, 5, dtype=torch.float64) * 255
    expected = fastseg.dense_crf(logits, image, iterations=3)
    q = fastseg.dense_crf(logits.contiguous(memory_format=torch.channels_last),
                          image.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), iterations=3)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_non_contiguous_and_channels_last(dtype):
    """The real path (the fused C++ mean field over lattices; the reference when the extension is absent) on a
    2-D batch and a 3-D volume: channels_last logits, a transposed-strides image, and views with gaps give the
    contiguous inputs' result."""
    logits = torch.randn(2, 4, 9, 11, dtype=dtype)
    image = torch.rand(2, 3, 9, 11, dtype=dtype) * 255
    expected = fastseg.dense_crf(logits, image, iterations=4)
    tight = 1e-6 if dtype == torch.float32 else 1e-12
    got = fastseg.dense_crf(logits.contiguous(memory_format=torch.channels_last),
                            image.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), iterations=4)
    torch.testing.assert_close(got, expected, rtol=tight, atol=tight)
    gappy_logits = torch.randn(2, 4, 9, 21, dtype=dtype)[..., ::2].copy_(logits)
    gappy_image = torch.rand(2, 6, 9, 11, dtype=dtype)[:, ::2].copy_(image)
    torch.testing.assert_close(fastseg.dense_crf(gappy_logits, gappy_image, iterations=4), expected, rtol=tight,
                               atol=tight)
    volume_logits = torch.randn(1, 3, 5, 6, 7, dtype=dtype)
    volume = torch.rand(1, 1, 5, 6, 7, dtype=dtype) * 255
    expected = fastseg.dense_crf(volume_logits, volume, iterations=3)
    got = fastseg.dense_crf(volume_logits.contiguous(memory_format=torch.channels_last_3d),
                            volume.transpose(2, 4).contiguous().transpose(2, 4), iterations=3)
    torch.testing.assert_close(got, expected, rtol=tight, atol=tight)


def test_dense_crf_rejects_sigmas_that_overflow_the_lattice():
    """A sigma so small that the features overflow the lattice's int32 keys raises a ValueError naming the
    cause, from dense_crf itself (not only from the lattice)."""
    logits = torch.randn(1, 2, 8, 8)
    image = torch.rand(1, 3, 8, 8) * 255
    with pytest.raises(ValueError, match="too large"):
        fastseg.dense_crf(logits, image, iterations=1, bilateral_srgb=1e-9)
    with pytest.raises(ValueError, match="too large"):
        fastseg.dense_crf(logits, image, iterations=1, gaussian_sxy=1e-9)


def _gradcheck_dense_crf(batch: int, channels: int, colour_range: float, srgb: float) -> None:
    """gradcheck in float64 of 3 CRF iterations w.r.t. the logits, both kernel weights and the compatibility."""
    logits = torch.randn(batch, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    image = torch.rand(batch, channels, 3, 4, dtype=torch.float64) * colour_range
    wg = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    wb = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    compat = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(lg, g, b, c):
        return fastseg.dense_crf(lg, image, iterations=3, gaussian_sxy=1.0, gaussian_weight=g, bilateral_sxy=2.0,
                                 bilateral_srgb=srgb, bilateral_weight=b, compatibility=c)

    assert torch.autograd.gradcheck(f, (logits, wg, wb, compat))


def test_gradients_exact(exact_lattice):
    _gradcheck_dense_crf(batch=1, channels=2, colour_range=30, srgb=10.0)


# ----------------------------------------------------------------------------------------------------------
# the compat front end's semantics, exactly (normalisations, compatibilities), against the brute force
# ----------------------------------------------------------------------------------------------------------
def _compat_apply(compat, x):
    if np.isscalar(compat):
        return -compat * x
    compat = np.asarray(compat, np.float64)
    return compat[:, None] * x if compat.ndim == 1 else 0.5 * (compat + compat.T) @ x


@pytest.mark.parametrize("normalization", ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
                                           "NORMALIZE_SYMMETRIC"])
def test_compat_frontend_exact(exact_lattice, normalization):
    rng = seeded_rng()
    L, H, W = 3, 4, 6
    unary = random_unary(L, H, W, rng)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    feats = rng.normal(size=(4, H * W)).astype(np.float32)
    terms = [("gauss", 1.0, (3.0, 2.0)), ("bilat", np.array([0.5, 1.0, 2.0]), None),
             ("energy", random_compatibility(L, rng), None)]
    d = fdcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(unary)
    norm = getattr(fdcrf, normalization)
    d.addPairwiseGaussian(sxy=(2.0, 3.0), compat=terms[0][1], normalization=norm)
    d.addPairwiseBilateral(sxy=5.0, srgb=(30, 40, 50), rgbim=image, compat=terms[1][1], kernel=fdcrf.FULL_KERNEL,
                           normalization=norm)
    d.addPairwiseEnergy(feats, compat=terms[2][1], normalization=norm)
    q = np.array(d.inference(4))

    y, x = np.indices((H, W)).reshape(2, -1).astype(np.float64)
    features = [np.vstack([x / 2.0, y / 3.0]),
                np.vstack([x / 5.0, y / 5.0, image.reshape(-1, 3).T / np.array([[30.0], [40.0], [50.0]])]),
                feats.astype(np.float64)]
    kernels = []
    for f in features:
        k = np.exp(-0.5 * ((f[:, :, None] - f[:, None, :]) ** 2).sum(0))
        s = k.sum(1)
        pre, post = {"NO_NORMALIZATION": (1, 1), "NORMALIZE_BEFORE": (1 / s, 1), "NORMALIZE_AFTER": (1, 1 / s),
                     "NORMALIZE_SYMMETRIC": (s ** -0.5, s ** -0.5)}[normalization]
        kernels.append(np.asarray(post, np.float64)[..., None] * k * np.asarray(pre, np.float64))
    u = -unary.astype(np.float64)
    ref = _softmax(u)
    for _ in range(4):
        tmp = u.copy()
        for (_, compat, _), k in zip(terms, kernels):
            tmp -= _compat_apply(compat, ref @ k.T)
        ref = _softmax(tmp)
    np.testing.assert_allclose(q, ref, atol=2e-5)
    assert q.dtype == np.float32 and q.shape == (L, H * W)
    np.testing.assert_array_equal(d.map(4), q.argmax(0))

    # startInference / stepInference walk the same iterations (in float32, through PairwiseTerm.message and
    # torch's softmax where inference() runs the fused op: the two differ by float32 rounding, seen up to
    # 1.7e-5 unnormalised), against the same exact reference and bound
    Q, tmp1, tmp2 = d.startInference()
    for _ in range(4):
        d.stepInference(Q, tmp1, tmp2)
    np.testing.assert_allclose(Q, ref, atol=2e-5)
    assert np.isfinite(d.klDivergence(Q))


def test_compat_utils_match_pydensecrf():
    dcrf = pydensecrf()  # noqa: F841  (skip without pydensecrf)
    import pydensecrf.utils as putils

    rng = seeded_rng()
    sm = rng.dirichlet(np.ones(4), size=(5, 6)).transpose(2, 0, 1)
    labels = rng.integers(0, 5, (5, 6))
    img = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    vol = rng.random((3, 4, 5)).astype(np.float32)
    pairs = [
        (futils.unary_from_softmax(sm), putils.unary_from_softmax(sm)),
        (futils.unary_from_softmax(sm, scale=0.7, clip=1e-3), putils.unary_from_softmax(sm, scale=0.7, clip=1e-3)),
        (futils.unary_from_labels(labels, 4, 0.7), putils.unary_from_labels(labels, 4, 0.7)),
        (futils.unary_from_labels(labels % 4, 4, 0.6, zero_unsure=False),
         putils.unary_from_labels(labels % 4, 4, 0.6, zero_unsure=False)),
        (futils.create_pairwise_gaussian((2, 3), (5, 6)), putils.create_pairwise_gaussian((2, 3), (5, 6))),
        (futils.create_pairwise_bilateral((2, 3), (10, 20, 30), img, chdim=2),
         putils.create_pairwise_bilateral((2, 3), (10, 20, 30), img, chdim=2)),
        (futils.create_pairwise_bilateral((1, 2, 3), 5.0, vol), putils.create_pairwise_bilateral((1, 2, 3), 5.0, vol)),
    ]
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------------
# with the real lattice
# ----------------------------------------------------------------------------------------------------------
def test_batch_and_3d_match_per_image_lattice_loop():
    # float64 throughout: ten float32 updates can amplify the two paths' rounding past 1e-5 for some inputs
    # (seen 3.4e-5 in 2-D; the fused kernel's float32 drift has its own bound in test_crf_fused)
    logits = torch.randn(2, 4, 12, 10, dtype=torch.float64) * 2
    image = torch.rand(2, 3, 12, 10, dtype=torch.float64) * 255
    q = fastseg.dense_crf(logits, image)
    torch.testing.assert_close(q, mean_field_with_lattice(logits, image), atol=1e-5, rtol=0)
    for b in range(2):  # every image its own lattice: a batch is its images one at a time
        torch.testing.assert_close(q[b:b + 1], fastseg.dense_crf(logits[b:b + 1], image[b:b + 1]), atol=1e-5, rtol=0)

    logits3 = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64) * 2
    image3 = torch.rand(2, 1, 5, 6, 7, dtype=torch.float64) * 100
    spacing = (3.0, 1.0, 0.5)
    q3 = fastseg.dense_crf(logits3, image3, spacing=spacing)
    torch.testing.assert_close(q3, mean_field_with_lattice(logits3, image3, spacing=spacing), atol=1e-5, rtol=0)


def test_reference_lattice_backend_agrees():
    """The CRF on the plain-PyTorch lattice (fastseg.backend("reference")) and on the default backend, in float64:
    the same lattice and updates summed in another order. (In float32 ten iterations amplify that order's
    rounding past 1e-5 for some seeds; test_crf_fused bounds the float32 drift of the fused kernel.)"""
    logits = torch.randn(2, 4, 12, 10, dtype=torch.float64) * 2
    image = torch.rand(2, 3, 12, 10, dtype=torch.float64) * 255
    q = fastseg.dense_crf(logits, image)
    with fastseg.backend("reference"):
        torch.testing.assert_close(fastseg.dense_crf(logits, image), q, atol=1e-10, rtol=0)


def test_3d_close_to_exact_brute_force():
    """The lattice approximates the Gaussian: on a tiny volume the CRF stays close to the exact CRF.

    A sanity bound, not an accuracy claim: with unit-sigma features on a 6x7x8 grid and a binary image the
    lattice's kernel differs visibly from exp(-d^2/2) (over 12 random volumes: argmax agreement 0.92..0.997,
    mean |dQ| 0.001..0.041), so the inputs are fixed (seed 0: 0.976, 0.019) and the bounds leave room."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 6, 7, 8, dtype=torch.float64, generator=g) * 3
    image = (torch.rand(1, 1, 6, 7, 8, dtype=torch.float64, generator=g) > 0.5) * 80.0
    kw = dict(gaussian_sxy=2.0, bilateral_sxy=4.0, bilateral_srgb=20.0, spacing=(2.0, 1.0, 1.0))
    q = fastseg.dense_crf(logits, image, iterations=5, **kw).numpy()
    expected = brute_force_crf(logits, image, 5, g_sxy=2.0, b_sxy=4.0, b_srgb=20.0, spacing=(2.0, 1.0, 1.0))
    assert (q.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(q - expected).mean() < 0.03


def test_gradcheck_lattice():
    _gradcheck_dense_crf(batch=2, channels=3, colour_range=50, srgb=20.0)


def test_learnable_module():
    crf = fastseg.nn.DenseCRF(4, iterations=3, learnable=True)
    assert {n for n, _ in crf.named_parameters()} == {"gaussian_weight", "bilateral_weight", "compatibility"}
    torch.testing.assert_close(crf.compatibility.detach(), -torch.eye(4))
    logits = torch.randn(2, 4, 9, 8, requires_grad=True)
    image = torch.rand(2, 3, 9, 8) * 255
    q = crf(logits, image)
    # starts as Potts: the same as the functional form with default weights
    torch.testing.assert_close(q, fastseg.dense_crf(logits, image, iterations=3), atol=1e-5, rtol=0)
    q.log().mul(torch.randn_like(q)).sum().backward()
    for p in [logits, *crf.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    fixed = fastseg.nn.DenseCRF(iterations=3)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(logits, image), q, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# against pydensecrf
# ----------------------------------------------------------------------------------------------------------
PHOTOGRAPHS = [("astronaut", 256, 256, 2), ("chelsea", 96, 128, 2), ("coffee", 128, 96, 3),
               ("immunohistochemistry", 96, 96, 1)]


@pytest.mark.parametrize("name,height,width,step", PHOTOGRAPHS)
def test_photographs_potts_against_pydensecrf(name, height, width, step):
    rng = seeded_rng()
    image = photograph(name, height, width, step)
    unary = segmentation_unary(image, 5, rng)
    expected = run_pydensecrf(unary, image)
    _, mean_dq = assert_agrees(fastseg_q(unary, image).reshape(expected.shape), expected, f"{name} Potts")
    # Same lattice, same float32 arithmetic: measured 1e-8..6e-8 here. Far inside the bar.
    assert mean_dq < FAITHFUL_MEAN_ABS_DQ


@pytest.mark.parametrize("name,height,width,step", PHOTOGRAPHS[1:3])
def test_photographs_full_compatibility_against_pydensecrf(name, height, width, step):
    rng = seeded_rng()
    image = photograph(name, height, width, step)
    labels = 6
    unary = segmentation_unary(image, labels, rng)
    compat = random_compatibility(labels, rng)
    expected = run_pydensecrf(unary, image, compat_g=G_W * compat, compat_b=B_W * compat)
    q = fastseg_q(unary, image, compatibility=torch.from_numpy(compat))
    assert_agrees(q, expected, f"{name} full compatibility")


@pytest.mark.parametrize("full_compat", [False, True])
def test_random_unaries_against_pydensecrf_batched(full_compat):
    """Random images and unaries, 21 labels, a batch of 3 in one call against pydensecrf image by image."""
    rng = seeded_rng()
    B, L, H, W = 3, 21, 64, 80
    images = rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    unaries = [random_unary(L, H, W, rng) for _ in range(B)]
    compat = random_compatibility(L, rng) if full_compat else None
    logits = -torch.from_numpy(np.stack(unaries)).reshape(B, L, H, W)
    q = fastseg.dense_crf(logits, torch.from_numpy(images).permute(0, 3, 1, 2).float(),
                          compatibility=None if compat is None else torch.from_numpy(compat)).numpy()
    for b in range(B):
        kw = {} if compat is None else dict(compat_g=G_W * compat, compat_b=B_W * compat)
        assert_agrees(q[b], run_pydensecrf(unaries[b], images[b], **kw), f"random image {b}")


def test_compat_frontend_is_a_drop_in_for_pydensecrf():
    """One pydensecrf script, run with both modules: only the import differs; the numbers agree."""
    dcrf = pydensecrf()
    import pydensecrf.utils as putils

    rng = seeded_rng()
    image = photograph("chelsea", 80, 112, 2)
    H, W = image.shape[:2]
    probs = np.ascontiguousarray(rng.dirichlet(np.ones(4), size=(H, W)).transpose(2, 0, 1), dtype=np.float32)
    compat = random_compatibility(4, rng)

    def script(module, utils):
        d = module.DenseCRF2D(W, H, 4)
        d.setUnaryEnergy(utils.unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=compat * 10,
                               kernel=module.DIAG_KERNEL, normalization=module.NORMALIZE_SYMMETRIC)
        d.addPairwiseEnergy(utils.create_pairwise_bilateral((20, 20), 30, image[..., 0]),
                            compat=np.full(4, -2.0, np.float32), normalization=module.NORMALIZE_AFTER)
        Q = d.inference(10)
        Q5, tmp1, tmp2 = d.startInference()
        for _ in range(5):
            d.stepInference(Q5, tmp1, tmp2)
        return np.array(Q), np.argmax(Q, axis=0).reshape((H, W)), np.array(Q5), d.klDivergence(Q)

    (q, labels, q5, kl), (q_ref, labels_ref, q5_ref, kl_ref) = script(fdcrf, futils), script(dcrf, putils)
    assert_agrees(q, q_ref, "compat front end")
    assert_agrees(q5, q5_ref, "compat front end, stepInference")
    assert (labels == labels_ref).mean() >= AGREEMENT
    assert kl == pytest.approx(kl_ref, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,message", [
    ("rank", "logits must be"),
    ("image_rank", "same rank|logits' rank"),
    ("spatial", "same batch size and spatial size"),
    ("batch", "same batch size and spatial size"),
    ("nan_logits", "logits contains NaN or Inf"),
    ("inf_image", "image contains NaN or Inf"),
    ("iterations", "iterations must be an integer >= 0"),
    ("sigma", "must be positive"),
    ("sigma_len", "sequence of 2"),
    ("srgb_len", "sequence of 3"),
    ("spacing", "spacing must be positive"),
    ("compat_shape", r"\[L, L\]"),
    ("compat_nan", "compatibility contains NaN"),
    ("weight_shape", "one-element tensor"),
])
def test_errors(case, message):
    logits, image = torch.randn(1, 3, 4, 5), torch.rand(1, 3, 4, 5) * 255
    kw = {}
    if case == "rank":
        logits, image = logits[0], image[0]
    elif case == "image_rank":
        image = image[:, :, None]
    elif case == "spatial":
        image = image[..., :4]
    elif case == "batch":
        image = torch.cat([image, image])
    elif case == "nan_logits":
        logits[0, 1, 2, 3] = float("nan")
    elif case == "inf_image":
        image[0, 0, 0, 0] = float("inf")
    elif case == "iterations":
        kw["iterations"] = -1
    elif case == "sigma":
        kw["bilateral_srgb"] = 0.0
    elif case == "sigma_len":
        kw["gaussian_sxy"] = (1.0, 2.0, 3.0)
    elif case == "srgb_len":
        kw["bilateral_srgb"] = (1.0, 2.0)
    elif case == "spacing":
        kw["spacing"] = (1.0, -1.0)
    elif case == "compat_shape":
        kw["compatibility"] = torch.eye(4)
    elif case == "compat_nan":
        kw["compatibility"] = torch.full((3, 3), float("nan"))
    elif case == "weight_shape":
        kw["gaussian_weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=message):
        fastseg.dense_crf(logits, image, **kw)


def test_too_large_for_the_memory_raises_before_allocating():
    """A volume whose lattices alone cannot fit raises a MemoryError naming the problem, before anything is
    read or allocated at its size (the inputs here are stride-0 views: 2 x 8.6e9 voxels, no memory)."""
    logits = torch.zeros(1, 2, 1, 1, 1).expand(1, 2, 2048, 2048, 2048)
    image = torch.zeros(1, 1, 1, 1, 1).expand(1, 1, 2048, 2048, 2048)
    with pytest.raises(MemoryError, match=r"dense_crf of 1 x 2 labels x 8589934592 points needs at least .* GiB"):
        fastseg.dense_crf(logits, image)


def test_memory_check_uses_the_available_memory(monkeypatch):
    from fastseg.ops import lattice as lattice_ops

    logits, image = torch.randn(2, 3, 16, 20), torch.rand(2, 3, 16, 20) * 255
    required = crf_ops.dense_crf_bytes_lower_bound(2, 3, 320, 2, 3, True, True, torch.float32)
    monkeypatch.setattr(lattice_ops, "MEMORY_CHECK_ABOVE_BYTES", 0)  # these sizes are below the threshold
    monkeypatch.setattr(lattice_ops, "available_memory_bytes", lambda device: required - 1)
    with pytest.raises(MemoryError, match="only 0.00 GiB are available"):
        fastseg.dense_crf(logits, image)
    monkeypatch.setattr(lattice_ops, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="PermutohedralLattice of 2 x 320 points, d = 5"):
        fastseg.PermutohedralLattice(torch.randn(2, 5, 16, 20))
    monkeypatch.setattr(lattice_ops, "available_memory_bytes", lambda device: required)
    fastseg.dense_crf(logits, image)  # exactly enough: runs
    monkeypatch.setattr(lattice_ops, "available_memory_bytes", lambda device: None)  # unknown: no check
    fastseg.dense_crf(logits, image)
    monkeypatch.setattr(lattice_ops, "available_memory_bytes", lambda device: 0)
    monkeypatch.setattr(lattice_ops, "MEMORY_CHECK_ABOVE_BYTES", required + 1)  # small problems: not queried
    fastseg.dense_crf(logits, image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lattice_memory_lower_bound_counts_only_what_the_build_allocates(dtype):
    """The bound is exactly the built lattice's per-entry tables: it never exceeds what a build allocates."""
    from fastseg.ops import lattice as lattice_ops

    B, d, N = 3, 5, 1000
    lat = fastseg.PermutohedralLattice(torch.randn(B, d, N, dtype=dtype))
    tables = lat.tables[0], lat.tables[1], lat.tables[5], lat.tables[6]  # the per-entry tables
    assert lattice_ops.lattice_bytes_lower_bound(B, d, N, dtype) == sum(t.numel() * t.element_size() for t in tables)


def test_compat_frontend_errors():
    d = fdcrf.DenseCRF2D(5, 4, 3)
    with pytest.raises(ValueError, match="Bad shape for unary energy"):
        d.setUnaryEnergy(np.zeros((3, 19), np.float32))
    with pytest.raises(ValueError, match="Bad shape for pairwise bilateral"):
        d.addPairwiseBilateral(3, 13, np.zeros((5, 4, 3), np.uint8), 10)
    with pytest.raises(ValueError, match="only works for RGB"):
        d.addPairwiseBilateral(3, 13, np.zeros((4, 5, 1), np.uint8), 10)
    with pytest.raises(ValueError, match="Bad shape for pairwise energy"):
        d.addPairwiseEnergy(np.zeros((2, 19), np.float32), 3)
    with pytest.raises(ValueError, match="dimension >2"):
        d.addPairwiseEnergy(np.zeros((2, 20), np.float32), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError):
        d.addPairwiseGaussian(3, 3, normalization=7)


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_cpu_and_pydensecrf():
    rng = seeded_rng()
    from fastseg.bench.crf import sample_image

    image = sample_image(256)  # the astronaut with scikit-image, else synthetic blobs (the GPU machines)
    unary = segmentation_unary(image, 21, rng)
    logits = -torch.from_numpy(unary).reshape(1, 21, 256, 256)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    compat = torch.from_numpy(random_compatibility(21, rng))
    for c in (None, compat):
        q_cpu = fastseg.dense_crf(logits, img, compatibility=c)
        q_gpu = fastseg.dense_crf(logits.cuda(), img.cuda(), compatibility=None if c is None else c.cuda())
        assert q_gpu.device.type == "cuda"
        assert_agrees(q_gpu[0].cpu().numpy(), q_cpu[0].numpy(), "CUDA vs CPU")
    # gradients on the GPU: finite, reaching logits and the weights
    lg = logits.cuda().requires_grad_()
    w = torch.tensor(10.0, device="cuda", requires_grad=True)
    fastseg.dense_crf(lg, img.cuda(), iterations=3, bilateral_weight=w).log().mean().backward()
    assert torch.isfinite(lg.grad).all() and torch.isfinite(w.grad).all()
    if have_pydensecrf():  # the lent GPU machines do not have it
        expected = run_pydensecrf(unary, image)
        assert_agrees(fastseg.dense_crf(logits.cuda(), img.cuda())[0].cpu().numpy(), expected, "CUDA vs pydensecrf")


@pytest.mark.gpu
@pytest.mark.parametrize("shape, channels", [((96, 128), 3), ((24, 40, 48), 1)])
def test_cuda_memory_lower_bound_is_below_the_peak(shape, channels):
    """What the memory check compares with the free memory never exceeds what dense_crf allocates on CUDA."""
    B, L = 2, 5
    logits = torch.randn(B, L, *shape, device="cuda")
    image = torch.rand(B, channels, *shape, device="cuda") * 255
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q = fastseg.dense_crf(logits, image)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    bound = crf_ops.dense_crf_bytes_lower_bound(B, L, math.prod(shape), len(shape), channels, True, True,
                                                torch.float32)
    assert bound <= peak, (bound, peak)
    assert torch.isfinite(q).all()
