"""Build fastseg and its compiled extension fastseg._C.

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

Environment:
    FASTSEG_CUDA           1: build the CUDA kernels (fail if no toolkit), 0: CPU only,
                           auto (default): CUDA when both a CUDA toolkit and a CUDA build of torch are found.
    CUDA_HOME / CUDA_PATH  the CUDA toolkit; otherwise the one of the `nvcc` on PATH, then /usr/local/cuda.
    TORCH_CUDA_ARCH_LIST   the GPU archs to compile for, e.g. "8.0;9.0"; unset: the visible GPUs', or 9.0
                           when there is none.
    MAX_JOBS               parallel compile jobs (read by torch.utils.cpp_extension).

The build always uses the torch that is installed (--no-build-isolation): the extension is ABI-bound to it.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "fastseg"
DEFAULT_ARCH_LIST = "9.0"  # Hopper (H100/H200), the GPUs fastseg targets first


def fail(message):
    sys.exit(f"fastseg setup: error: {message}")


try:
    import torch
except ImportError:
    fail("torch must be installed before building fastseg; build with `pip install --no-build-isolation`")


def read_version():
    text = (ROOT / PACKAGE / "_version.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if match is None:
        fail(f"no __version__ in {PACKAGE}/_version.py")
    return match.group(1)


def is_toolkit(path):
    return path is not None and (Path(path) / "bin" / "nvcc").is_file() and (
        Path(path) / "include" / "cuda_runtime.h"
    ).is_file()


def find_cuda_home():
    """The CUDA toolkit's root, or None.

    An explicit CUDA_HOME/CUDA_PATH wins. Otherwise the `nvcc` on PATH is resolved through symlinks first
    (torch's own guess, dirname(dirname(which nvcc)), lands on /usr/local when /usr/local/bin/nvcc is a link
    or wrapper script), and a candidate counts only if it holds both bin/nvcc and the runtime headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            return value if is_toolkit(value) else None
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if is_toolkit(candidate):
            return str(candidate)
    return None


def toolkit_version(cuda_home):
    out = subprocess.check_output([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        fail(f"cannot read the CUDA version from `{cuda_home}/bin/nvcc --version`")
    return match.group(1)


def want_cuda():
    """(build the CUDA kernels?, toolkit root or None), from FASTSEG_CUDA."""
    mode = os.environ.get("FASTSEG_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        fail(f"FASTSEG_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False, None
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        explicit = [v for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
        where = (
            f"{explicit[0]}={os.environ[explicit[0]]} has no bin/nvcc and include/cuda_runtime.h"
            if explicit
            else "no CUDA_HOME/CUDA_PATH, no usable nvcc on PATH, nothing in /usr/local/cuda"
        )
        problem = f"no CUDA toolkit was found ({where})"
    else:
        return True, cuda_home
    if mode == "1":
        fail(f"FASTSEG_CUDA=1 but {problem}; set CUDA_HOME to a CUDA toolkit, or build with FASTSEG_CUDA=0")
    print(f"fastseg setup: building without CUDA: {problem}", file=sys.stderr)
    return False, None


def visible_gpu_arch_list():
    """What torch.utils.cpp_extension compiles for when TORCH_CUDA_ARCH_LIST is unset: the visible GPUs'
    capabilities (clamped to what this torch supports), the newest also as PTX."""
    supported = [
        (int(a[3:-1]), int(a[-1]))
        for a in torch.cuda.get_arch_list()
        if a.startswith("sm_") and a[3:].isdigit()
    ]
    archs = set()
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        if supported:
            cap = min(cap, max(supported))
        archs.add(f"{cap[0]}.{cap[1]}")
    archs = sorted(archs, key=lambda a: tuple(map(int, a.split("."))))
    archs[-1] += "+PTX"
    return ";".join(archs)


def resolve_arch_list():
    """The arch list to build for, also written back to TORCH_CUDA_ARCH_LIST so that the archs compiled and
    the archs reported by build_info() are the same."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if value in ("", "native"):
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            value = visible_gpu_arch_list()
        elif value == "native":
            fail("TORCH_CUDA_ARCH_LIST=native needs a visible GPU; name the archs instead, e.g. 9.0")
        else:
            print(
                f"fastseg setup: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCH_LIST}",
                file=sys.stderr,
            )
            value = DEFAULT_ARCH_LIST
    value = ";".join(value.replace(";", " ").split())
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    return value


def c_string_define(name, value):
    # torch.utils.cpp_extension shell-quotes each flag for ninja, so the quotes reach the compiler intact.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'-D{name}="{escaped}"'


def sources(pattern):
    # Relative to the project root: setuptools wants relative source paths.
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob(pattern))


VERSION = read_version()
WITH_CUDA, CUDA_HOME = want_cuda()
CUDA_VERSION = toolkit_version(CUDA_HOME) if WITH_CUDA else ""
ARCH_LIST = resolve_arch_list() if WITH_CUDA else ""

if WITH_CUDA:
    # cpp_extension reads CUDA_HOME once, at import; set it before importing, and on the module in case an
    # earlier import in this process already happened.
    os.environ["CUDA_HOME"] = CUDA_HOME
import torch.utils.cpp_extension as cpp_extension  # noqa: E402

if WITH_CUDA:
    cpp_extension.CUDA_HOME = CUDA_HOME

# The sources are C++17. No -std flag here: cpp_extension adds the standard the installed torch's headers
# need (c++17 for older torch, c++20 for newer, e.g. 2.14), and an explicit -std=c++17 breaks newer torch.
cxx_flags = [
    "-O3",
    c_string_define("FASTSEG_VERSION", VERSION),
    c_string_define("FASTSEG_TORCH_VERSION", torch.__version__),
    c_string_define("FASTSEG_CUDA_VERSION", CUDA_VERSION),
    c_string_define("FASTSEG_ARCH_LIST", ARCH_LIST),
]
# at::parallel_for is a header template that runs in parallel only when the including file is compiled with
# OpenMP (_OPENMP); without -fopenmp every CPU kernel's parallel_for silently runs on one thread. The libgomp
# it links against is the one torch already loaded (same soname).
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
# No --use_fast_math: the kernels rely on IEEE NaN/inf semantics (NaN propagation, -inf initial max).
nvcc_flags = ["-O3", "-lineinfo"]

extension_kwargs = dict(
    name=f"{PACKAGE}._C",
    sources=sources("**/*.cpp") + (sources("**/*.cu") if WITH_CUDA else []),
    include_dirs=[str(ROOT / "csrc")],
    define_macros=[("FASTSEG_WITH_CUDA", None)] if WITH_CUDA else [],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if WITH_CUDA else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
)
if WITH_CUDA:
    extension = cpp_extension.CUDAExtension(**extension_kwargs)
    summary = f"CPU + CUDA {CUDA_VERSION} ({CUDA_HOME}) for archs {ARCH_LIST}"
else:
    extension = cpp_extension.CppExtension(**extension_kwargs)
    summary = "CPU only"
jobs = os.environ.get("MAX_JOBS")
print(
    f"fastseg setup: building {PACKAGE}._C {VERSION}: {summary}; torch {torch.__version__}"
    + (f"; MAX_JOBS={jobs}" if jobs else ""),
    file=sys.stderr,
)

# Description, requirements and the Python version live in pyproject.toml's [project] table.
setup(
    name=PACKAGE,
    version=VERSION,
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["py.typed"]},
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
