"""Triton backward kernels of the fused convolution (groups == 1): the input gradient and the weight gradient.

Both start from ``grad_out``, the gradient at the fused op's output, and apply the epilogue's chain rule as they
load it: ``grad_z = grad_out * (out > 0) * scale`` (the ReLU mask from the saved output, passing a NaN output's
gradient on as torch's ReLU does; the per-channel scale), so the gradient at the convolution's output never exists in memory. Bias, shift and residual do not
enter grad_z; their own gradients are reductions the caller does.

- ``_conv2d_dgrad_kernel`` (input gradient): an implicit GEMM with rows M = N*H*W (input pixels), columns C
  (input channels), reduction over (tap, output channel). Input pixel ``ih`` receives from tap ``r`` the output
  row ``oh = (ih + PH - r*DH) / SH`` when that division is exact and 0 <= oh < OH. With SH > 1 a tap reaches
  only the input rows of one residue ``ih mod SH``: the pixels are split into SH*SW phases (grid axis 2), a
  program takes pixels of one phase only, so for all its rows the same taps are valid (``_first_tap``: the
  first valid tap and then every ``STEP_H = SH / gcd(SH, DH)``-th) and it loops over those taps alone, with no
  masked-out multiply-adds. A phase no tap reaches (SH and DH sharing a factor) writes zeros. The A-operand is
  a ``[BLOCK_M pixels, BLOCK_K output channels]`` tile of grad_z, the B-operand a ``[BLOCK_K, BLOCK_N]`` tile
  of the weight at tap (r, s).
- ``_conv2d_wgrad_kernel`` (weight gradient): per tap (r, s) a GEMM ``grad_w[:, :, r, s] = grad_z^T @ x_rs``
  with rows K (output channels), columns C, reduction over the N*OH*OW output pixels, ``x_rs`` the input
  gathered at ``ih = oh*SH - PH + r*DH``, ``iw = ow*SW - PW + s*DW`` (masked loads give the zero padding). The
  scale multiplies the float32 result per output channel instead of each grad_out element. Split-K: the pixels
  split into ``split`` contiguous chunks (grid axis 2) when the tiles alone would not fill the GPU; each chunk
  writes its float32 partial sum to its own slice of a workspace, and the caller sums the slices in a fixed
  order (deterministic: no atomics).

fp32 accumulation; float32 operands use TF32 only when the caller asks (cudnn.allow_tf32, as the forward),
float16 / bfloat16 operands go to tensor cores as they are (grad_z rounded once to the input's dtype, as
torch's backward receives it). Every tensor is addressed through its strides (NCHW, channels_last, expanded
gradients); INDEX_64 as in the forward. On CUDA the block sizes are autotuned per shape; under Triton's
interpreter a fixed small configuration runs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastseg._backend import triton_interpreting
from fastseg.ops._indexing import needs_int64
from fastseg.ops.conv_kernels import GEMM_CONFIGS, _block_range, _dot, _pixel_coords, autotune_bench

# The input gradient's GEMM has the forward's shape (pixels x channels, reduction over channels): its configs
# (not yet the forward's Hopper-sized tiles, untimed for the backward).
DGRAD_CONFIGS = GEMM_CONFIGS
# Weight gradient: BLOCK_M output channels x BLOCK_N input channels, BLOCK_K pixels per reduction step.
WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# Under the interpreter (tl.dot needs every block dimension >= 16).
DGRAD_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
WGRAD_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}
_AUTOTUNE_KEY = ["N", "C", "H", "W", "K", "OH", "OW", "KH", "KW", "SH", "SW", "DH", "DW", "RELU", "HAS_SCALE",
                 "FP32_INPUTS", "ALLOW_TF32", "CHANNELS_LAST"]
# Split-K of the weight gradient: the tile count it aims at per SM, and the fewest pixels a chunk may have
# (shorter chunks spend more on the workspace and its sum than they win in parallelism).
_WGRAD_TILES_PER_SM = 2
_WGRAD_MIN_CHUNK = 4096


def _is_channels_last(t):
    return t.size(1) > 1 and t.stride(1) == 1


@triton.jit
def _grad_z_tile(g_ptr, out_ptr, scale_ptr, pix_off_g, pix_off_out, pix_ok, k, k_ok, sgk, sok,
                 operand_ty: tl.constexpr, RELU: tl.constexpr, HAS_SCALE: tl.constexpr,
                 APPLY_SCALE: tl.constexpr):
    """grad_out * (out > 0) [* scale] at [pixel, output channel], in the GEMM's operand type (float32 math);
    the mask is torch's ReLU backward's (out <= 0 blocks), so a NaN output passes its gradient on.

    APPLY_SCALE=False leaves the scale out (the weight gradient applies it to its result)."""
    mask = pix_ok[:, None] & k_ok[None, :]
    g = tl.load(g_ptr + pix_off_g[:, None] + k[None, :] * sgk, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(out_ptr + pix_off_out[:, None] + k[None, :] * sok, mask=mask, other=0.0)
        g = tl.where(y <= 0, 0.0, g)
    if HAS_SCALE and APPLY_SCALE:
        g = g * tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return g.to(operand_ty)


@triton.jit
def _first_tap(phase, PAD: tl.constexpr, KSIZE: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
               STEP: tl.constexpr):
    """The first tap t that reaches input positions i = phase (mod S), i.e. (i + PAD - t*D) divisible by S.

    Exactly one t in [0, STEP) does when gcd(S, D) divides phase + PAD, none otherwise (then KSIZE). The
    divisibility test adds t*D*(S-1) (= -t*D mod S) instead of subtracting t*D, to stay non-negative."""
    first = phase * 0 + KSIZE
    for t in tl.static_range(STEP):
        first = tl.where((phase + PAD + t * D * (S - 1)) % S == 0, t, first)
    return first


@triton.jit
def _conv2d_dgrad_kernel(
    g_ptr, out_ptr, scale_ptr, w_ptr, gx_ptr,
    N, C, H, W, K, OH, OW, HQ, WQ,
    sgn, sgk, sgh, sgw,
    son, sok, soh, sow,
    swk, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    STEP_H: tl.constexpr, STEP_W: tl.constexpr,
    RELU: tl.constexpr, HAS_SCALE: tl.constexpr,
    FP32_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C: input channels (the GEMM's columns), K: output channels (its reduction). HQ x WQ: the largest phase's
    # pixel grid (ceil(H / SH) x ceil(W / SW)); smaller phases mask their last row / column.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    phase_h = phase // SW
    phase_w = phase - phase_h * SW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, jh, jw = _pixel_coords(offs_m, HQ, WQ, INDEX_64)
    ih = phase_h + jh * SH
    iw = phase_w + jw * SW
    m_ok = (n < N) & (ih < H) & (iw < W)
    c = _block_range(pid_n * BLOCK_N, BLOCK_N, INDEX_64)
    c_ok = c < C
    kk = _block_range(0, BLOCK_K, INDEX_64)
    # The taps reaching this phase: r = r0, r0 + STEP_H, ... (< KH); tap r0 reads output row oh0, and each next
    # one the row STEP_H*DH/SH above (STEP_H*DH is a multiple of SH).
    r0 = _first_tap(phase_h, PH, KH, SH, DH, STEP_H)
    s0 = _first_tap(phase_w, PW, KW, SW, DW, STEP_W)
    num_r = tl.cdiv(KH - r0, STEP_H)
    num_s = tl.cdiv(KW - s0, STEP_W)
    oh0 = jh + (phase_h + PH - r0 * DH) // SH  # an exact division (or unused: no tap reaches the phase)
    ow0 = jw + (phase_w + PW - s0 * DW) // SW
    g_pix = n * sgn
    out_pix = n * son
    w_c = w_ptr + c[None, :] * swc
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One flat loop over (tap, output-channel block), channel blocks fastest, as the forward's.
    num_kb = tl.cdiv(K, BLOCK_K)
    for it in range(num_r * num_s * num_kb):
        tap = it // num_kb
        k = (it - tap * num_kb) * BLOCK_K + kk
        k_ok = k < K
        tr = tap // num_s
        ts = tap - tr * num_s
        oh = oh0 - tr * (STEP_H * DH // SH)
        ow = ow0 - ts * (STEP_W * DW // SW)
        ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a = _grad_z_tile(g_ptr, out_ptr, scale_ptr, g_pix + oh * sgh + ow * sgw, out_pix + oh * soh + ow * sow, ok,
                         k, k_ok, sgk, sok, w_ptr.dtype.element_ty, RELU, HAS_SCALE, True)
        r = r0 + tr * STEP_H
        s = s0 + ts * STEP_W
        b = tl.load(w_c + r * swh + s * sww + k[:, None] * swk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32_INPUTS, ALLOW_TF32)
    gx = gx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv2d_wgrad_kernel(
    g_ptr, out_ptr, scale_ptr, x_ptr, gw_ptr,
    N, C, H, W, K, OH, OW, CHUNK,
    sgn, sgk, sgh, sgw,
    son, sok, soh, sow,
    sxn, sxc, sxh, sxw,
    sws, swk, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    RELU: tl.constexpr, HAS_SCALE: tl.constexpr,
    FP32_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows: output channels k; columns: input channels c of tap (r, s); reduction: the output pixels of this
    # program's chunk [start, end). sws: the stride between the chunks' partial sums in gw (0 unused: one chunk).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    chunk = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_N)
    tap = pid_n // num_cb
    r = tap // KW
    s = tap - r * KW
    k = _block_range(pid_m * BLOCK_M, BLOCK_M, INDEX_64)
    k_ok = k < K
    c = _block_range((pid_n - tap * num_cb) * BLOCK_N, BLOCK_N, INDEX_64)
    c_ok = c < C
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N * OH * OW)
    pp = tl.arange(0, BLOCK_K)
    x_c = x_ptr + c[None, :] * sxc
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The pixels' coordinates are divided out once, then advanced by adding the step of BLOCK_K pixels as whole
    # images, rows and columns, with one carry per level (step_h < OH): a division by OW and by OH per pixel and
    # step would be most of the loop's instructions.
    n, oh, ow = _pixel_coords(start + pp, OH, OW, INDEX_64)
    step_n = BLOCK_K // (OH * OW)
    step_h = (BLOCK_K - step_n * OH * OW) // OW
    step_w = BLOCK_K - step_n * OH * OW - step_h * OW
    for p0 in range(start, end, BLOCK_K):
        p_ok = p0 + pp < end
        # grad_z as [pixel, k] then transposed: the A-operand is [BLOCK_M output channels, BLOCK_K pixels]
        a = _grad_z_tile(g_ptr, out_ptr, scale_ptr, n * sgn + oh * sgh + ow * sgw, n * son + oh * soh + ow * sow,
                         p_ok, k, k_ok, sgk, sok, x_ptr.dtype.element_ty, RELU, HAS_SCALE, False)
        ih = oh * SH - PH + r * DH
        iw = ow * SW - PW + s * DW
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_c + (n * sxn + ih * sxh + iw * sxw)[:, None], mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(tl.trans(a), b, acc, FP32_INPUTS, ALLOW_TF32)
        ow += step_w
        carry = ow >= OW
        ow = tl.where(carry, ow - OW, ow)
        oh += step_h + carry.to(oh.dtype)
        carry = oh >= OH
        oh = tl.where(carry, oh - OH, oh)
        n += step_n + carry.to(n.dtype)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[:, None]
    gw = gw_ptr + chunk * sws + r * swh + s * sww + k[:, None] * swk + c[None, :] * swc
    tl.store(gw, acc.to(gw_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])


_conv2d_dgrad_tuned = triton.autotune(configs=DGRAD_CONFIGS, key=_AUTOTUNE_KEY, do_bench=autotune_bench)(
    _conv2d_dgrad_kernel)
_conv2d_wgrad_tuned = triton.autotune(configs=WGRAD_CONFIGS, key=_AUTOTUNE_KEY, do_bench=autotune_bench)(
    _conv2d_wgrad_kernel)


def _grad_z_args(grad_out, out, scale):
    """The chain rule's inputs as kernel arguments: (grad_out, out, scale) with grad_out standing in for an
    absent one (its flag is False: never read), out's strides, and the flags."""
    relu_out = out if out is not None else grad_out
    tensors = (grad_out, relu_out, scale if scale is not None else grad_out)
    return tensors, relu_out.stride(), dict(RELU=out is not None, HAS_SCALE=scale is not None)


def _geometry(weight_shape, stride, padding, dilation):
    KH, KW = weight_shape[2:]
    return dict(KH=KH, KW=KW, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0],
                DW=dilation[1])


def _precision(x, allow_tf32):
    return dict(FP32_INPUTS=x.dtype == torch.float32, ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
                CHANNELS_LAST=_is_channels_last(x))


def input_grad(grad_out, out, scale, weight, grad_x, stride, padding, dilation, allow_tf32, config=None) -> None:
    """Write the gradient of the fused op with respect to x into ``grad_x`` (N, C, H, W), every element of it.

    ``grad_out`` (N, K, OH, OW) is the gradient at the op's output; ``out`` its saved output when the op ended in
    a ReLU (else None); ``scale`` (K,) or None; ``weight`` (K, C, KH, KW). ``padding`` is the (top, left)
    padding; grad_out's and grad_x's sizes fix the rest (asymmetric padding needs nothing else). ``config``: a
    dict of block sizes (and optionally num_warps / num_stages) bypassing autotuning (tests).
    """
    if grad_x.numel() == 0:
        return
    N, C, H, W = grad_x.shape
    K = weight.shape[0]
    OH, OW = grad_out.shape[2:]
    SH, SW = stride
    HQ, WQ = triton.cdiv(H, SH), triton.cdiv(W, SW)
    grad_z_tensors, out_strides, flags = _grad_z_args(grad_out, out, scale)
    if grad_x.is_cuda:
        # Weights repacked with input channels fastest (a view of shape (K, C, KH, KW)): the [BLOCK_K, BLOCK_N]
        # weight tiles then load as contiguous runs.
        weight = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    meta = dict(_geometry(weight.shape, stride, padding, dilation),
                STEP_H=SH // math.gcd(SH, dilation[0]), STEP_W=SW // math.gcd(SW, dilation[1]), **flags,
                **_precision(grad_x, allow_tf32), INDEX_64=needs_int64(grad_out, out, weight, grad_x))
    args = (*grad_z_tensors, weight, grad_x, N, C, H, W, K, OH, OW, HQ, WQ,
            *grad_out.stride(), *out_strides, *weight.stride(), *grad_x.stride())

    def grid(block):
        return (triton.cdiv(N * HQ * WQ, block["BLOCK_M"]), triton.cdiv(C, block["BLOCK_N"]), SH * SW)

    if config is None and triton_interpreting():
        config = DGRAD_INTERPRETER_CONFIG
    if config is not None:
        _conv2d_dgrad_kernel[grid(config)](*args, **meta, **config)
    else:
        _conv2d_dgrad_tuned[grid](*args, **meta)


def weight_split(grad_out, weight) -> int:
    """How many pixel chunks the weight gradient reduces in parallel on this device (1: no workspace)."""
    if not grad_out.is_cuda:
        return 1
    K, C, KH, KW = weight.shape
    tiles = triton.cdiv(K, 128) * triton.cdiv(C, 128) * KH * KW  # at the largest configurations' tile size
    sms = torch.cuda.get_device_properties(grad_out.device).multi_processor_count
    pixels = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    return max(1, min(triton.cdiv(_WGRAD_TILES_PER_SM * sms, tiles), pixels // _WGRAD_MIN_CHUNK))


def weight_grad(grad_out, out, scale, x, grad_w, stride, padding, dilation, allow_tf32, config=None,
                split=None) -> None:
    """Write the gradient of the fused op with respect to the weight into ``grad_w`` (K, C, KH, KW).

    Arguments as :func:`input_grad`'s, with ``x`` (N, C, H, W) the forward's input. ``split``: the number of
    pixel chunks reduced in parallel (default :func:`weight_split`); above 1 the chunks' float32 partial sums
    go to a workspace that is then summed in order (deterministic) into grad_w.
    """
    if grad_w.numel() == 0:
        return
    N, C, H, W = x.shape
    K = grad_w.shape[0]
    OH, OW = grad_out.shape[2:]
    pixels = N * OH * OW
    if pixels == 0:
        grad_w.zero_()
        return
    chunk = triton.cdiv(pixels, split or weight_split(grad_out, grad_w))
    split = triton.cdiv(pixels, chunk)  # no empty chunk
    if split == 1:
        target, split_stride = grad_w, 0
    else:
        target = torch.empty((split, *grad_w.shape), dtype=torch.float32, device=grad_w.device)
        split_stride = target.stride(0)
    grad_z_tensors, out_strides, flags = _grad_z_args(grad_out, out, scale)
    meta = dict(_geometry(grad_w.shape, stride, padding, dilation), **flags,
                **_precision(x, allow_tf32), INDEX_64=needs_int64(grad_out, out, x, target))
    args = (*grad_z_tensors, x, target, N, C, H, W, K, OH, OW, chunk,
            *grad_out.stride(), *out_strides, *x.stride(), split_stride, *target.stride()[-4:])
    KH, KW = grad_w.shape[2:]

    def grid(block):
        return (triton.cdiv(K, block["BLOCK_M"]), triton.cdiv(C, block["BLOCK_N"]) * KH * KW, split)

    if config is None and triton_interpreting():
        config = WGRAD_INTERPRETER_CONFIG
    if config is not None:
        _conv2d_wgrad_kernel[grid(config)](*args, **meta, **config)
    else:
        _conv2d_wgrad_tuned[grid](*args, **meta)
    if split > 1:
        grad_w.copy_(target.sum(0))
