"""Build fastseg and its compiled extension fastseg._C.

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

Environment:
    FASTSEG_CUDA           1: build the CUDA kernels (fail if no toolkit), 0: CPU only,
                           auto (default): CUDA when both a CUDA toolkit and a CUDA build of torch are found.
    FASTSEG_CUDA_VERSION   the local version tag: cpu (implies FASTSEG_CUDA=0) or a CUDA version, 12.8 or
                           cu128 (implies FASTSEG_CUDA=1; its major must be the toolkit's). Unset: +cpu, or
                           +cuXY from the toolkit found (13.0 -> 0.1.0+cu130).
    FASTSEG_LOCAL_VERSION  1: always add that tag to the version, 0: never, auto (default): in a source
                           checkout or when FASTSEG_CUDA_VERSION is set, not when building from an unpacked
                           sdist (pip wants the sdist's version). The sdist itself never has it.
    CUDA_HOME / CUDA_PATH  the CUDA toolkit; otherwise the one of the `nvcc` on PATH, then /usr/local/cuda.
    TORCH_CUDA_ARCH_LIST   the GPU archs to compile for, e.g. "8.0;9.0"; unset: the visible GPUs', or when
                           there is none the toolkit's default list (fastseg_build.DEFAULT_ARCHS, e.g. 13.0:
                           7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX).
    MAX_JOBS               parallel compile jobs (read by torch.utils.cpp_extension).
    NVCC_THREADS           nvcc --threads N: the architectures of one .cu file compiled in parallel.

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
sys.path.insert(0, str(ROOT))
import fastseg_build  # noqa: E402  (tag, arch and requirement logic; tests/test_packaging.py tests it)

del sys.path[0]


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
    """(build the CUDA kernels?, toolkit root or None, requested tag or None), from FASTSEG_CUDA and
    FASTSEG_CUDA_VERSION."""
    mode = os.environ.get("FASTSEG_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        fail(f"FASTSEG_CUDA must be 0, 1 or auto, got {mode!r}")
    try:
        forced, requested_tag = fastseg_build.choose_tag(mode, os.environ.get("FASTSEG_CUDA_VERSION"))
    except fastseg_build.BuildConfigError as err:
        fail(str(err))
    if forced is not None:
        mode = "1" if forced else "0"
    with_cuda, cuda_home = _want_cuda(mode)
    return with_cuda, cuda_home, requested_tag


def _want_cuda(mode):
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
        fail(f"FASTSEG_CUDA=1 (or FASTSEG_CUDA_VERSION) asks for CUDA but {problem}; set CUDA_HOME to a CUDA "
             "toolkit, or build with FASTSEG_CUDA=0")
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


def nvcc_archs(cuda_home):
    """The architectures this toolkit's nvcc compiles for ('7.5', ..., '12.0'), or None if it cannot say."""
    try:
        out = subprocess.check_output([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], text=True,
                                      stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return None
    return fastseg_build.parse_nvcc_archs(out) or None


def resolve_arch_list(cuda_home, cuda_version):
    """The arch list to build for, also written back to TORCH_CUDA_ARCH_LIST so that the archs compiled and
    the archs reported by build_info() are the same."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if value in ("", "native"):
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            value = visible_gpu_arch_list()
        elif value == "native":
            fail("TORCH_CUDA_ARCH_LIST=native needs a visible GPU; name the archs instead, e.g. 9.0")
        else:
            try:
                value = fastseg_build.default_arch_list(cuda_version, nvcc_archs(cuda_home))
            except fastseg_build.BuildConfigError as err:
                fail(str(err))
            print(
                f"fastseg setup: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for CUDA {cuda_version}'s "
                f"default list {value}",
                file=sys.stderr,
            )
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


BASE_VERSION = read_version()
WITH_CUDA, CUDA_HOME, REQUESTED_TAG = want_cuda()
CUDA_VERSION = toolkit_version(CUDA_HOME) if WITH_CUDA else ""
ARCH_LIST = resolve_arch_list(CUDA_HOME, CUDA_VERSION) if WITH_CUDA else ""
try:
    TAG = fastseg_build.finish_tag(WITH_CUDA, CUDA_VERSION or None, REQUESTED_TAG)
    # The installed version carries the build's flavour, as torch's does (0.1.0+cu130); fastseg.__version__
    # and build_info()["version"] report this full version. Not for the sdist, nor (by default) for a build
    # from an unpacked sdist: see fastseg_build.use_local_tag.
    MAKING_SDIST = "sdist" in sys.argv
    if fastseg_build.use_local_tag(os.environ.get("FASTSEG_LOCAL_VERSION"), REQUESTED_TAG is not None,
                                   from_sdist=(ROOT / "PKG-INFO").is_file(), making_sdist=MAKING_SDIST):
        VERSION = fastseg_build.local_version(BASE_VERSION, TAG)
    else:
        VERSION = BASE_VERSION
    TORCH_REQUIREMENT = fastseg_build.torch_requirement(torch.__version__)
    NVCC_THREAD_FLAGS = fastseg_build.nvcc_thread_flags(os.environ.get("NVCC_THREADS"))
except fastseg_build.BuildConfigError as err:
    fail(str(err))

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
nvcc_flags = ["-O3", "-lineinfo"] + NVCC_THREAD_FLAGS

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
# The summary once per build: not for the metadata-only runs (egg_info, dist_info) and the sdist.
BUILDING = any(c in sys.argv for c in ("build", "build_ext", "bdist_wheel", "develop", "editable_wheel", "install"))
if BUILDING:
    print(
        f"fastseg setup: {PACKAGE} {VERSION}: _C {summary}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"requires {TORCH_REQUIREMENT}; {len(extension_kwargs['sources'])} sources"
        + (f"; MAX_JOBS={jobs}" if jobs else "")
        + (f"; nvcc {' '.join(NVCC_THREAD_FLAGS)}" if NVCC_THREAD_FLAGS else ""),
        file=sys.stderr,
    )

BUILD_CONFIG = fastseg_build.build_config_source(
    VERSION, TAG, torch.__version__, CUDA_VERSION or None, ARCH_LIST or None
)


def check_shared_cxx_runtime(library):
    """Refuse (and delete) a built extension linked against a private copy of libstdc++: see
    fastseg_build.static_cxx_runtime_error. Skipped where binutils' readelf is missing."""
    for path in (library, ROOT / PACKAGE / library.name):
        if not path.is_file():
            continue
        try:
            dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return
        error = fastseg_build.static_cxx_runtime_error(fastseg_build.needed_libraries(dynamic),
                                                       os.environ.get("CXX", "c++"))
        if error:
            path.unlink()
            fail(error)


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, also writing fastseg/_build_config.py (what this build is: version with its
    local tag, the torch it was compiled against) next to the extension: into the source tree for in-place
    and editable builds, into the build directory for wheels. fastseg checks it at import before it loads
    fastseg._C."""

    def run(self):
        super().run()
        for ext in self.extensions:
            check_shared_cxx_runtime(Path(self.get_ext_fullpath(ext.name)))
        targets = []
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(ROOT / PACKAGE)
        if self.build_lib:
            targets.append(Path(self.build_lib) / PACKAGE)
        for target in targets:
            if target.is_dir():
                (target / "_build_config.py").write_text(BUILD_CONFIG)

# Description, requirements and the Python version live in pyproject.toml's [project] table.
setup(
    name=PACKAGE,
    version=VERSION,
    # A built fastseg is ABI-bound to the torch release it was compiled against; the sdist is not.
    install_requires=["numpy", "torch>=2.6" if MAKING_SDIST else TORCH_REQUIREMENT],
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["py.typed"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
