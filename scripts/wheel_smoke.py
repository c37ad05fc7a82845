"""Smoke test of an installed fastseg (run by scripts/check_wheels.sh in a fresh virtual environment, outside
the source tree): it imports, reports the build it should, and every op runs on the CPU and agrees with
PyTorch or its reference.

    python wheel_smoke.py --variant cpu|cu130 [--cuda-kernels 0|1]
"""

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's CPU interpreter, set before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastseg  # noqa: E402
from fastseg import _backend  # noqa: E402


def check(cond, what):
    if not cond:
        sys.exit(f"wheel_smoke: FAILED: {what}")
    print(f"  ok  {what}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--cuda-kernels", type=int, choices=(0, 1), required=True)
    parser.add_argument("--from-source", action="store_true", help="allow a source tree (not an installed wheel)")
    args = parser.parse_args()

    here = os.path.dirname(os.path.abspath(fastseg.__file__))
    if not args.from_source:
        check("site-packages" in here, f"fastseg imported from the installed wheel ({here})")
    info = fastseg.build_info()
    check(fastseg.__version__.endswith("+" + args.variant), f"fastseg.__version__ {fastseg.__version__}")
    check(info["version"] == fastseg.__version__, "build_info()['version'] == fastseg.__version__")
    check(info["extension_loaded"] and info["extension_error"] is None,
          f"fastseg._C loaded (error: {info['extension_error']})")
    check(info["cuda_kernels"] is bool(args.cuda_kernels), f"cuda_kernels is {info['cuda_kernels']}")
    check(info["torch_version"] == torch.__version__, f"built against the torch installed ({info['torch_version']})")
    import importlib.metadata

    if not args.from_source:
        check(importlib.metadata.version("fastseg") == fastseg.__version__, "pip's version == fastseg.__version__")
    typed = os.path.join(here, "py.typed")
    check(os.path.exists(typed), "py.typed installed")

    # max-pool, with indices, unpool: every backend that runs on the CPU here, against PyTorch
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    exp_out, exp_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    (exp_grad,) = torch.autograd.grad(exp_out.sum(), x)
    for name in ("extension", "reference", "triton"):
        if name == "triton" and not _backend.triton_available():
            continue
        with fastseg.backend(name):
            out, idx = fastseg.max_pool2d_with_indices(x, 3, 2, 1)
            (grad,) = torch.autograd.grad(out.sum(), x)
            plain = fastseg.max_pool2d(x.detach(), 3, 2, 1)
            up = fastseg.max_unpool2d(out.detach(), idx, 3, 2, 1, output_size=x.shape[-2:]) \
                if name != "extension" else None
        check(torch.equal(out, exp_out) and torch.equal(idx, exp_idx) and torch.equal(plain, exp_out.detach())
              and torch.equal(grad, exp_grad), f"max_pool2d / max_pool2d_with_indices / backward [{name}]")
        if up is not None:
            ref_up = F.max_unpool2d(exp_out.detach(), exp_idx, 3, 2, 1, output_size=x.shape[-2:])
            check(torch.equal(up, ref_up), f"max_unpool2d [{name}]")
    with fastseg.backend("aten"):
        up = fastseg.max_unpool2d(exp_out.detach(), exp_idx, 3, 2, 1, output_size=x.shape[-2:])
    check(torch.equal(up, F.max_unpool2d(exp_out.detach(), exp_idx, 3, 2, 1, output_size=x.shape[-2:])),
          "max_unpool2d [aten]")

    # the permutohedral lattice: extension against the reference
    features = torch.randn(1, 3, 6, 7) * 2
    values = torch.randn(1, 2, 6, 7)
    results = {}
    for name in ("extension", "reference"):
        with fastseg.backend(name):
            lattice = fastseg.PermutohedralLattice(features)
            results[name] = lattice.filter(values, normalization="symmetric")
    torch.testing.assert_close(results["extension"], results["reference"], rtol=1e-4, atol=1e-5)
    check(True, "PermutohedralLattice.filter [extension] == [reference]")

    # the dense CRF, tiny
    logits = torch.randn(1, 3, 8, 9)
    image = torch.rand(1, 3, 8, 9) * 255
    probs = {}
    for name in ("extension", "reference"):
        with fastseg.backend(name):
            probs[name] = fastseg.dense_crf(logits, image, iterations=3)
    p = probs["extension"]
    check(p.shape == logits.shape and torch.allclose(p.sum(1), torch.ones(1, 8, 9), atol=1e-5),
          "dense_crf gives probabilities")
    torch.testing.assert_close(probs["extension"], probs["reference"], rtol=1e-4, atol=1e-5)
    check(True, "dense_crf [extension] == [reference]")

    # the fused convolution: its CPU backends against F.conv2d + folded affine + ReLU
    xc, weight, bias = torch.randn(1, 4, 7, 9), torch.randn(5, 4, 3, 3), torch.randn(5)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    expected = torch.relu(F.conv2d(xc, weight, bias, padding=2, dilation=2) * scale[:, None, None]
                          + shift[:, None, None])
    for name in ("reference", "aten", "triton"):
        if name == "triton" and not (_backend.triton_available() and _backend.triton_interpreting()):
            continue
        with fastseg.backend(name):
            y = fastseg.fused_conv2d(xc, weight, bias, padding=2, dilation=2, scale=scale, shift=shift,
                                     activation="relu")
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        check(True, f"fused_conv2d [{name}]")

    # any other op registered (new ops get at least an import-level check here)
    known = {"fused_conv2d", "max_pool2d", "max_unpool2d", "permutohedral_lattice"}
    for op, have in sorted(_backend.registered_ops().items()):
        if op not in known:
            print(f"  --  {op} [{', '.join(sorted(have))}]: registered, no smoke test in wheel_smoke.py yet")
    print("wheel_smoke: all ok")


if __name__ == "__main__":
    main()
