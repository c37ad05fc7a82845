"""Triton kernels for the fused convolution: conv2d + bias + per-channel affine + residual + ReLU, one kernel.

Three kernels, each writing into an output it is given (see ``forward``):

- ``_conv2d_igemm_kernel`` (groups == 1): an implicit GEMM. Rows M = N*OH*OW (output pixels), columns
  Cout, reduction K = KH*KW*Cin. A program owns a ``BLOCK_M x BLOCK_N`` output tile; it walks the taps (r, s)
  and, per tap, the input channels in ``BLOCK_K`` slices (one flat runtime loop, or with ``TAPS_OUTER`` a loop
  over the taps around one over the channel blocks: see ``taps_outer``), loading an ``[BLOCK_M, BLOCK_K]``
  slice of the input at ``ih = oh*SH - PH + r*DH``, ``iw = ow*SW - PW + s*DW`` (masked loads give the zero
  padding) and a ``[BLOCK_K, BLOCK_N]`` slice of the weight, and accumulates their ``tl.dot`` in float32.
  The epilogue (bias, scale, shift, residual, ReLU) runs on the float32 accumulator before the single store.
  Split-K: when the output tiles alone would leave SMs idle (a 33x33 ASPP branch at batch 8: 138 tiles of
  128x128 on an H100's 132 SMs, each 576 reduction steps long), the (tap, channel block) steps are cut into
  ``split`` contiguous ranges (grid axis 2); each program writes its float32 partial sum to its slice of a
  workspace, and ``_epilogue_kernel`` sums the slices in a fixed order (deterministic, no atomics) and
  applies the epilogue.
- ``_conv2d_depthwise_kernel`` (groups == Cin, Cout = multiplier*Cin): per-element multiply-accumulate in
  float32 over the taps, the same epilogue. No reduction over channels, so no ``tl.dot``.
- ``_epilogue_kernel``: the epilogue alone, over partial results at any strides: split-K's sum, and the output of
  a convolution run by cuDNN (``bias_residual_relu_``, in place: one pass where torch takes one per term).

Every tensor is addressed through its four strides, so NCHW, channels_last and other layouts all work; the
caller picks the output's memory format. Offsets are int32 unless some tensor's largest offset reaches 2**31
(``INDEX_64``). float32 inputs use ``input_precision="tf32"`` only when the caller asks (cudnn.allow_tf32),
else "ieee"; float16 / bfloat16 inputs go to tensor cores as they are, accumulating in float32.

On CUDA the block sizes are autotuned per shape (``CONFIGS``, keyed on the problem size); under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors) a fixed small configuration runs instead.
"""

from __future__ import annotations

import torch
import triton
import triton.testing
import triton.language as tl

from fastseg._backend import triton_interpreting
from fastseg.ops._indexing import needs_int64


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an implicit GEMM; autotuned on CUDA per shape. The input
# gradient's GEMM uses these (conv_backward_kernels.DGRAD_CONFIGS).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# The forward's: those, and Hopper-sized tiles. A 128x256 tile covers an ASPP branch's 256 output channels, so
# each gathered input tile is loaded once instead of twice (in shared memory 64-128 KB for half precision, 192
# KB for float32; float32 with TF32 exceeds the H100's 227 KB: the autotuner drops them then).
CONFIGS = GEMM_CONFIGS + [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# Under the interpreter: one small configuration (tl.dot needs every block dimension >= 16).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}
# Split-K: the programs it aims at per SM, and the fewest reduction steps (of 64 channels) a range may have
# (shorter ranges spend more on the workspace and its sum than they win in parallelism).
_SPLIT_PROGRAMS_PER_SM = 3
_SPLIT_MIN_STEPS = 32
_SPLIT_STEP_CHANNELS = 64
# The epilogue kernel's tile: pixels x output channels.
_EPILOGUE_BLOCK_M = 64
_EPILOGUE_BLOCK_N = 64
# The problem: sizes, window, precision, and x's channel stride (1 for channels_last: the layout).
_AUTOTUNE_KEY = ["N", "C", "H", "W", "K", "OH", "OW", "KH", "KW", "SH", "SW", "DH", "DW", "FP32_INPUTS",
                 "ALLOW_TF32", "sxc"]

# depthwise: BLOCK_P output pixels x BLOCK_C output channels per program
_DW_BLOCK_P = 64
_DW_BLOCK_C = 32
_DW_WARPS = 4


@triton.jit
def _epilogue(acc, co, co_ok, pix_off_out, pix_ok, out_ptr, soc,
              bias_ptr, scale_ptr, shift_ptr, res_ptr, res_pix_off, src,
              HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """act((acc + bias) * scale + shift + residual) in float32, stored at out[pixel, co]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    mask = pix_ok[:, None] & co_ok[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + res_pix_off[:, None] + co[None, :] * src, mask=mask, other=0.0)
        acc += r.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + pix_off_out[:, None] + co[None, :] * soc, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_coords(offs, OH, OW, INDEX_64: tl.constexpr):
    """(n, oh, ow) of flat output-pixel indices offs = (n*OH + oh)*OW + ow."""
    if INDEX_64:
        offs = offs.to(tl.int64)
    ow = offs % OW
    t = offs // OW
    oh = t % OH
    n = t // OH
    return n, oh, ow


@triton.jit
def _block_range(start, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """start + [0, BLOCK): a block of channel indices, int64 with INDEX_64 (in NCHW a channel's offset c * H * W
    passes 2**31 in an image that large, as the pixels' offsets do)."""
    offs = start + tl.arange(0, BLOCK)
    if INDEX_64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _dot(a, b, acc, FP32_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr):
    if FP32_INPUTS:
        if ALLOW_TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)  # float16 / bfloat16 operands, float32 accumulator


@triton.jit
def _igemm_step(acc, x_rows, rows_ok, w_cols, cols_ok, c, C, sxc, swc, EVEN_C: tl.constexpr,
                FP32_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc += x[rows, c] @ w[c, cols] for one tap: x_rows [BLOCK_M] pointers to the rows' input pixels at this tap
    (rows_ok: inside the image), w_cols [1, BLOCK_N] pointers to the columns' weights at this tap, c [BLOCK_K]
    input channels (past C: zero)."""
    if EVEN_C:  # every channel block full: the masks are the rows' and the columns' alone (loop invariants)
        a = tl.load(x_rows[:, None] + c[None, :] * sxc, mask=rows_ok[:, None], other=0.0)
        b = tl.load(w_cols + c[:, None] * swc, mask=cols_ok[None, :], other=0.0)
    else:
        c_ok = c < C
        a = tl.load(x_rows[:, None] + c[None, :] * sxc, mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols + c[:, None] * swc, mask=c_ok[:, None] & cols_ok[None, :], other=0.0)
    return _dot(a, b, acc, FP32_INPUTS, ALLOW_TF32)


# Sizes and the window are not specialized on (Triton would compile a kernel per pattern of "== 1" and
# "divisible by 16" among them, i.e. per layer shape); the strides are, for the alignment of vector loads.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
                               "SPLIT_CHANNELS"])
def _conv2d_igemm_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, ws_ptr,
    N, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swh, sww,
    son, soc, soh, sow,
    srn, src, srh, srw,
    KH, KW, SH, SW, PH, PW, DH, DW, SPLIT_CHANNELS,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr,
    FP32_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    TAPS_OUTER: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C: input channels, K: output channels (the GEMM's N dimension). The window (KH, KW, stride, padding,
    # dilation) is runtime: the loop below walks the taps at run time anyway, and constants would compile a
    # kernel per layer shape (a network's first call would compile dozens); the addressing is the same for
    # every layout. With SPLIT, program (., ., s) reduces over the steps of SPLIT_CHANNELS reduction elements
    # (taps x channels) starting at s * SPLIT_CHANNELS and writes the float32 sum to ws[s] ([M, K] row-major).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, oh, ow = _pixel_coords(offs_m, OH, OW, INDEX_64)
    co = _block_range(pid_n * BLOCK_N, BLOCK_N, INDEX_64)
    co_ok = co < K
    ci = _block_range(0, BLOCK_K, INDEX_64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_pix = x_ptr + n * sxn
    w_co = w_ptr + co[None, :] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_cb = tl.cdiv(C, BLOCK_K)
    steps = KH * KW * num_cb
    first = 0
    if SPLIT:
        # SPLIT_CHANNELS is a multiple of every configuration's BLOCK_K; ranges past the last step sum nothing.
        first = tl.program_id(2) * (SPLIT_CHANNELS // BLOCK_K)
        steps = tl.minimum(steps, first + SPLIT_CHANNELS // BLOCK_K)
    if TAPS_OUTER:
        # Taps outer, channel blocks inner: the rows' input offsets and padding mask are computed once per tap,
        # and a step of the inner loop only moves along the channels (in sm_90 SASS, half the instructions per
        # step of the flat loop below). Triton drains its software pipeline at the end of each inner loop, so
        # this pays where a tap has many channel blocks (see taps_outer).
        for tap in range(first // num_cb, tl.cdiv(steps, num_cb)):
            r = tap // KW
            s = tap - r * KW
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tap = x_pix + ih * sxh + iw * sxw
            w_tap = w_co + r * swh + s * sww
            for cb in range(tl.maximum(first - tap * num_cb, 0), tl.minimum(steps - tap * num_cb, num_cb)):
                c = cb * BLOCK_K + ci
                acc = _igemm_step(acc, x_tap, ok, w_tap, co_ok, c, C, sxc, swc, EVEN_C, FP32_INPUTS, ALLOW_TF32)
    else:
        # One flat loop over (tap, channel block), channel blocks fastest: a single loop that Triton can software-
        # pipeline whatever the channel count (a 64-channel layer has one channel block per tap).
        for it in range(first, steps):
            tap = it // num_cb
            c = (it - tap * num_cb) * BLOCK_K + ci
            r = tap // KW
            s = tap - r * KW
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            acc = _igemm_step(acc, x_pix + ih * sxh + iw * sxw, ok, w_co + r * swh + s * sww, co_ok, c, C, sxc, swc,
                              EVEN_C, FP32_INPUTS, ALLOW_TF32)
    if SPLIT:
        ws = ws_ptr + tl.program_id(2).to(tl.int64) * M * K
        if INDEX_64:
            offs_m = offs_m.to(tl.int64)
        tl.store(ws + offs_m[:, None] * K + co[None, :], acc, mask=m_ok[:, None] & co_ok[None, :])
    else:
        _epilogue(acc, co, co_ok, n * son + oh * soh + ow * sow, m_ok, out_ptr, soc,
                  bias_ptr, scale_ptr, shift_ptr, res_ptr, n * srn + oh * srh + ow * srw, src,
                  HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU)


def autotune_bench(kernel_call, quantiles):
    """The autotuner's timing of one configuration: 25 ms of repeats (Triton's default is 100 ms). A network's
    first call tunes every new convolution problem over all CONFIGS (the backward's too), and these kernels
    take 0.05-2 ms, so 25 ms of repeats still rank the configurations while the first call costs a quarter."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def prune_configs(configs, named_args, **kwargs):
    """The configurations worth timing for a problem: those whose tile is no wider than the output channels K
    and no taller than the output pixels M, each rounded up to a power of two (a wider tile multiplies zeros
    for the same outputs as a narrower one), at least the narrowest. A 64-channel layer then times 4
    configurations instead of 10, and each configuration of a new kernel variant is a compilation."""
    K = named_args["K"]
    M = named_args["N"] * named_args["OH"] * named_args["OW"]
    fits = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(K))
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(M))]
    return fits or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]))]


def _full_channel_blocks(args) -> bool:
    """EVEN_C: every BLOCK_K slice of the input channels is full, so the loads need no channel mask (in sm_90 SASS
    about 30 instructions fewer per step: the masks left are loop invariants)."""
    return args["C"] % args["BLOCK_K"] == 0


_conv2d_igemm = triton.heuristics({"EVEN_C": _full_channel_blocks})(_conv2d_igemm_kernel)
_conv2d_igemm_tuned = triton.autotune(configs=CONFIGS, key=_AUTOTUNE_KEY + ["SPLIT", "TAPS_OUTER"],
                                      do_bench=autotune_bench,
                                      prune_configs_by={"early_config_prune": prune_configs})(_conv2d_igemm)


@triton.jit(do_not_specialize=["SPLIT_STRIDE"])
def _epilogue_kernel(
    ws_ptr, out_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr,
    K, OH, OW, M, SPLITS, SPLIT_STRIDE,
    swn, swc, swh, sww,
    son, soc, soh, sow,
    srn, src, srh, srw,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = epilogue(sum over s of ws[s]) for SPLITS partial results ws[s] of shape (N, K, OH, OW) at strides
    (swn, swc, swh, sww), SPLIT_STRIDE elements apart (passed in: a product of scalar arguments could overflow
    int32), summed in float32 in order s = 0, 1, ... (deterministic). Two uses: the split-K partial sums (a float32
    workspace [SPLITS, M, K], row-major), and a convolution's output from cuDNN (one "split", in place: out is ws;
    each program reads its whole tile before it writes it)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, oh, ow = _pixel_coords(offs_m, OH, OW, INDEX_64)
    co = _block_range(tl.program_id(1) * BLOCK_N, BLOCK_N, INDEX_64)
    co_ok = co < K
    ws = ws_ptr + (n * swn + oh * swh + ow * sww)[:, None] + co[None, :] * swc
    mask = m_ok[:, None] & co_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(SPLITS):
        acc += tl.load(ws, mask=mask, other=0.0).to(tl.float32)
        ws += SPLIT_STRIDE
    _epilogue(acc, co, co_ok, n * son + oh * soh + ow * sow, m_ok, out_ptr, soc,
              bias_ptr, scale_ptr, shift_ptr, res_ptr, n * srn + oh * srh + ow * srw, src,
              HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU)


@triton.jit
def _conv2d_depthwise_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr,
    N, C, H, W, K, OH, OW, MULT,
    sxn, sxc, sxh, sxw,
    swk, swc, swh, sww,
    son, soc, soh, sow,
    srn, src, srh, srw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Output channel co reads input channel co // MULT and its own (1, KH, KW) filter.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * OH * OW
    offs_m = pid_m * BLOCK_P + tl.arange(0, BLOCK_P)
    m_ok = offs_m < M
    n, oh, ow = _pixel_coords(offs_m, OH, OW, INDEX_64)
    co = _block_range(pid_n * BLOCK_C, BLOCK_C, INDEX_64)
    co_ok = co < K
    cin = co // MULT
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_base = x_ptr + (n * sxn)[:, None] + (cin * sxc)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for r in tl.static_range(KH):
        ih = ih0 + r * DH
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for s in tl.static_range(KW):
            iw = iw0 + s * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_base + (ih * sxh + iw * sxw)[:, None], mask=ok[:, None] & co_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + co * swk + r * swh + s * sww, mask=co_ok, other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    _epilogue(acc, co, co_ok, n * son + oh * soh + ow * sow, m_ok, out_ptr, soc,
              bias_ptr, scale_ptr, shift_ptr, res_ptr, n * srn + oh * srh + ow * srw, src,
              HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU)


def _reduction_steps(weight) -> int:
    """The implicit GEMM's reduction in steps of _SPLIT_STEP_CHANNELS channels of one tap."""
    _, C, KH, KW = weight.shape
    return KH * KW * triton.cdiv(C, _SPLIT_STEP_CHANNELS)


def reduction_split(x, weight, out) -> int:
    """How many ranges the implicit GEMM's reduction is cut into on this device: 1 when the output tiles fill
    the GPU by themselves or the reduction is too short to share."""
    if not x.is_cuda:
        return 1
    K = weight.shape[0]
    M = out.shape[0] * out.shape[2] * out.shape[3]
    tiles = triton.cdiv(M, 128) * triton.cdiv(K, 128)  # at the largest configurations' tile size
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(triton.cdiv(_SPLIT_PROGRAMS_PER_SM * sms, tiles), _reduction_steps(weight) // _SPLIT_MIN_STEPS))


def split_ranges(weight, split: int) -> tuple[int, int]:
    """(ranges, reduction elements per range) for cutting the reduction into at most `split` ranges of whole
    steps: at most one range per step, none of them empty."""
    steps = _reduction_steps(weight)
    per_range = triton.cdiv(steps, min(max(split, 1), steps))
    return triton.cdiv(steps, per_range), per_range * _SPLIT_STEP_CHANNELS


def taps_outer(channels: int, taps: int, loop_order: str | None = None) -> bool:
    """Whether the forward's implicit GEMM, reducing over ``taps`` x ``channels``, walks the taps in an outer loop
    and the channel blocks of each in an inner one (``TAPS_OUTER``) rather than both in one flat loop.

    By default (``loop_order`` None): for a single tap (1x1: nothing to drain) and from 512 channels (8 or more
    steps of 64 per tap). From sm_90 SASS (Triton 3.6, bf16, BLOCK_K 64): a step of the flat loop is 259
    instructions at a 128x128 tile (286 at 128x256), of the inner loop 120 (134); with full channel blocks
    (EVEN_C) 234 (255) and 91 (107). With two 128x128 programs of 8 warps per SM, the flat loop's steps take
    about as many issue cycles (~1000) as the tensor cores need for them, the inner loop's half or less. But the
    software pipeline drains and refills at each tap, a cost that shrinks with the steps per tap. GPU timings
    (the bench's target rows time both orders) set this threshold. ``loop_order`` "taps_outer" or "flat" forces
    one (tests). The input gradient's kernel keeps its flat loop: there the grad_z tile's loads, ReLU mask and
    scale dominate a step, and taps outside would save only 420 -> 363 instructions per step while raising its
    registers from 151 to 221."""
    if loop_order is None:
        return taps == 1 or channels >= 8 * _SPLIT_STEP_CHANNELS
    if loop_order not in ("taps_outer", "flat"):
        raise ValueError(f"loop_order must be None, 'taps_outer' or 'flat', not {loop_order!r}")
    return loop_order == "taps_outer"


def forward(x, weight, bias, scale, shift, residual, out, stride, padding, dilation, groups, relu, allow_tf32,
            config=None, split=None, loop_order=None) -> None:
    """Write act((conv2d(x, weight) + bias) * scale + shift + residual) into ``out``, every element of it.

    ``x`` (N, C, H, W), ``weight`` (K, C/groups, KH, KW), ``out`` and ``residual`` (N, K, OH, OW), bias, scale
    and shift (K,) or None. groups is 1 or C (depthwise). ``padding`` is the (top, left) padding; ``out``'s
    size fixes OH and OW (so asymmetric "same" padding needs nothing else). ``config``: a dict of block sizes
    (and optionally num_warps / num_stages) to bypass autotuning, e.g. one of ``CONFIGS``' kwargs (tests).
    ``split``: the number of reduction ranges of the implicit GEMM (default :func:`reduction_split`'s; at most
    one per reduction step of 64 channels); above 1 their float32 partial sums go to a workspace that a second
    kernel sums in order and finishes with the epilogue. ``loop_order``: None (:func:`taps_outer` decides),
    "taps_outer" or "flat": the implicit GEMM's loop structure.
    """
    if out.numel() == 0:
        return
    N, C, H, W = x.shape
    K, _, KH, KW = weight.shape
    OH, OW = out.shape[2:]
    dummy = out  # never read: its HAS_* flag is False
    res = residual if residual is not None else dummy
    epilogue = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                    HAS_RESIDUAL=residual is not None, RELU=bool(relu))
    common = dict(KH=KH, KW=KW, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0],
                  DW=dilation[1], INDEX_64=needs_int64(x, weight, out, residual), **epilogue)
    if x.is_cuda and groups == 1:
        # Weights repacked with output channels fastest (a view of shape (K, C, KH, KW)): the [BLOCK_K, BLOCK_N]
        # weight tiles then load as contiguous runs. One small copy per call (the weights, not activations).
        weight = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    epilogue_args = (bias if bias is not None else dummy, scale if scale is not None else dummy,
                     shift if shift is not None else dummy, res)
    strides = (*x.stride(), *weight.stride(), *out.stride(), *res.stride())
    M = N * OH * OW
    if groups != 1:
        grid = (triton.cdiv(M, _DW_BLOCK_P), triton.cdiv(K, _DW_BLOCK_C))
        _conv2d_depthwise_kernel[grid](x, weight, out, *epilogue_args, N, C, H, W, K, OH, OW, K // C, *strides,
                                       **common, BLOCK_P=_DW_BLOCK_P, BLOCK_C=_DW_BLOCK_C, num_warps=_DW_WARPS)
        return
    splits, split_channels = split_ranges(weight, reduction_split(x, weight, out) if split is None else split)
    workspace = torch.empty((splits, M, K), dtype=torch.float32, device=x.device) if splits > 1 else dummy
    common.update(FP32_INPUTS=x.dtype == torch.float32, ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
                  SPLIT=splits > 1,
                  TAPS_OUTER=taps_outer(C, KH * KW, loop_order))
    if splits > 1:  # the epilogue kernel applies it: one compiled split kernel serves every epilogue
        common.update({flag: False for flag in epilogue})
    common["INDEX_64"] = common["INDEX_64"] or (splits > 1 and needs_int64(workspace))
    args = (x, weight, out, *epilogue_args, workspace, N, C, H, W, K, OH, OW, *strides)
    if config is None and triton_interpreting():
        config = INTERPRETER_CONFIG
    if config is not None:
        meta = dict(config)
        grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]), splits)
        _conv2d_igemm[grid](*args, SPLIT_CHANNELS=split_channels, **common, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]), splits)

        _conv2d_igemm_tuned[grid](*args, SPLIT_CHANNELS=split_channels, **common)
    if splits > 1:  # the workspace [splits, M, K] row-major: (n, k, oh, ow) at n*OH*OW*K + (oh*OW + ow)*K + k
        _launch_epilogue(workspace, (OH * OW * K, 1, OW * K, K), splits, M * K, out, epilogue_args,
                         common["INDEX_64"], epilogue)


def _launch_epilogue(ws, ws_strides, splits, split_stride, out, epilogue_args, index_64, epilogue) -> None:
    N, K, OH, OW = out.shape
    M = N * OH * OW
    grid = (triton.cdiv(M, _EPILOGUE_BLOCK_M), triton.cdiv(K, _EPILOGUE_BLOCK_N))
    _epilogue_kernel[grid](ws, out, *epilogue_args, K, OH, OW, M, splits, split_stride, *ws_strides, *out.stride(),
                           *epilogue_args[3].stride(), INDEX_64=index_64, **epilogue,
                           BLOCK_M=_EPILOGUE_BLOCK_M, BLOCK_N=_EPILOGUE_BLOCK_N)


def bias_residual_relu_(y, bias, residual, relu) -> None:
    """y = act(y + bias + residual) in place, one pass (float32 arithmetic, rounded once): the epilogue of a
    convolution computed elsewhere (cuDNN's, in ops.conv.folded_conv2d), where torch would add the bias, the
    residual and apply the ReLU in a pass each. y (N, K, OH, OW) in any layout; bias (K,) and residual (y's
    shape) optional."""
    if y.numel() == 0:
        return
    res = residual if residual is not None else y
    epilogue = dict(HAS_BIAS=bias is not None, HAS_SCALE=False, HAS_SHIFT=False, HAS_RESIDUAL=residual is not None,
                    RELU=bool(relu))
    _launch_epilogue(y, y.stride(), 1, 0, y, (bias if bias is not None else y, y, y, res), needs_int64(y, res),
                     epilogue)


def config_kwargs(config: triton.Config) -> dict:
    """A ``CONFIGS`` entry as the ``config`` argument of :func:`forward`."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
