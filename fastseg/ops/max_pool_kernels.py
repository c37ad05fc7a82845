"""Triton kernels for 2-D max pooling, its backward, max unpooling and its backward.

The exact semantics are in ``CONTRACT_max_pool.md``; the launchers below write into outputs they are given.

Work decomposition (shared by all four kernels). Programs follow the memory order of the tensor written
(``unpool``, which scatters, applies its output's order to its input), so that each program reads and
writes long contiguous runs; the flat program id is split with scalar arithmetic. Two tile shapes:
- flat: a program owns ``BLOCK_K`` consecutive positions of the two fastest dimensions, (h, w) of one
  (n, c) plane or, for channels_last, (w, c) of one (n, h) row, split with one int32 division per element.
  2-D tiles of an NCHW plane were measured much slower: many short row runs per program hurt DRAM locality.
- channels_last pooling: a ``BLOCK_M x BLOCK_K`` tile of (w, c) at a fixed (n, h); per element only
  constexpr-shaped ``arange`` offsets are added, and runs along C become vector accesses. The index-driven
  unpool kernels stay flat there: vector lanes would split each scattered access into many partial ones.

All tensors are addressed through their four strides. Offsets use int32 unless some tensor's largest element
offset or element count reaches 2**31 (``INDEX_64``); Triton also types a scalar argument >= 2**31 as int64.
Lanes outside the tensor may compute wrapped offsets in int32 mode, but they are always masked off.
"""

import torch
import triton
import triton.language as tl

from fastseg.ops._indexing import needs_int64

# Elements per program and warps: 8 elements per thread keeps several loads in flight per thread.
_BLOCK = 1024
_NUM_WARPS = 4
# channels_last tiles: widest run along C; it is halved (down to _MIN_BLOCK_K) while the masked tail of a
# run exceeds _MAX_TAIL of C, since masked lanes still cost instructions.
_MAX_BLOCK_K = 128
_MIN_BLOCK_K = 16
_MAX_TAIL = 1 / 8


@triton.jit
def _tile_coords(num_o1, num_mb, num_kb, K, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
                 INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(n, c, h, w) of this program's elements, each a scalar or broadcastable to [BLOCK_M, BLOCK_K].

    FLAT programs own BLOCK_K consecutive positions of the two fastest dimensions, split by the length K of
    the fastest one (W, or C for CHANNELS_LAST); otherwise (CHANNELS_LAST only) a [BLOCK_M, BLOCK_K] (w, c)
    tile.
    """
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    kb = pid % num_kb
    t = pid // num_kb
    mb = t % num_mb
    t = t // num_mb
    o1 = t % num_o1
    n = t // num_o1
    if FLAT:
        p = mb * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        q = p // K
        if CHANNELS_LAST:
            h = o1
            w = q
            c = p - q * K
        else:
            c = o1
            h = q
            w = p - q * K
    else:
        c = kb * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        h = o1
        w = mb * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    return n, c, h, w


@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, out_ptr, arg_ptr,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    san, sac, sah, saw,
    num_o1, num_mb, num_kb, K,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BOUNDED: tl.constexpr, PLANE_ARGMAX: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BOUNDED is False when every tap of every window lies inside the input (no padding, no overhang): the
    # common case then skips all per-tap bounds tests, which dominate the instruction count otherwise.
    n, c, oh, ow = _tile_coords(num_o1, num_mb, num_kb, K, CHANNELS_LAST, FLAT, INDEX_64, BLOCK_M, BLOCK_K)
    mask = (c < C) & (oh < OH) & (ow < OW)
    hstart = oh * SH - PH
    wstart = ow * SW - PW
    best = tl.zeros([BLOCK_M, BLOCK_K], tl.int32)
    if BOUNDED:
        # First tap at or after index 0 in each direction: the initial argmax, even if no tap is in bounds.
        r0 = tl.where(hstart < 0, (DH - 1 - hstart) // DH, 0)
        q0 = tl.where(wstart < 0, (DW - 1 - wstart) // DW, 0)
        best += (r0 * KW + q0).to(tl.int32)
    if COMPUTE_FP64:
        vmax = tl.full([BLOCK_M, BLOCK_K], float("-inf"), tl.float64)
    else:
        vmax = tl.full([BLOCK_M, BLOCK_K], float("-inf"), tl.float32)
    # One per-element window address; each tap adds a program-uniform offset.
    x_win = x_ptr + (n * sxn + c * sxc + hstart * sxh + wstart * sxw)
    for r in tl.static_range(KH):
        row_ok = mask
        if BOUNDED:
            ih = hstart + r * DH
            row_ok = row_ok & (ih >= 0) & (ih < H)
        for q in tl.static_range(KW):
            ok = row_ok
            if BOUNDED:
                iw = wstart + q * DW
                ok = ok & (iw >= 0) & (iw < W)
            # Skipped taps read as -inf, which can neither beat the running max nor be NaN.
            v = tl.load(x_win + (r * DH * sxh + q * DW * sxw), mask=ok, other=float("-inf")).to(vmax.dtype)
            take = (v > vmax) | (v != v)
            vmax = tl.where(take, v, vmax)
            best = tl.where(take, r * KW + q, best)
    tl.store(out_ptr + n * son + c * soc + oh * soh + ow * sow, vmax.to(out_ptr.dtype.element_ty), mask=mask)
    if PLANE_ARGMAX:
        r = best // KW
        q = best - r * KW
        best_ih = hstart + r * DH
        best_iw = wstart + q * DW
        code = best_ih.to(tl.int64) * W + best_iw
    else:
        code = best
    tl.store(arg_ptr + n * san + c * sac + oh * sah + ow * saw, code.to(arg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(
    gout_ptr, arg_ptr, gin_ptr,
    C, H, W, OH, OW,
    sgn, sgc, sgh, sgw,
    san, sac, sah, saw,
    sin_, sic, sih, siw,
    num_o1, num_mb, num_kb, K,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PLANE_ARGMAX: tl.constexpr, COMPUTE_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FLAT: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Gather: each input position sums the gradients of the windows that hold it as tap (r, q) and whose
    # argmax is that tap. Each grad_in element is owned by one lane: no atomics, deterministic.
    # The program iterates over stride cells (v, u): input rows ih = v*SH + i - PH for the static phases
    # i in [0, SH), likewise columns. Tap r reaches phase i iff SH divides i - r*DH, from output row
    # oh = v + (i - r*DH) / SH: the divisibility test is resolved at compile time, and each tap's argmax and
    # gradient are loaded by exactly one phase (one load per input element for a 2x2 stride-2 pool).
    n, c, v, u = _tile_coords(num_o1, num_mb, num_kb, K, CHANNELS_LAST, FLAT, INDEX_64, BLOCK_M, BLOCK_K)
    c_ok = c < C
    a_base = arg_ptr + n * san + c * sac
    g_base = gout_ptr + n * sgn + c * sgc
    gi_base = gin_ptr + n * sin_ + c * sic
    for i in tl.static_range(SH):
        ih = v * SH + (i - PH)
        row_in = c_ok & (ih < H)
        if i < PH:
            row_in = row_in & (ih >= 0)
        for j in tl.static_range(SW):
            iw = u * SW + (j - PW)
            elem_in = row_in & (iw < W)
            if j < PW:
                elem_in = elem_in & (iw >= 0)
            if COMPUTE_FP64:
                acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float64)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            if PLANE_ARGMAX:
                plane_idx = ih.to(tl.int64) * W + iw
            # Taps in decreasing order visit windows in increasing (oh, ow) order, PyTorch's summation order.
            for r_rev in tl.static_range(KH):
                r = KH - 1 - r_rev
                if (i - r * DH) % SH == 0:
                    oh = v + (i - r * DH) // SH
                    row_ok = c_ok & (oh < OH)
                    if i < r * DH:
                        row_ok = row_ok & (oh >= 0)
                    for q_rev in tl.static_range(KW):
                        q = KW - 1 - q_rev
                        if (j - q * DW) % SW == 0:
                            ow = u + (j - q * DW) // SW
                            ok = row_ok & (ow < OW)
                            if j < q * DW:
                                ok = ok & (ow >= 0)
                            a = tl.load(a_base + oh * sah + ow * saw, mask=ok)
                            if PLANE_ARGMAX:
                                hit = ok & (a == plane_idx)
                            else:
                                hit = ok & (a == r * KW + q)
                            # Masked by bounds only, not by the argmax test, so that it need not wait for the argmax load
                            # (measured faster, up to 1.4x for 3x3 stride 1, despite the extra L1 traffic).
                            g = tl.load(g_base + oh * sgh + ow * sgw, mask=ok, other=0.0)
                            acc += tl.where(hit, g.to(acc.dtype), 0.0)
            tl.store(gi_base + ih * sih + iw * siw, acc.to(gin_ptr.dtype.element_ty), mask=elem_in)


@triton.jit
def _unpool_addr(idx_ptr, n, c, h, w, sin_, sic, sih, siw, mask, OW, OHW, sph, spw,
                 PLANE_LINEAR: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """Validity and (oh, ow) offset, through strides sph/spw, of the plane index at indices[n, c, h, w]."""
    k = tl.load(idx_ptr + n * sin_ + c * sic + h * sih + w * siw, mask=mask)
    # Narrow or unsigned 32-bit indices go through int32 (too-large uint32 values turn negative and are
    # rejected, correct since OHW < 2**31 then); 64-bit ones keep their width for the range check.
    if WIDE_INDEX:
        k = k.to(tl.int64)
    else:
        k = k.to(tl.int32)
    ok = mask & (k >= 0) & (k < OHW)
    k = tl.where(ok, k, 0)
    if PLANE_LINEAR:
        off = k * spw
    else:
        oh = k // OW
        off = oh * sph + (k - oh * OW) * spw
    return ok, off


@triton.jit
def _max_unpool2d_kernel(
    x_ptr, idx_ptr, out_ptr,
    C, H, W, OW, OHW,
    sxn, sxc, sxh, sxw,
    sin_, sic, sih, siw,
    son, soc, soh, sow,
    num_o1, num_mb, num_kb, K,
    PLANE_LINEAR: tl.constexpr, WIDE_INDEX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FLAT: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n, c, h, w = _tile_coords(num_o1, num_mb, num_kb, K, CHANNELS_LAST, FLAT, INDEX_64, BLOCK_M, BLOCK_K)
    mask = (c < C) & (h < H) & (w < W)
    ok, off = _unpool_addr(idx_ptr, n, c, h, w, sin_, sic, sih, siw, mask, OW, OHW, soh, sow,
                           PLANE_LINEAR, WIDE_INDEX)
    # Masked by the tile only, so that this load does not wait for the index load.
    v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask)
    tl.store(out_ptr + n * son + c * soc + off, v, mask=ok)


@triton.jit
def _max_unpool2d_bwd_kernel(
    gout_ptr, idx_ptr, gin_ptr,
    C, H, W, OW, OHW,
    sgn, sgc, sgh, sgw,
    sin_, sic, sih, siw,
    sjn, sjc, sjh, sjw,
    num_o1, num_mb, num_kb, K,
    PLANE_LINEAR: tl.constexpr, WIDE_INDEX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FLAT: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n, c, h, w = _tile_coords(num_o1, num_mb, num_kb, K, CHANNELS_LAST, FLAT, INDEX_64, BLOCK_M, BLOCK_K)
    mask = (c < C) & (h < H) & (w < W)
    ok, off = _unpool_addr(idx_ptr, n, c, h, w, sin_, sic, sih, siw, mask, OW, OHW, sgh, sgw,
                           PLANE_LINEAR, WIDE_INDEX)
    g = tl.load(gout_ptr + n * sgn + c * sgc + off, mask=ok, other=0.0)
    tl.store(gin_ptr + n * sjn + c * sjc + h * sjh + w * sjw, g, mask=mask)


def _is_channels_last(t):
    """Whether C is the fastest-varying dimension of t's memory (size-1 dimensions do not count)."""
    if t.size(1) == 1:
        return False
    spatial = [t.stride(d) for d in (2, 3) if t.size(d) > 1]
    return bool(spatial) and t.stride(1) < min(spatial)


def _plan(shape, channels_last, flat):
    """Grid, tile arguments (num_o1, num_mb, num_kb, K) and tile constexprs for a (N, C, H, W) iteration.

    channels_last iterations use 2-D (w, c) tiles unless ``flat`` is set; the others are always flat.
    """
    n, c, h, w = shape
    flat = flat or not channels_last
    if flat:
        outer, run = (h, w * c) if channels_last else (c, h * w)
        num_pb = triton.cdiv(run, _BLOCK)
        meta = dict(BLOCK_M=1, BLOCK_K=_BLOCK, CHANNELS_LAST=channels_last, FLAT=True)
        return (n * outer * num_pb,), (outer, num_pb, 1, c if channels_last else w), meta
    block_k = min(triton.next_power_of_2(c), _MAX_BLOCK_K)
    while block_k > _MIN_BLOCK_K and triton.cdiv(c, block_k) * block_k - c > c * _MAX_TAIL:
        block_k //= 2
    block_m = min(triton.next_power_of_2(w), max(_BLOCK // block_k, 1))
    num_mb = triton.cdiv(w, block_m)
    num_kb = triton.cdiv(c, block_k)
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, CHANNELS_LAST=True, FLAT=False)
    return (n * h * num_mb * num_kb,), (h, num_mb, num_kb, c), meta


def _window_args(kernel_size, stride, padding, dilation):
    return dict(KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
                PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def forward(x, out, argmax, kernel_size, stride, padding, dilation) -> None:
    """Max-pool ``x`` (N, C, H, W) into ``out`` and ``argmax`` (N, C, OH, OW), both fully overwritten.

    ``argmax.dtype`` selects the encoding: int64 stores the torch plane index ``ih * W + iw``; int8 / int16 /
    int32 store the window offset ``r * kw + c``. Values are compared in float32 (float64 for float64 input);
    NaN propagates and ties keep the first tap in row-major window order.
    """
    if out.numel() == 0:
        return
    _, C, H, W = x.shape
    OH, OW = out.shape[2:]
    bounded = (padding[0] > 0 or padding[1] > 0
               or (OH - 1) * stride[0] + (kernel_size[0] - 1) * dilation[0] >= H
               or (OW - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] >= W)
    grid, tiles, meta = _plan(out.shape, _is_channels_last(out), False)
    _max_pool2d_fwd_kernel[grid](
        x, out, argmax, C, H, W, OH, OW,
        *x.stride(), *out.stride(), *argmax.stride(), *tiles,
        BOUNDED=bounded, PLANE_ARGMAX=argmax.dtype == torch.int64, COMPUTE_FP64=x.dtype == torch.float64,
        INDEX_64=needs_int64(x, out, argmax), num_warps=_NUM_WARPS,
        **_window_args(kernel_size, stride, padding, dilation), **meta,
    )


def backward(grad_out, argmax, grad_in, kernel_size, stride, padding, dilation) -> None:
    """Write the max-pool input gradient into ``grad_in`` (N, C, H, W), every element of it.

    ``grad_out`` and ``argmax`` are (N, C, OH, OW) with ``argmax`` encoded as by :func:`forward` (the encoding
    follows its dtype). A gather without atomics, so the result is deterministic; accumulation is in float32
    (float64 for float64 gradients).
    """
    if grad_in.numel() == 0:
        return
    N, C, H, W = grad_in.shape
    OH, OW = grad_out.shape[2:]
    sh, sw = stride
    # The kernel iterates over stride cells of sh * sw input elements; a full-size tile of cells keeps the
    # per-phase tensors wide enough for vector accesses along channels_last C.
    cells = (N, C, triton.cdiv(H + padding[0], sh), triton.cdiv(W + padding[1], sw))
    grid, tiles, meta = _plan(cells, _is_channels_last(grad_in), False)
    _max_pool2d_bwd_kernel[grid](
        grad_out, argmax, grad_in, C, H, W, OH, OW,
        *grad_out.stride(), *argmax.stride(), *grad_in.stride(), *tiles,
        PLANE_ARGMAX=argmax.dtype == torch.int64, COMPUTE_FP64=grad_out.dtype == torch.float64,
        INDEX_64=needs_int64(grad_out, argmax, grad_in), num_warps=_NUM_WARPS,
        **_window_args(kernel_size, stride, padding, dilation), **meta,
    )


def _plane_linear(t):
    """Whether plane index k of t sits at offset k * stride(3) within its (n, c) plane."""
    return t.size(2) == 1 or t.stride(2) == t.size(3) * t.stride(3)


def unpool(x, indices, out) -> None:
    """Scatter ``x`` (N, C, H, W) into the zero-filled ``out`` (N, C, OH, OW) at plane ``indices``.

    ``indices`` (N, C, H, W) may have any integer dtype; indices outside ``[0, OH*OW)`` are skipped. Where
    several elements target one position, one of them wins (unspecified which).
    """
    if x.numel() == 0:
        return
    _, C, H, W = x.shape
    OH, OW = out.shape[2:]
    # Iterate in out's memory order so that the scattered stores of neighbouring lanes stay close.
    grid, tiles, meta = _plan(x.shape, _is_channels_last(out), True)
    index_64 = needs_int64(x, indices, out)
    _max_unpool2d_kernel[grid](
        x, indices, out, C, H, W, OW, OH * OW,
        *x.stride(), *indices.stride(), *out.stride(), *tiles,
        PLANE_LINEAR=_plane_linear(out), WIDE_INDEX=index_64 or indices.element_size() == 8,
        INDEX_64=index_64, num_warps=_NUM_WARPS, **meta,
    )


def unpool_backward(grad_out, indices, grad_in) -> None:
    """Write ``grad_in[n, c, i, j] = grad_out[n, c].flat[indices[n, c, i, j]]`` (0 where out of range).

    ``grad_out`` is (N, C, OH, OW); ``indices`` and ``grad_in`` are (N, C, H, W). Every element of ``grad_in``
    is written.
    """
    if grad_in.numel() == 0:
        return
    _, C, H, W = grad_in.shape
    OH, OW = grad_out.shape[2:]
    grid, tiles, meta = _plan(grad_in.shape, _is_channels_last(grad_in), True)
    index_64 = needs_int64(grad_out, indices, grad_in)
    _max_unpool2d_bwd_kernel[grid](
        grad_out, indices, grad_in, C, H, W, OW, OH * OW,
        *grad_out.stride(), *indices.stride(), *grad_in.stride(), *tiles,
        PLANE_LINEAR=_plane_linear(grad_out), WIDE_INDEX=index_64 or indices.element_size() == 8,
        INDEX_64=index_64, num_warps=_NUM_WARPS, **meta,
    )
