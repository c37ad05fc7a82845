"""Build-time decisions for fastseg's wheels, kept free of torch and setuptools so that they can be unit-tested
(tests/test_packaging.py) and read in one place: the local version tag (+cpu, +cu126, +cu128, +cu130), the
default CUDA architectures per toolkit, and the torch requirement a built wheel carries.

setup.py imports this file; it is shipped in the sdist (MANIFEST.in), not in the wheels.
"""

from __future__ import annotations

import re

# The CUDA architectures a wheel is built for when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible, by
# the oldest toolkit that gets the list. Each list is filtered by what the toolkit's nvcc supports
# (`nvcc --list-gpu-arch`) and the newest also gets +PTX, so that later GPUs JIT-compile it.
#   - 7.0 V100, 7.5 T4/RTX 20, 8.0 A100, 8.6 RTX 30/A10/A40, 8.9 L4/L40/RTX 40, 9.0 H100/H200,
#     10.0 B200/GB200 (its cubin also runs on 10.3, B300), 12.0 RTX 50/RTX PRO (also runs on 12.1).
#   - CUDA 12.8 is the first toolkit with Blackwell (10.0, 12.0); CUDA 13.0 dropped everything below 7.5.
DEFAULT_ARCHS: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = (
    ((13, 0), ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")),
    ((12, 8), ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")),
    ((11, 8), ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0")),
)

# The CUDA flavours wheels are published for (each one its own package index); other toolkits still build,
# with their own tag.
WHEEL_CUDA_TAGS = ("cu126", "cu128", "cu130")


class BuildConfigError(ValueError):
    """A build setting that makes no sense (the message says which and why)."""


def parse_cuda_version(text: str) -> tuple[int, int]:
    """'13.0' / '13.0.88' / 'cu130' / 'cu128' -> (major, minor)."""
    text = text.strip().lower()
    m = re.fullmatch(r"cu(\d{2,3})", text)
    if m:
        digits = m.group(1)  # cu118 -> 11.8, cu130 -> 13.0 (majors are 2 digits, minors 1 digit)
        return int(digits[:-1]), int(digits[-1])
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    raise BuildConfigError(f"not a CUDA version: {text!r} (expected e.g. 13.0 or cu130)")


def cuda_tag(version: str | tuple[int, int] | None) -> str:
    """The local version tag for a CUDA version: None -> 'cpu', '13.0' -> 'cu130', (12, 6) -> 'cu126'."""
    if version is None or version == "":
        return "cpu"
    major, minor = parse_cuda_version(version) if isinstance(version, str) else version
    return f"cu{major}{minor}"


def choose_tag(mode: str, requested: str | None) -> tuple[bool | None, str | None]:
    """Reconcile FASTSEG_CUDA (`mode`: '0', '1' or 'auto') with FASTSEG_CUDA_VERSION (`requested`).

    Returns (mode override, tag): FASTSEG_CUDA_VERSION=cpu forces a CPU build (None: leave the mode as it
    is), and a CUDA version requires CUDA. The tag is None when it is to come from the toolkit found
    (`finish_tag`).
    """
    requested = (requested or "").strip().lower()
    if not requested:
        return None, None
    if requested == "cpu":
        if mode == "1":
            raise BuildConfigError("FASTSEG_CUDA=1 contradicts FASTSEG_CUDA_VERSION=cpu")
        return False, "cpu"
    tag = cuda_tag(requested)
    if mode == "0":
        raise BuildConfigError(f"FASTSEG_CUDA=0 contradicts FASTSEG_CUDA_VERSION={requested} (a CUDA build)")
    return True, tag


def finish_tag(with_cuda: bool, toolkit_version: str | None, requested_tag: str | None) -> str:
    """The local version tag of this build, checking an explicit FASTSEG_CUDA_VERSION against the toolkit:
    the major versions must agree (the extension links the toolkit's CUDA runtime); the minor may differ
    (e.g. a 12.9 toolkit building the cu128 wheel for torch's cu128 builds)."""
    if not with_cuda:
        if requested_tag not in (None, "cpu"):
            raise BuildConfigError(f"FASTSEG_CUDA_VERSION asks for a {requested_tag} build, but CUDA is not built")
        return "cpu"
    if toolkit_version is None:
        raise BuildConfigError("a CUDA build needs the toolkit's version")
    found = cuda_tag(toolkit_version)
    if requested_tag in (None, found):
        return found
    if requested_tag == "cpu":
        raise BuildConfigError("FASTSEG_CUDA_VERSION=cpu, but this is a CUDA build")
    want_major = parse_cuda_version(requested_tag)[0]
    have_major = parse_cuda_version(toolkit_version)[0]
    if want_major != have_major:
        raise BuildConfigError(
            f"FASTSEG_CUDA_VERSION asks for {requested_tag}, but the CUDA toolkit found is {toolkit_version}: "
            f"point CUDA_HOME at a CUDA {want_major}.x toolkit"
        )
    return requested_tag


def local_version(base: str, tag: str) -> str:
    """'0.1.0', 'cu130' -> '0.1.0+cu130' (PEP 440 local version; the base must not have one already)."""
    if "+" in base:
        raise BuildConfigError(f"fastseg/_version.py's version {base!r} already has a local part")
    if not re.fullmatch(r"cpu|cu\d{3,4}", tag):
        raise BuildConfigError(f"bad local version tag {tag!r}")
    return f"{base}+{tag}"


def use_local_tag(setting: str | None, tag_requested: bool, from_sdist: bool, making_sdist: bool) -> bool:
    """Whether the version gets the local tag (FASTSEG_LOCAL_VERSION = `setting`: '1', '0' or 'auto'/unset).

    Never for the sdist itself (an index refuses local versions, and the sdist is not one flavour). 'auto':
    yes in a source checkout or when FASTSEG_CUDA_VERSION names the tag; no when building from an unpacked
    sdist, whose version must stay the sdist's (pip refuses a build whose metadata version differs from
    the sdist it installs). Wheels for an index are built with FASTSEG_LOCAL_VERSION=1.
    """
    setting = (setting or "auto").strip().lower() or "auto"
    if setting not in ("0", "1", "auto"):
        raise BuildConfigError(f"FASTSEG_LOCAL_VERSION must be 0, 1 or auto, got {setting!r}")
    if making_sdist:
        return False
    if setting != "auto":
        return setting == "1"
    return tag_requested or not from_sdist


def parse_nvcc_archs(list_gpu_arch_output: str) -> list[str]:
    """`nvcc --list-gpu-arch` output ('compute_75\\ncompute_100\\n...') -> ['7.5', '10.0', ...]."""
    archs = []
    for m in re.finditer(r"compute_(\d+)([a-z]?)\b", list_gpu_arch_output):
        digits, suffix = m.group(1), m.group(2)
        if suffix:
            continue  # compute_90a etc.: arch-specific variants are never a default
        archs.append(f"{int(digits[:-1])}.{digits[-1]}")
    return archs


def default_arch_list(toolkit_version: str, nvcc_archs: list[str] | None = None) -> str:
    """The TORCH_CUDA_ARCH_LIST for a toolkit when none is given and no GPU is visible:
    '12.6' -> '7.0;7.5;8.0;8.6;8.9;9.0+PTX'; limited to `nvcc_archs` when known; PTX for the newest."""
    version = parse_cuda_version(toolkit_version)
    for since, archs in DEFAULT_ARCHS:
        if version >= since:
            break
    else:
        raise BuildConfigError(
            f"CUDA {toolkit_version} is older than any toolkit fastseg builds wheels with (11.8+); "
            "set TORCH_CUDA_ARCH_LIST explicitly"
        )
    chosen = [a for a in archs if nvcc_archs is None or a in nvcc_archs]
    if not chosen:
        raise BuildConfigError(
            f"nvcc {toolkit_version} supports none of {', '.join(archs)}; set TORCH_CUDA_ARCH_LIST explicitly"
        )
    chosen[-1] += "+PTX"
    return ";".join(chosen)


def torch_release(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14): the part of torch's version its C++ ABI depends on."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise BuildConfigError(f"not a torch version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def torch_requirement(torch_version: str) -> str:
    """The requirement a built fastseg carries for the torch it was compiled against:
    '2.14.1+cu130' -> 'torch>=2.14,<2.15' (any patch release of the same minor release shares the ABI)."""
    major, minor = torch_release(torch_version)
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def nvcc_thread_flags(value: str | None) -> list[str]:
    """NVCC_THREADS -> nvcc's ['--threads', N] (compile the architectures of one file in parallel)."""
    if value is None or value.strip() == "":
        return []
    if not value.strip().isdigit() or int(value) < 0:
        raise BuildConfigError(f"NVCC_THREADS must be a number >= 0 (0: one per core), got {value!r}")
    return ["--threads", str(int(value))]


def build_config_source(version: str, tag: str, torch_version: str, cuda_version: str | None,
                        arch_list: str | None) -> str:
    """The text of the generated fastseg/_build_config.py."""
    return (
        '"""Written by setup.py when fastseg._C was built; not in git. What this build is."""\n\n'
        f"version = {version!r}\n"
        f"variant = {tag!r}\n"
        f"torch_version = {torch_version!r}\n"
        f"cuda_version = {cuda_version!r}\n"
        f"arch_list = {arch_list!r}\n"
    )


def needed_libraries(readelf_dynamic: str) -> list[str]:
    """The shared libraries a binary names as NEEDED, from the text of `readelf -d BINARY`."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf_dynamic)


def static_cxx_runtime_error(needed: list[str], compiler: str) -> str | None:
    """Why an extension that does not load the shared C++ runtime must not be used, or None when it does.

    An extension that carries its own copy of libstdc++ (linked with -static-libstdc++, as some compiler
    wrappers do) throws C++ exceptions that torch's copy cannot catch: the first error raised inside it kills
    the process with SIGSEGV instead of becoming a Python RuntimeError (seen on the lent GPU machines, whose
    CXX=/opt/gcc/bin/g++ wrapper links this way; /usr/bin/g++ of the same GCC release does not).
    """
    if any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed):
        return None
    return (
        f"the built extension does not load the shared C++ runtime (its NEEDED libraries: {', '.join(needed)}): "
        f"the compiler {compiler!r} links libstdc++ statically, so any error raised inside fastseg._C would "
        "crash the process instead of raising. Build with a compiler that links it dynamically, e.g. "
        "CC=/usr/bin/gcc CXX=/usr/bin/g++."
    )

