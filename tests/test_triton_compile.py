"""Every Triton kernel compiles for the GPU (sm_90, as on an H100 / H200) with the specializations a GPU run gives it,
without a GPU.

The other CPU tests run the kernels through Triton's interpreter, which never compiles them: it cannot see a
kernel that fails to compile, and it never specializes an integer argument equal to 1 into a constant (which
the compiler does, so `M.to(tl.int64)` on such an argument breaks only on a GPU). Here a child process (without
TRITON_INTERPRET) compiles each kernel down to a cubin for sm_90 in a few variants: its flags on and off, 64-bit
offsets, and every specializable integer argument equal to 1. Nothing runs.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMPILE_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastseg.ops import conv_backward_kernels as cb, conv_kernels as ck, max_pool_kernels as mk

    TARGET = GPUTarget("cuda", 90, 32)
    HALF = "*bf16"
    results = []

    def compile_variant(kernel, label, pointers, constexprs, ones=False, num_warps=4):
        """Compile `kernel` with `pointers` {name: type} (others: i32 scalars, or the constant 1 for the
        specializable ones when `ones`) and `constexprs` {name: value}."""
        signature, constants = {}, {}
        for index, name in enumerate(kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                constants[(index,)] = constexprs[name]
            elif name in pointers:
                signature[name] = pointers[name]
            elif ones and index not in kernel.do_not_specialize:
                signature[name] = "constexpr"
                constants[(index,)] = 1
            else:
                signature[name] = "i32"
        try:
            triton.compile(ASTSource(kernel, signature, constants), target=TARGET,
                           options=dict(num_warps=num_warps))
            results.append([label, None])
        except Exception as error:  # reported, not raised: every variant gets its verdict
            results.append([label, f"{type(error).__name__}: {str(error)[-800:]}"])

    def variants(kernel, name, pointers, base, flips, **kw):
        compile_variant(kernel, f"{name}", pointers, base, **kw)
        for flip in flips:
            compile_variant(kernel, f"{name} {flip}", pointers, dict(base, **flip), **kw)
        compile_variant(kernel, f"{name} sizes==1", pointers, base, ones=True, **kw)

    @triton.jit
    def probe(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    compile_variant(probe, "probe", {"x_ptr": "*fp32"}, {"BLOCK": 128})
    if results[0][1] is not None:
        print(json.dumps({"unavailable": results[0][1]}))
        sys.exit(0)

    epilogue = dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=True, RELU=True)
    conv_pointers = dict(x_ptr=HALF, w_ptr=HALF, out_ptr=HALF, bias_ptr=HALF, scale_ptr="*fp32",
                         shift_ptr="*fp32", res_ptr=HALF, ws_ptr="*fp32")
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    variants(ck._conv2d_igemm_kernel, "conv forward", conv_pointers,
             dict(epilogue, SPLIT=False, FP32_INPUTS=False, ALLOW_TF32=False, INDEX_64=False, TAPS_OUTER=False,
                  EVEN_C=False, **tile),
             [dict(SPLIT=True), dict(INDEX_64=True, SPLIT=True), dict(HAS_RESIDUAL=False, RELU=False),
              dict(TAPS_OUTER=True), dict(TAPS_OUTER=True, SPLIT=True, INDEX_64=True), dict(EVEN_C=True),
              dict(EVEN_C=True, TAPS_OUTER=True)],
             num_warps=8)
    compile_variant(ck._conv2d_igemm_kernel, "conv forward float32 tf32",
                    dict(conv_pointers, x_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", bias_ptr="*fp32",
                         res_ptr="*fp32"),
                    dict(epilogue, SPLIT=False, FP32_INPUTS=True, ALLOW_TF32=True, INDEX_64=False, TAPS_OUTER=True,
                         EVEN_C=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32))
    variants(ck._epilogue_kernel, "conv epilogue (split-K sum)", conv_pointers,
             dict(epilogue, INDEX_64=False, BLOCK_M=64, BLOCK_N=64), [dict(INDEX_64=True)])
    compile_variant(ck._epilogue_kernel, "conv epilogue (cuDNN's output, in place)", dict(conv_pointers, ws_ptr=HALF),
                    dict(epilogue, HAS_SCALE=False, HAS_SHIFT=False, INDEX_64=False, BLOCK_M=64, BLOCK_N=64))
    window = dict(KH=3, KW=3, SH=1, SW=1, PH=2, PW=2, DH=2, DW=2)
    variants(ck._conv2d_depthwise_kernel, "conv depthwise", conv_pointers,
             dict(window, **epilogue, INDEX_64=False, BLOCK_P=64, BLOCK_C=32), [dict(INDEX_64=True)])
    grad_pointers = dict(g_ptr=HALF, out_ptr=HALF, scale_ptr="*fp32", w_ptr=HALF, gx_ptr=HALF, x_ptr=HALF,
                         gw_ptr="*fp32")
    grad_flags = dict(RELU=True, HAS_SCALE=True, FP32_INPUTS=False, ALLOW_TF32=False, CHANNELS_LAST=True,
                      INDEX_64=False, **tile)
    variants(cb._conv2d_dgrad_kernel, "conv input gradient", grad_pointers,
             dict(window, STEP_H=1, STEP_W=1, **grad_flags), [dict(SH=2, SW=2, STEP_H=2, STEP_W=2)],
             num_warps=8)
    variants(cb._conv2d_wgrad_kernel, "conv weight gradient", grad_pointers, dict(window, **grad_flags),
             [dict(CHANNELS_LAST=False, INDEX_64=True)], num_warps=8)
    pool_pointers = dict(x_ptr=HALF, out_ptr=HALF, arg_ptr="*i8", gout_ptr=HALF, gin_ptr=HALF, idx_ptr="*i64")
    pool = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, PLANE_ARGMAX=False, COMPUTE_FP64=False,
                CHANNELS_LAST=True, FLAT=False, INDEX_64=False, BLOCK_M=16, BLOCK_K=64)
    variants(mk._max_pool2d_fwd_kernel, "max-pool forward", pool_pointers, dict(pool, BOUNDED=True),
             [dict(BOUNDED=False, CHANNELS_LAST=False, FLAT=True, BLOCK_M=1, BLOCK_K=1024)])
    compile_variant(mk._max_pool2d_fwd_kernel, "max-pool forward int64 indices",
                    dict(pool_pointers, arg_ptr="*i64"), dict(pool, BOUNDED=True, PLANE_ARGMAX=True, INDEX_64=True))
    variants(mk._max_pool2d_bwd_kernel, "max-pool backward", pool_pointers, pool,
             [dict(CHANNELS_LAST=False, FLAT=True, BLOCK_M=1, BLOCK_K=1024)])
    unpool = dict(PLANE_LINEAR=True, WIDE_INDEX=True, CHANNELS_LAST=False, FLAT=True, INDEX_64=False, BLOCK_M=1,
                  BLOCK_K=1024)
    variants(mk._max_unpool2d_kernel, "max-unpool", pool_pointers, unpool, [dict(PLANE_LINEAR=False)])
    variants(mk._max_unpool2d_bwd_kernel, "max-unpool backward", pool_pointers, unpool,
             [dict(WIDE_INDEX=False, INDEX_64=True)])
    print(json.dumps({"results": results}))
''')


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = tmp_path / "compile_kernels.py"  # a file: @triton.jit reads its functions' source
    script.write_text(COMPILE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "unavailable" in report:
        pytest.skip(f"this Triton cannot compile a trivial kernel for sm_90 here: {report['unavailable']}")
    failures = {label: error for label, error in report["results"] if error}
    assert not failures, "\n".join(f"{label}: {error}" for label, error in failures.items())
    assert len(report["results"]) >= 30
