"""Builds fastseg's CUDA sources as a CPU extension that runs them (cuda_emulation.h says how and what it cannot show).

``load()`` rewrites csrc/**/*.cu (and the .cuh headers they include) and csrc/fastseg.cpp into
build/cuda_emulation/src, compiles them with g++ through torch.utils.cpp_extension (cached: later calls with the
same sources only load), and returns torch.ops.fastseg_cuda_emu, where each CUDA kernel of fastseg::<op> is
registered as fastseg_cuda_emu::<op> for CPU tensors, next to the real CPU kernels under torch.ops.fastseg.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emulation"
NAMESPACE = "fastseg_cuda_emu"

# kernel<<<grid, block, shared, stream>>>(args): the kernel's name may be qualified and carry template arguments.
_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.DOTALL)
_CUDA_INCLUDE = re.compile(r"^#include <(?:c10/cuda/[^>]+|cuda_runtime(?:_api)?\.h)>\n", re.MULTILINE)


def rewrite_cuda(text: str) -> str:
    """A .cu / .cuh file as C++ for cuda_emulation.h: launches through fastseg_emu::launch, c10::cuda's stream and
    guard replaced, the kernels registered for CPU tensors under NAMESPACE."""
    impl = "TORCH_LIBRARY_IMPL(fastseg, CUDA, m)"
    text = _CUDA_INCLUDE.sub("", text)
    text = _LAUNCH.sub(lambda m: f"fastseg_emu::launch(fastseg_emu::Config{{{m['config']}}}, {m['kernel']}, ", text)
    text = text.replace("c10::cuda::", "fastseg_emu::").replace("at::kCUDA", "at::kCPU")
    if "<<<" in text or "__shared__" in text or "__syncthreads" in text:
        raise RuntimeError("cuda emulation: a launch or a block-level construct the rewrite does not handle")
    return text.replace(impl, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")


def rewrite_schemas(text: str) -> str:
    """csrc/fastseg.cpp (the schemas) defining them under NAMESPACE, with the build facts it requires."""
    defines = "".join(f'#define {name} "cuda emulation"\n' for name in ("FASTSEG_VERSION", "FASTSEG_TORCH_VERSION"))
    defines += '#define FASTSEG_CUDA_VERSION ""\n#define FASTSEG_ARCH_LIST ""\n'
    return defines + text.replace("TORCH_LIBRARY(fastseg, m)", f"TORCH_LIBRARY({NAMESPACE}, m)")


def _write(path: Path, text: str) -> None:
    """Writes text unless the file already holds it (concurrent test workers: each writes whole files)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sources() -> list[Path]:
    """Writes the rewritten sources; returns the files to compile (the .cu files renamed .cpp)."""
    src = BUILD / "src"
    compiled = []
    for path in sorted(CSRC.rglob("*.cu")) + sorted(CSRC.rglob("*.cuh")):
        relative = path.relative_to(CSRC)
        target = src / (relative.with_suffix(".cpp") if path.suffix == ".cu" else relative)
        _write(target, rewrite_cuda(path.read_text()))
        if path.suffix == ".cu":
            compiled.append(target)
    schemas = src / "schemas.cpp"
    _write(schemas, rewrite_schemas((CSRC / "fastseg.cpp").read_text()))
    return [schemas] + compiled


def load(address_sanitizer: bool = False):
    """Builds (or loads the cached build of) the emulation extension; returns torch.ops.fastseg_cuda_emu.

    address_sanitizer: compiled with -fsanitize=address, so that every access of a kernel outside the tensors'
    memory aborts with a report; such a build loads only into a process that starts with libasan preloaded
    (asan_environment())."""
    from torch.utils import cpp_extension

    files = sources()
    name = NAMESPACE + ("_asan" if address_sanitizer else "")
    flags = ["-fsanitize=address", "-fno-omit-frame-pointer"] if address_sanitizer else []
    out = BUILD / name
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(f) for f in files],
        # The rewritten headers first: the .cpp files include "lattice/cuda/passes.cuh" by its csrc path.
        extra_include_paths=[str(BUILD / "src"), str(CSRC)],
        extra_cflags=["-O1", "-include", str(HERE / "cuda_emulation.h"), "-Wno-unknown-pragmas"] + flags,
        extra_ldflags=flags,
        build_directory=str(out),
        verbose=False,
    )
    return getattr(torch.ops, NAMESPACE)


def asan_environment() -> dict[str, str]:
    """The environment of a Python process that can load the address-sanitized build: the compiler's libasan
    preloaded (it must come before every other library), leak reports off (Python and torch keep memory to
    the end by design)."""
    import subprocess

    def library(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()

    # libstdc++ too: the sanitizer's __cxa_throw interceptor needs it loaded when the sanitizer starts (the
    # python executable does not link it), else the first C++ exception (a TORCH_CHECK) aborts.
    return dict(os.environ, LD_PRELOAD=f"{library('libasan.so')}:{library('libstdc++.so')}",
                ASAN_OPTIONS="detect_leaks=0")
