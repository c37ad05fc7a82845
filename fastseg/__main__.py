"""Command line: `python -m fastseg info | bench [options] | demo [options]`."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

import torch

import fastseg
from fastseg import _backend


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _backend_for(op: str, device: torch.device) -> str:
    try:
        chosen = _backend.select(op, device)
    except RuntimeError as err:
        return f"unavailable ({err})"
    if op == "fused_conv2d" and chosen == "triton" and device.type == "cuda" and fastseg.current_backend() == "auto":
        return "triton or cuDNN, the fastest per problem (timed on its first call)"
    return chosen


def info() -> int:
    """Print how fastseg was built, what it runs on, and which backend each op uses on each device."""
    print(f"fastseg {fastseg.__version__}")
    for key, value in fastseg.build_info().items():
        print(f"  {key}: {value}")
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}, TRITON_INTERPRET={'1' if _backend.triton_interpreting() else '0'}")
    ext = _backend.extension()
    if ext is not None and fastseg.build_info()["cuda_kernels"]:
        # What the extension's own CUDA runtime sees, which is what its kernels will run on.
        seen = ext.cuda_device_query()
        print(f"fastseg._C CUDA devices: {seen if seen else 'none'}")
    print("devices:")
    for device in _devices():
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            print(f"  {device}: {props.name}, compute capability {props.major}.{props.minor}, "
                  f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB")
        else:
            print(f"  {device}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"backends (fastseg.backend is {fastseg.current_backend()!r}):")
    for op, have in sorted(_backend.registered_ops().items()):
        chosen = ", ".join(f"{device}: {_backend_for(op, device)}" for device in _devices())
        print(f"  {op} [{', '.join(sorted(have))}] -> {chosen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fastseg", description=__doc__)
    parser.add_argument("command", choices=["info", "bench", "demo"],
                        help="info: build, devices and backends; bench: the side-by-side benchmark "
                             "(`python -m fastseg bench --help` for its options); demo: dense-CRF refinement of "
                             "a coarse segmentation of a real image, written as a PNG (`python -m fastseg demo "
                             "--help`)")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        return info()
    if args.command == "demo":
        from fastseg.demo import main as demo_main

        return demo_main(argv[1:])
    from fastseg.bench import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
