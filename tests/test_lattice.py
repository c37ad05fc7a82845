"""fastseg.PermutohedralLattice and the fastseg::lattice_* ops: accuracy against a brute-force Gaussian filter,
the C++ kernels against the plain-PyTorch reference, layouts, autograd, opcheck and errors."""

import math

import pytest
import torch

import fastseg
from conftest import NO_EXTENSION_REASON, extension_available
from fastseg.ops import lattice as L

# The build and filter kernels allocate their tables and results themselves: NaN-filled (integers: their largest
# value), so nothing unwritten passes.
pytestmark = pytest.mark.usefixtures("nan_filled")

BACKENDS = ("reference", "extension")


def skip_unless(backend):
    if backend == "extension" and not (extension_available() and hasattr(torch.ops.fastseg, "ext_lattice_build")):
        pytest.skip(NO_EXTENSION_REASON)


def kernel_matrix(lat, dtype=torch.float64):
    """The lattice's N x N kernel K (out = K v) of a one-image lattice: the filter of the identity."""
    N = lat.num_points
    return lat.filter(torch.eye(N, dtype=dtype)[None])[0].t()


def mass_ratio(d):
    """Total mass of the lattice kernel over that of exp(-r^2 / 2), for a dense uniform point set.

    Splat weights sum to 1, so each vertex collects rho * V / s^d, where rho is the point density,
    s = sqrt(2/3) (d + 1) the elevation scale (the elevation matrix E has E^T E = s^2 I, so feature volumes
    scale by s^d) and V = (d + 1)^(d - 1/2) the volume of H_d per lattice vertex (the remainder-0 points are
    (d + 1) A_d, of cell volume (d + 1)^d sqrt(d + 1), and the vertex lattice has d + 1 cosets of it). Each of
    the d + 1 blur passes multiplies a uniform field by 1 + 0.5 + 0.5 = 2, and the slice (weights summing to 1)
    multiplies by alpha = 1 / (1 + 2^-d). Against the Gaussian's rho (2 pi)^(d/2):
        2^(d+1) alpha (d + 1)^(d - 1/2) / s^d / (2 pi)^(d/2) = 2 alpha (3 / pi)^(d/2) / sqrt(d + 1).
    """
    return 2 * L.slice_alpha(d) * (3 / math.pi) ** (d / 2) / math.sqrt(d + 1)


# --------------------------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, h, half", [(1, 0.02, 8.0), (2, 0.1, 6.5), (3, 0.2, 6.5), (4, 0.33, 6.3)])
def test_dense_grid_moments(d, h, half):
    """On a dense regular grid (spacing h smaller than the lattice spacing sqrt(d (d+1)) / s ~ 0.87, rotated so
    it is not aligned with the lattice), at points at least 5 from the border (where the Gaussian's tail is
    below 4e-6), the lattice kernel's moments follow from its construction (d = 3 and 4 on coarser grids: the
    grid's points grow as h^-d; these are the checks that catch a blur pass missing or misweighted there, which
    the random-point test below cannot):

    - mass: filter(1) h^d / (2 pi)^(d/2) = mass_ratio(d) (derivation in mass_ratio). The only error is the
      aliasing of the grid against the lattice; allow 2e-3 (measured: at most 4e-4 over 12 rotations at d = 3
      and 4, 1e-3 at d = 1, 2). A missing blur pass halves the mass, a half-strength one scales it by 3/4.
    - first moment: splat and slice are barycentric interpolations, which reproduce linear functions exactly,
      and the blur is symmetric about each vertex, so the normalised kernel is centred on the point: the
      "after"-normalised filter of the features returns the features (up to the same aliasing, 2e-3 of the
      kernel's unit width).
    - second moment per dimension: the blur's d + 1 passes of [1/4, 1/2, 1/4] along unit directions u_j with
      step length sqrt(d (d+1)) have covariance sum_j d (d+1) / 2 u_j u_j^T = (d+1)^2 / 2 I (the u_j form a
      tight frame, sum u_j u_j^T = (d+1)/d I), i.e. 3/4 I in feature units (divide by s^2). The splat over a
      dense uniform set adds the mean variance of the linear interpolation, 1/8, and the slice at one point adds
      between 0 (on a vertex) and 3/16 (in 1-D, midway between two vertices: (h_lat / 2)^2 = 3/16). So the
      variance lies in [7/8, 17/16] (1 on average: the Gaussian's). Allow 1e-2 for the aliasing.
    """
    ax = torch.arange(-half, half + 1e-9, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*([ax] * d), indexing="ij")).reshape(d, -1) + 0.013
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    g = rotation @ grid
    N = g.shape[1]
    lat = fastseg.PermutohedralLattice(g[None])
    moments = lat.filter(torch.cat([torch.ones(1, N, dtype=torch.float64), g, (g**2).sum(0, keepdim=True)])[None])[0]
    mass = moments[0]
    mean = moments[1 : d + 1] / mass
    variance = (moments[d + 1] / mass - 2 * (g * mean).sum(0) + (g**2).sum(0)) / d
    interior = (grid.abs() <= half - 5).all(0)
    assert interior.sum() > 10
    ratio = mass[interior] * h**d / (2 * math.pi) ** (d / 2)
    torch.testing.assert_close(ratio, torch.full_like(ratio, mass_ratio(d)), rtol=2e-3, atol=0)
    assert float((mean - g)[:, interior].abs().max()) < 2e-3
    var = variance[interior]
    assert float(var.min()) >= 7 / 8 - 1e-2 and float(var.max()) <= 17 / 16 + 1e-2, (var.min(), var.max())


@pytest.mark.parametrize("d", range(1, 9))
def test_brute_force_random_points(d):
    """Against the exact Gaussian filter on N = 300 random points (O(N^2)).

    A random cloud in d dimensions is sparse, so many lattice vertices a dense cloud would have are missing (the
    blur drops what would flow through them): the lattice kernel K is not the Gaussian G even up to a constant.
    What does hold for any point set:
    - K >= 0 (splat, blur and slice have non-negative weights), and filter(v) = K v (linearity).
    - "after" normalisation turns each row into a convex combination: (Kn v)_i = E_Kn[v_j]. For v with gradient
      norm <= w, |E_Kn[v_j] - v_i| <= w E_Kn|f_j - f_i| <= w sqrt(E_Kn |f_j - f_i|^2) (Lipschitz, then
      Jensen), the same for Gn, so |Kn v - Gn v|_i <= w (sqrt(M2_K,i) + sqrt(M2_G,i)) with M2 the rows' second
      moments about f_i. The lattice's M2_K per dimension is at most that of the dense kernel (<= 17/16 from
      test_dense_grid_moments) plus boundary effects of a finite cloud; require <= 1.5.
    - the "after"-normalised lattice and Gaussian filters agree on constants exactly.
    """
    N, w = 300, 0.7
    f = (torch.rand(1, d, N, dtype=torch.float64) - 0.5) * 3
    x = f[0].t()
    lat = fastseg.PermutohedralLattice(f)
    K = kernel_matrix(lat)
    assert float(K.min()) >= -1e-12
    v = torch.randn(1, 3, N, dtype=torch.float64)
    torch.testing.assert_close(lat.filter(v)[0], (K @ v[0].t()).t())

    G = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    Kn, Gn = K / K.sum(1, keepdim=True), G / G.sum(1, keepdim=True)
    D2 = torch.cdist(x, x) ** 2
    M2K, M2G = (Kn * D2).sum(1), (Gn * D2).sum(1)
    assert float((M2K / d).max()) <= 1.5
    direction = torch.randn(d, dtype=torch.float64)
    s = torch.sin(x @ (direction / direction.norm() * w))
    err = (Kn @ s - Gn @ s).abs()
    bound = w * (M2K.sqrt() + M2G.sqrt())
    assert bool((err <= bound + 1e-12).all()), float((err / bound).max())
    after = lat.filter(s.reshape(1, 1, N), normalization="after")[0, 0]
    torch.testing.assert_close(after, Kn @ s)
    const = lat.filter(torch.full((1, 2, N), 3.5, dtype=torch.float64), normalization="after")
    torch.testing.assert_close(const, torch.full_like(const, 3.5))


def test_symmetric_normalization_matches_definition():
    f = torch.randn(2, 3, 50, dtype=torch.float64)
    v = torch.randn(2, 4, 50, dtype=torch.float64)
    lat = fastseg.PermutohedralLattice(f)
    ones = lat.filter(torch.ones(2, 1, 50, dtype=torch.float64))
    n = 1 / torch.sqrt(ones + 1e-20)
    torch.testing.assert_close(lat.filter(v, normalization="symmetric"), n * lat.filter(n * v))
    torch.testing.assert_close(lat.filter(v, normalization="after"), lat.filter(v) / (ones + 1e-20))


def test_reverse_is_the_adjoint():
    """<F u, w> = <u, F_reverse w>: the blur is a product of symmetric per-direction stencils."""
    f = torch.randn(2, 4, 200, dtype=torch.float64) * 2
    lat = fastseg.PermutohedralLattice(f)
    tables = lat.tables
    u, w = torch.randn(2, 3, 200, dtype=torch.float64), torch.randn(2, 3, 200, dtype=torch.float64)
    for backend in ("reference",) + (("extension",) if extension_available() else ()):
        with fastseg.backend(backend):
            fu = torch.ops.fastseg.lattice_filter(u, *tables, False)
            rw = torch.ops.fastseg.lattice_filter(w, *tables, True)
        torch.testing.assert_close((fu * w).sum(), (u * rw).sum())


# --------------------------------------------------------------------------------------------------------------
# C++ against the reference
# --------------------------------------------------------------------------------------------------------------
def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, d", [(1, 1), (3, 2), (2, 3), (1, 4), (1, 5), (2, 6), (1, 7), (2, 8), (1, 12), (2, 16)])
def test_extension_matches_reference(B, d, dtype):
    skip_unless("extension")
    N, C = 257, 5
    # every image its own scale, so the lattices differ in size
    f = (torch.randn(B, d, N, dtype=torch.float64) * torch.linspace(0.5, 3, B, dtype=torch.float64)[:, None, None])
    f = f.to(dtype)
    v = torch.randn(B, C, N, dtype=dtype)
    ext = tuple(torch.ops.fastseg.ext_lattice_build(f))
    ref = L.reference_lattice_build(f)
    assert ext[3].tolist() == ref[3].tolist()  # same lattices, numbered differently
    torch.testing.assert_close(ext[1], ref[1], **_tol(dtype))  # barycentric weights of the same simplex vertices
    out = {}
    for tname, tables in (("ext", ext), ("ref", ref)):
        out[tname, "ext"] = torch.ops.fastseg.ext_lattice_filter(v, *tables, False)
        out[tname, "ref"] = L.reference_lattice_filter(v, *tables, False)
        # on the same tables: the CSR gather and the index_add_ splat agree to rounding
        torch.testing.assert_close(out[tname, "ext"], out[tname, "ref"], **_tol(dtype))
    torch.testing.assert_close(out["ext", "ext"], out["ref", "ref"], **_tol(dtype))
    # each image's lattice is its own: the same as building it alone
    for b in range(B):
        alone = tuple(torch.ops.fastseg.ext_lattice_build(f[b : b + 1]))
        torch.testing.assert_close(torch.ops.fastseg.ext_lattice_filter(v[b : b + 1], *alone, True),
                                   torch.ops.fastseg.ext_lattice_filter(v, *ext, True)[b : b + 1], **_tol(dtype))


@pytest.mark.parametrize("N", [300, 40000])  # 40000: the CSR is sorted in chunks of points in parallel
def test_extension_build_tables_are_consistent(N):
    """The CSR is the transpose of (splat_vertex, splat_weight), points ascending within a vertex; neighbours
    are mutual; weights sum to 1."""
    skip_unless("extension")
    f = torch.randn(2, 3, N, dtype=torch.float64) * 4
    sv, sw, nb, nv, so, sp, spw = torch.ops.fastseg.ext_lattice_build(f)
    torch.testing.assert_close(sw.sum(-1), torch.ones(2, N, dtype=torch.float64))
    d1 = 4
    for b in range(2):
        M = int(nv[b])
        assert int(so[b, 0]) == 0 and int(so[b, M]) == N * d1 and bool((so[b, M:] == N * d1).all())
        rows = torch.repeat_interleave(torch.arange(M), (so[b, 1 : M + 1] - so[b, :M]).long())
        pairs = list(zip(rows.tolist(), sp[b].tolist(), spw[b].tolist()))
        assert pairs == sorted(pairs, key=lambda e: e[:2])
        expect = sorted(zip(sv[b].reshape(-1).tolist(), torch.arange(N).repeat_interleave(d1).tolist(),
                            sw[b].reshape(-1).tolist()))
        assert sorted(pairs) == expect
        for j in range(d1):
            n = nb[b, j, :M].long()
            has = n[:, 0] >= 0
            assert bool((nb[b, j, n[has, 0], 1] == torch.arange(M, dtype=torch.int32)[has]).all())
        assert bool((nb[b, :, M:] == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_spatial_and_layouts(backend):
    skip_unless(backend)
    with fastseg.backend(backend):
        f = torch.randn(2, 4, 3, 5, 6)
        lat = fastseg.PermutohedralLattice(f)
        assert (lat.batch_size, lat.feature_dim, lat.num_points, lat.spatial_shape) == (2, 4, 90, (3, 5, 6))
        assert len(lat.num_vertices) == 2 and all(m > 0 for m in lat.num_vertices)
        v = torch.randn(2, 7, 3, 5, 6)
        out = lat.filter(v)
        assert out.shape == v.shape
        flat = lat.filter(v.reshape(2, 7, 90))
        torch.testing.assert_close(out.reshape(2, 7, 90), flat)
        cl = v.contiguous(memory_format=torch.channels_last_3d)
        out_cl = lat.filter(cl)
        torch.testing.assert_close(out_cl, out)
        assert out_cl.is_contiguous(memory_format=torch.channels_last_3d)
        strided = torch.randn(2, 7, 3, 5, 12)[..., ::2]
        torch.testing.assert_close(lat.filter(strided), lat.filter(strided.contiguous()))
        permuted = v.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(lat.filter(permuted, "symmetric"), lat.filter(v, "symmetric"))
        img = fastseg.PermutohedralLattice(torch.randn(1, 5, 8, 9))
        x = torch.randn(1, 21, 8, 9)
        y = img.filter(x.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, img.filter(x))


def test_float32_values_on_float64_lattice_and_back():
    f = torch.randn(1, 3, 100, dtype=torch.float64)
    lat = fastseg.PermutohedralLattice(f)
    v = torch.randn(1, 2, 100, dtype=torch.float64)
    torch.testing.assert_close(lat.filter(v.float()), lat.filter(v).float(), rtol=1e-5, atol=1e-5)
    lat32 = fastseg.PermutohedralLattice(f.float())
    torch.testing.assert_close(lat32.filter(v), lat.filter(v), rtol=1e-5, atol=1e-5)


def test_extension_is_deterministic():
    """Same tables and results on every run and for any thread count (the build hashes chunks of points in
    parallel and merges them in chunk order: the numbering is the sequential one; it sorts the CSR in chunks
    of points)."""
    skip_unless("extension")
    f = torch.randn(1, 5, 40000)
    v = torch.randn(1, 21, 40000)
    a = fastseg.PermutohedralLattice(f)
    b = fastseg.PermutohedralLattice(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = fastseg.PermutohedralLattice(f)
        one_thread = c.filter(v)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(a.tables, b.tables, c.tables):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(a.filter(v), a.filter(v))
    assert torch.equal(a.filter(v), one_thread)
    torch.testing.assert_close(a.filter(v), L.reference_lattice_filter(v, *L.reference_lattice_build(f), False),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# autograd and op registration
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["none", "symmetric", "after"])
def test_gradcheck(backend, normalization):
    skip_unless(backend)
    with fastseg.backend(backend):
        lat = fastseg.PermutohedralLattice(torch.randn(2, 3, 4, 5, dtype=torch.float64))
        v = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: lat.filter(x, normalization), (v,))
        assert torch.autograd.gradgradcheck(lambda x: lat.filter(x, normalization), (v,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless(backend)
    with fastseg.backend(backend):
        f = torch.randn(2, 3, 40, dtype=torch.float64)
        tables = torch.ops.fastseg.lattice_build(f)
        v = torch.randn(2, 4, 40, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.fastseg.lattice_filter.default, (v, *tables, False))
        vcl = torch.randn(2, 40, 4, dtype=torch.float64).transpose(1, 2).requires_grad_()
        torch.library.opcheck(torch.ops.fastseg.lattice_filter.default, (vcl, *tables, True))
        # the build's vertex count is data-dependent: schema and fake (unbacked size) checks
        torch.library.opcheck(torch.ops.fastseg.lattice_build.default, (f,),
                              test_utils=("test_schema", "test_faketensor"))
        if backend == "extension":
            torch.library.opcheck(torch.ops.fastseg.ext_lattice_filter.default, (v.detach(), *tables, False),
                                  test_utils=("test_schema", "test_faketensor"))
            torch.library.opcheck(torch.ops.fastseg.ext_lattice_build.default, (f,),
                                  test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    skip_unless(backend)
    with fastseg.backend(backend):
        for d in (0, L.MAX_FEATURE_DIM + 1):
            with pytest.raises(ValueError, match="feature dimension"):
                fastseg.PermutohedralLattice(torch.randn(1, d, 10))
        for bad in (float("nan"), float("inf"), float("-inf")):
            f = torch.randn(1, 2, 10)
            f[0, 1, 3] = bad
            with pytest.raises(ValueError, match="finite"):
                fastseg.PermutohedralLattice(f)
        with pytest.raises(ValueError, match="shape"):
            fastseg.PermutohedralLattice(torch.randn(2, 10))
        with pytest.raises(ValueError, match="floating"):
            fastseg.PermutohedralLattice(torch.ones(1, 2, 10, dtype=torch.int64))
        # huge features (e.g. raw coordinates with a tiny sigma): int32 keys would overflow
        f = torch.randn(1, 3, 10, dtype=torch.float64)
        f[0, 0, 4] = 1e12
        with pytest.raises(ValueError, match="int32 lattice keys.*point 4"):
            fastseg.PermutohedralLattice(f)
        limit = L.safe_feature_limit(3)
        ok = torch.full((1, 3, 5), limit * 0.999, dtype=torch.float64)
        ok[0, :, ::2] *= -1
        fastseg.PermutohedralLattice(ok)  # the documented safe range builds
        lat = fastseg.PermutohedralLattice(torch.randn(2, 3, 4, 5))
        with pytest.raises(ValueError, match="B = 2"):
            lat.filter(torch.randn(1, 2, 4, 5))
        with pytest.raises(ValueError, match="spatial shape"):
            lat.filter(torch.randn(2, 2, 5, 4))
        with pytest.raises(ValueError, match="float32 or float64"):
            lat.filter(torch.randn(2, 2, 20).half())
        with pytest.raises(ValueError, match="normalization"):
            lat.filter(torch.randn(2, 2, 20), normalization="before")
        lat.filter(torch.randn(2, 2, 20))  # [B, C, N] is accepted too


def test_extension_rejects_bad_tables():
    skip_unless("extension")
    f = torch.randn(1, 2, 30)
    tables = list(torch.ops.fastseg.ext_lattice_build(f))
    v = torch.randn(1, 3, 30)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastseg.ext_lattice_filter(v.double(), *tables, False)
    bad = list(tables)
    bad[0] = bad[0].clone()
    bad[0][0, 0, 0] = 10**6
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastseg.ext_lattice_filter(v, *bad, False)
    with pytest.raises(RuntimeError, match="match"):
        torch.ops.fastseg.ext_lattice_filter(torch.randn(1, 3, 31), *tables, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_op_rejects_non_finite(backend):
    """The build itself validates (the class does not pre-scan the features)."""
    skip_unless(backend)
    f = torch.randn(2, 3, 20)
    f[1, 2, 7] = float("nan")
    with fastseg.backend(backend), pytest.raises(ValueError, match="finite.*image 1 point 7"):
        torch.ops.fastseg.lattice_build(f)


# --------------------------------------------------------------------------------------------------------------
# CUDA (build and filter kernels against the CPU ones)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_filter_matches_cpu(dtype):
    skip_unless("extension")
    if not fastseg.build_info()["cuda_kernels"]:
        pytest.skip("fastseg._C was built without the CUDA lattice filter")
    f = torch.randn(3, 5, 40, 50, dtype=dtype) * torch.tensor([0.5, 1.0, 2.0], dtype=dtype)[:, None, None, None]
    v = torch.randn(3, 21, 40, 50, dtype=dtype)
    cpu = fastseg.PermutohedralLattice(f)
    gpu = fastseg.PermutohedralLattice(f.cuda())
    assert gpu.num_vertices == cpu.num_vertices
    for normalization in ("none", "symmetric", "after"):
        expect = cpu.filter(v, normalization)
        torch.testing.assert_close(gpu.filter(v.cuda(), normalization).cpu(), expect, **_tol(dtype))
        vcl = v.cuda().contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gpu.filter(vcl, normalization).cpu(), expect, **_tol(dtype))
    x = v.cuda().requires_grad_()
    gpu.filter(x, "symmetric").square().sum().backward()
    xc = v.clone().requires_grad_()
    cpu.filter(xc, "symmetric").square().sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad, **_tol(dtype))
    assert torch.equal(gpu.filter(v.cuda()), gpu.filter(v.cuda()))  # gathers only: deterministic


def _skip_unless_cuda_build():
    skip_unless("extension")
    if not fastseg.build_info()["cuda_kernels"]:
        pytest.skip("fastseg._C was built without the CUDA lattice build")


def assert_same_lattice(cpu_tables, gpu_tables):
    """The CUDA build's tables describe the CPU build's lattice: the same vertices (numbered differently: the
    CPU build numbers them by first appearance, the CUDA build by hash slot), simplices, weights, neighbours
    and splat rows."""
    sv, sw, nbr, nv, off, pts, pw = cpu_tables
    gsv, gsw, gnbr, gnv, goff, gpts, gpw = (t.cpu() for t in gpu_tables)
    assert torch.equal(gnv, nv)
    assert gsv.shape == sv.shape and gnbr.shape == nbr.shape and goff.shape == off.shape
    torch.testing.assert_close(gsw, sw, rtol=1e-6 if sw.dtype == torch.float32 else 1e-12, atol=1e-7)
    for b in range(sv.shape[0]):
        M = int(nv[b])
        to_gpu = torch.full((M,), -1, dtype=torch.int64)  # CPU vertex id -> CUDA vertex id
        to_gpu[sv[b].reshape(-1).long()] = gsv[b].reshape(-1).long()
        assert torch.equal(torch.sort(to_gpu).values, torch.arange(M)), "vertex ids are not a bijection"
        assert torch.equal(to_gpu[sv[b].long()], gsv[b].long()), "points disagree on their simplex vertices"
        mapped = torch.where(nbr[b, :, :M] >= 0, to_gpu[nbr[b, :, :M].long().clamp(min=0)], -1)
        assert torch.equal(gnbr[b, :, to_gpu].long(), mapped), "blur neighbours disagree"
        assert torch.all(gnbr[b, :, M:] == -1), "padding vertices must have no neighbours"
        rows = off[b, 1:M + 1] - off[b, :M]
        grows = goff[b, 1:] - goff[b, :-1]
        assert torch.equal(grows[to_gpu], rows.to(grows.dtype)), "splat rows differ in length"
        assert torch.all(grows[M:] == 0) and int(goff[b, 0]) == 0
        for v in range(0, M, max(1, M // 50)):  # a sample of rows: points ascending, same weights
            g = int(to_gpu[v])
            assert torch.equal(gpts[b, goff[b, g]:goff[b, g + 1]], pts[b, off[b, v]:off[b, v + 1]])
            torch.testing.assert_close(gpw[b, goff[b, g]:goff[b, g + 1]], pw[b, off[b, v]:off[b, v + 1]],
                                       rtol=1e-6, atol=1e-7)


def _renumbered(tables, generator):
    """The tables of one image with the vertices renumbered by a random permutation (what the CUDA build's
    hash-slot numbering amounts to)."""
    sv, sw, nbr, nv, off, pts, pw = tables
    M = int(nv[0])
    perm = torch.randperm(M, generator=generator)  # old id -> new id
    inverse = torch.argsort(perm)  # new id -> old id
    new_nbr = nbr.clone()
    new_nbr[0, :, :M] = torch.where(nbr[0, :, :M] >= 0, perm[nbr[0, :, :M].long().clamp(min=0)], -1)[:, inverse]
    lengths = (off[0, 1:M + 1] - off[0, :M])[inverse]
    new_off = off.clone()
    new_off[0, 1:M + 1] = torch.cumsum(lengths, 0)
    order = torch.cat([torch.arange(int(off[0, v]), int(off[0, v + 1])) for v in inverse.tolist()])
    return (perm[sv.long()].int(), sw, new_nbr, nv, new_off, pts[:, order], pw[:, order])


@pytest.mark.skipif(not extension_available(), reason=NO_EXTENSION_REASON)
def test_same_lattice_check_accepts_renumbering_only():
    """The GPU tests' comparison (assert_same_lattice) passes a renumbered lattice and fails a changed one."""
    g = torch.Generator().manual_seed(0)
    tables = torch.ops.fastseg.ext_lattice_build(torch.randn(1, 3, 500, generator=g) * 2)
    renumbered = _renumbered(tables, g)
    assert_same_lattice(tables, renumbered)
    broken = list(renumbered)
    broken[2] = broken[2].clone()
    broken[2][0, 1, 0, 0] = -1 if int(broken[2][0, 1, 0, 0]) >= 0 else 0
    with pytest.raises(AssertionError, match="neighbours"):
        assert_same_lattice(tables, broken)
    broken = list(renumbered)
    broken[0] = broken[0].clone()
    broken[0][0, 3, [0, 1]] = broken[0][0, 3, [1, 0]]  # two vertices of one point swapped
    with pytest.raises(AssertionError):
        assert_same_lattice(tables, broken)


@pytest.mark.gpu
@pytest.mark.parametrize("B, d, N, dtype", [(1, 1, 301, torch.float32), (3, 2, 37 * 29, torch.float32),
                                            (2, 5, 4001, torch.float32), (2, 4, 999, torch.float64),
                                            (1, 16, 500, torch.float32), (1, 32, 200, torch.float64)])
def test_cuda_build_matches_cpu(B, d, N, dtype):
    _skip_unless_cuda_build()
    f = torch.randn(B, d, N, dtype=dtype) * torch.linspace(0.3, 3.0, d, dtype=dtype)[None, :, None]
    f[:, :, : N // 4] = f[:, :, :1]  # many points in one simplex: many entries race for the same key
    gpu_tables = torch.ops.fastseg.ext_lattice_build(f.cuda())
    assert all(t.device.type == "cuda" for t in gpu_tables)
    cpu_tables = torch.ops.fastseg.ext_lattice_build(f)
    assert_same_lattice(cpu_tables, gpu_tables)
    # the clump's vertices have splat rows of over N / 4 entries: the CUDA splat's multi-chunk rows
    assert int((cpu_tables[4][:, 1:] - cpu_tables[4][:, :-1]).max()) >= N // 4
    v = torch.randn(B, 3, N, dtype=dtype)
    for reverse in (False, True):
        expected = torch.ops.fastseg.ext_lattice_filter(v, *cpu_tables, reverse)
        got = torch.ops.fastseg.ext_lattice_filter(v.cuda(), *gpu_tables, reverse)
        torch.testing.assert_close(got.cpu(), expected, **_tol(dtype))
    # non-contiguous features (any strides) build the same lattice
    ft = f.cuda().transpose(1, 2).contiguous().transpose(1, 2)
    assert_same_lattice(torch.ops.fastseg.ext_lattice_build(f), torch.ops.fastseg.ext_lattice_build(ft))


@pytest.mark.gpu
def test_cuda_build_filter_is_deterministic_and_on_the_current_stream():
    _skip_unless_cuda_build()
    f = (torch.randn(2, 5, 3000) * 2).cuda()
    v = torch.randn(2, 21, 3000).cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        first = fastseg.PermutohedralLattice(f).filter(v, "symmetric")
    side.synchronize()
    second = fastseg.PermutohedralLattice(f).filter(v, "symmetric")  # numbering may differ, the result not
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_cuda_build_edge_cases_and_errors():
    _skip_unless_cuda_build()
    for shape in ((2, 3, 0), (0, 3, 10)):
        f = torch.randn(*shape)
        gpu_tables = torch.ops.fastseg.ext_lattice_build(f.cuda())
        for t_cpu, t_gpu in zip(torch.ops.fastseg.ext_lattice_build(f), gpu_tables):
            assert t_gpu.shape == t_cpu.shape and t_gpu.dtype == t_cpu.dtype
            assert torch.equal(t_gpu.cpu(), t_cpu)
    f = torch.randn(2, 3, 20)
    f[1, 2, 7] = float("nan")
    with pytest.raises(ValueError, match="finite.*image 1 point 7"):
        torch.ops.fastseg.ext_lattice_build(f.cuda())
    f = torch.randn(2, 3, 20)
    f[0, 1, 5] = 1e12
    with pytest.raises(ValueError, match="too large.*image 0 point 5"):
        torch.ops.fastseg.ext_lattice_build(f.cuda())
    with pytest.raises(ValueError, match="feature dimension"):
        torch.ops.fastseg.ext_lattice_build(torch.randn(1, 33, 10).cuda())
    # the CUDA state is still good after the errors
    assert_same_lattice(torch.ops.fastseg.ext_lattice_build(f.abs().clamp(max=3)),
                        torch.ops.fastseg.ext_lattice_build(f.abs().clamp(max=3).cuda()))


@pytest.mark.gpu
def test_cuda_filter_survives_malformed_tables():
    """The CUDA filter clamps ids instead of validating them (no host synchronisation): out-of-range vertex,
    neighbour and point ids, and splat offsets that run backwards (rows overlapping, more chunks than a valid
    table can have), give wrong numbers, never an out-of-bounds access."""
    _skip_unless_cuda_build()
    tables = [t.cuda() for t in torch.ops.fastseg.ext_lattice_build(torch.randn(1, 2, 200) * 2)]
    v = torch.randn(1, 3, 200, device="cuda")
    E = tables[5].shape[1]
    backwards = tables[4].clone()
    backwards[0, 1::2], backwards[0, 2::2] = E, 0  # [0, E, 0, E, ...]
    for index, value in ((0, 10**6), (2, 10**6), (5, -7), (5, 10**6)):
        bad = list(tables)
        bad[index] = bad[index].clone()
        bad[index].view(-1)[3] = value
        out = torch.ops.fastseg.ext_lattice_filter(v, *bad, False)
        torch.cuda.synchronize()  # an out-of-bounds access would surface here
        assert out.shape == v.shape
    bad = list(tables)
    bad[4] = backwards
    for reverse in (False, True):
        out = torch.ops.fastseg.ext_lattice_filter(v, *bad, reverse)
        torch.cuda.synchronize()
        assert out.shape == v.shape and out.isfinite().all()


@pytest.mark.gpu
def test_cuda_opcheck():
    """The registered ops and the extension's ops on CUDA tensors (the build's vertex count is data-dependent:
    schema and fake checks for it)."""
    _skip_unless_cuda_build()
    f = torch.randn(2, 3, 40, dtype=torch.float64, device="cuda")
    tables = torch.ops.fastseg.lattice_build(f)
    v = torch.randn(2, 4, 40, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.lattice_filter.default, (v, *tables, False))
    for op, args in ((torch.ops.fastseg.lattice_build.default, (f,)),
                     (torch.ops.fastseg.ext_lattice_build.default, (f,)),
                     (torch.ops.fastseg.ext_lattice_filter.default, (v.detach(), *tables, True))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
