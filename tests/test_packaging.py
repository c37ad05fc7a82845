"""The wheel build's decisions (fastseg_build.py: local version tags, default CUDA architectures, the torch
requirement) and the import-time torch check that a wheel relies on. Fast: nothing is compiled."""

import importlib
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import fastseg
from fastseg import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import fastseg_build as fb  # noqa: E402

sys.path.remove(REPO)


# --------------------------------------------------------------------------------------------------------------
# local version tags
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, tag", [
    (None, "cpu"), ("", "cpu"), ("12.6", "cu126"), ("12.8", "cu128"), ("13.0", "cu130"), ("13.0.88", "cu130"),
    ("11.8", "cu118"), ("cu128", "cu128"), ("CU130", "cu130"), ((12, 6), "cu126"),
])
def test_cuda_tag(version, tag):
    assert fb.cuda_tag(version) == tag


@pytest.mark.parametrize("bad", ["13", "thirteen", "cu1", "cuda13", "13.0.1.2"])
def test_cuda_tag_rejects(bad):
    with pytest.raises(fb.BuildConfigError):
        fb.cuda_tag(bad)


@pytest.mark.parametrize("text, expected", [("cu130", (13, 0)), ("cu126", (12, 6)), ("cu118", (11, 8)),
                                            ("12.8", (12, 8)), ("13.0.88", (13, 0))])
def test_parse_cuda_version(text, expected):
    assert fb.parse_cuda_version(text) == expected


@pytest.mark.parametrize("mode", ["0", "1", "auto"])
def test_choose_tag_unset_leaves_mode(mode):
    assert fb.choose_tag(mode, None) == (None, None)
    assert fb.choose_tag(mode, "  ") == (None, None)


def test_choose_tag_cpu_and_cuda():
    assert fb.choose_tag("auto", "cpu") == (False, "cpu")
    assert fb.choose_tag("0", "CPU") == (False, "cpu")
    assert fb.choose_tag("auto", "12.8") == (True, "cu128")
    assert fb.choose_tag("1", "cu130") == (True, "cu130")
    with pytest.raises(fb.BuildConfigError, match="contradicts"):
        fb.choose_tag("1", "cpu")
    with pytest.raises(fb.BuildConfigError, match="contradicts"):
        fb.choose_tag("0", "13.0")


def test_finish_tag():
    assert fb.finish_tag(False, None, None) == "cpu"
    assert fb.finish_tag(False, None, "cpu") == "cpu"
    assert fb.finish_tag(True, "13.0", None) == "cu130"
    assert fb.finish_tag(True, "12.6", "cu126") == "cu126"
    # the same major, another minor: a 12.9 toolkit may build the cu128 flavour
    assert fb.finish_tag(True, "12.9", "cu128") == "cu128"
    with pytest.raises(fb.BuildConfigError, match="CUDA 12.x toolkit"):
        fb.finish_tag(True, "13.0", "cu128")
    with pytest.raises(fb.BuildConfigError):
        fb.finish_tag(False, None, "cu130")
    with pytest.raises(fb.BuildConfigError):
        fb.finish_tag(True, "13.0", "cpu")


def test_local_version():
    assert fb.local_version("0.1.0", "cpu") == "0.1.0+cpu"
    assert fb.local_version("0.2.3", "cu130") == "0.2.3+cu130"
    with pytest.raises(fb.BuildConfigError):
        fb.local_version("0.1.0+cu130", "cpu")
    with pytest.raises(fb.BuildConfigError):
        fb.local_version("0.1.0", "rocm6")


def test_use_local_tag():
    # the sdist never has a local version
    for setting in (None, "auto", "1", "0"):
        assert fb.use_local_tag(setting, True, from_sdist=False, making_sdist=True) is False
    # auto: a source checkout yes, an unpacked sdist no (pip wants the sdist's version), unless a tag is asked
    assert fb.use_local_tag(None, False, from_sdist=False, making_sdist=False) is True
    assert fb.use_local_tag("auto", False, from_sdist=True, making_sdist=False) is False
    assert fb.use_local_tag("", True, from_sdist=True, making_sdist=False) is True
    assert fb.use_local_tag("1", False, from_sdist=True, making_sdist=False) is True
    assert fb.use_local_tag("0", True, from_sdist=False, making_sdist=False) is False
    with pytest.raises(fb.BuildConfigError):
        fb.use_local_tag("yes", False, from_sdist=False, making_sdist=False)


def test_wheel_tags_are_valid_pep440_local_versions():
    packaging_version = pytest.importorskip("packaging.version")
    for tag in ("cpu",) + fb.WHEEL_CUDA_TAGS:
        v = packaging_version.Version(fb.local_version("0.1.0", tag))
        assert v.local == tag and v.public == "0.1.0"


# --------------------------------------------------------------------------------------------------------------
# default architectures
# --------------------------------------------------------------------------------------------------------------
NVCC_13_0 = "\n".join(f"compute_{a}" for a in (75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121)) + "\n"


def test_parse_nvcc_archs():
    assert fb.parse_nvcc_archs(NVCC_13_0) == ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0",
                                              "10.3", "12.0", "12.1"]
    assert fb.parse_nvcc_archs("compute_90\ncompute_90a\n") == ["9.0"]
    assert fb.parse_nvcc_archs("") == []


@pytest.mark.parametrize("cuda, expected", [
    ("12.6", "7.0;7.5;8.0;8.6;8.9;9.0+PTX"),
    ("12.4", "7.0;7.5;8.0;8.6;8.9;9.0+PTX"),
    ("12.8", "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ("12.9", "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ("13.0", "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
])
def test_default_arch_list(cuda, expected):
    assert fb.default_arch_list(cuda) == expected


def test_default_arch_list_limited_by_nvcc():
    assert fb.default_arch_list("13.0", fb.parse_nvcc_archs(NVCC_13_0)) == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    # a toolkit without Blackwell: PTX moves to the newest it has
    assert fb.default_arch_list("12.8", ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]) == "7.0;7.5;8.0;8.6;8.9;9.0+PTX"
    with pytest.raises(fb.BuildConfigError, match="TORCH_CUDA_ARCH_LIST"):
        fb.default_arch_list("12.8", ["5.0"])
    with pytest.raises(fb.BuildConfigError, match="TORCH_CUDA_ARCH_LIST"):
        fb.default_arch_list("11.0")


def test_default_arch_lists_are_known_to_torch():
    """Every default arch is one torch.utils.cpp_extension accepts (it raises on unknown ones)."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "_get_cuda_arch_flags"):
        pytest.skip("this torch has no torch.utils.cpp_extension._get_cuda_arch_flags")
    for cuda in ("12.6", "12.8", "13.0"):
        for arch in fb.default_arch_list(cuda).split(";"):
            arch = arch.removesuffix("+PTX")
            old = os.environ.get("TORCH_CUDA_ARCH_LIST")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            try:
                flags = cpp_extension._get_cuda_arch_flags()
            finally:
                if old is None:
                    del os.environ["TORCH_CUDA_ARCH_LIST"]
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = old
            assert any(arch.replace(".", "") in f for f in flags), (arch, flags)


@pytest.mark.skipif(not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="no CUDA toolkit in /usr/local/cuda")
def test_default_arch_list_for_the_local_toolkit():
    import subprocess

    out = subprocess.check_output(["/usr/local/cuda/bin/nvcc", "--list-gpu-arch"], text=True)
    version = subprocess.check_output(["/usr/local/cuda/bin/nvcc", "--version"], text=True)
    release = version.split("release ")[1].split(",")[0]
    archs = fb.default_arch_list(release, fb.parse_nvcc_archs(out))
    assert archs.endswith("+PTX") and archs.count("+PTX") == 1


# --------------------------------------------------------------------------------------------------------------
# torch requirement, NVCC_THREADS, the generated _build_config.py
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, req", [("2.14.1+cu130", "torch>=2.14,<2.15"), ("2.9.0", "torch>=2.9,<2.10"),
                                          ("2.10.0a0+git1234", "torch>=2.10,<2.11")])
def test_torch_requirement(version, req):
    assert fb.torch_requirement(version) == req


def test_torch_requirement_admits_the_torch_it_was_built_with():
    requirements = pytest.importorskip("packaging.requirements")
    req = requirements.Requirement(fb.torch_requirement(torch.__version__))
    assert req.specifier.contains(torch.__version__.split("+")[0])


def test_nvcc_thread_flags():
    assert fb.nvcc_thread_flags(None) == []
    assert fb.nvcc_thread_flags("") == []
    assert fb.nvcc_thread_flags("4") == ["--threads", "4"]
    assert fb.nvcc_thread_flags("0") == ["--threads", "0"]
    with pytest.raises(fb.BuildConfigError):
        fb.nvcc_thread_flags("four")


def test_build_config_source_round_trips():
    ns = {}
    exec(fb.build_config_source("0.1.0+cu130", "cu130", "2.14.1+cu130", "13.0", "9.0"), ns)
    assert (ns["version"], ns["variant"], ns["torch_version"], ns["cuda_version"], ns["arch_list"]) == (
        "0.1.0+cu130", "cu130", "2.14.1+cu130", "13.0", "9.0")
    ns = {}
    exec(fb.build_config_source("0.1.0+cpu", "cpu", "2.14.1", None, None), ns)
    assert ns["cuda_version"] is None and ns["variant"] == "cpu"


# --------------------------------------------------------------------------------------------------------------
# the installed build: version, and the torch check at import
# --------------------------------------------------------------------------------------------------------------
READELF_DYNAMIC = """
Dynamic section at offset 0x1d2a0 contains 32 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libc10.so]
 0x0000000000000001 (NEEDED)             Shared library: [libstdc++.so.6]
 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]
 0x000000000000000e (SONAME)             Library soname: [ignored.so]
"""


def test_needed_libraries_and_the_static_runtime_check():
    needed = fb.needed_libraries(READELF_DYNAMIC)
    assert needed == ["libc10.so", "libstdc++.so.6", "libgcc_s.so.1"]
    assert fb.static_cxx_runtime_error(needed, "g++") is None
    error = fb.static_cxx_runtime_error(["libc10.so", "libgcc_s.so.1"], "/opt/gcc/bin/g++")
    assert "/opt/gcc/bin/g++" in error and "statically" in error and "CXX=/usr/bin/g++" in error


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils' readelf is not installed")
def test_built_extension_loads_the_shared_cxx_runtime():
    """An extension with its own libstdc++ turns every TORCH_CHECK failure into a SIGSEGV (the lent GPU
    machines' compiler wrapper built one); setup.py refuses such a build, and this checks the one in use."""
    ext = _backend.extension()
    if ext is None:
        pytest.skip("fastseg._C is not built")
    dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert fb.static_cxx_runtime_error(fb.needed_libraries(dynamic), "c++") is None


def test_extension_error_raises_instead_of_crashing():
    """A failing check inside the extension's op is a RuntimeError in a child process, not a crash."""
    if _backend.extension() is None:
        pytest.skip("fastseg._C is not built")
    code = (
        "import torch, fastseg\n"
        "try:\n"
        "    torch.ops.fastseg.ext_max_pool2d_out(torch.randn(1, 1, 4, 4), torch.empty(1, 1, 3, 3),\n"
        "        torch.empty(1, 1, 3, 3, dtype=torch.int8), [2, 2], [2, 2], [0, 0], [1, 1])\n"
        "except RuntimeError as error:\n"
        "    print('raised:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(fastseg.__file__)))
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "raised:" in done.stdout and "pools to 2" in done.stdout


def test_version_carries_the_build_tag():
    """A built fastseg reports its full version (with +cpu / +cuXY) everywhere; an unbuilt tree the bare one."""
    config = _backend._build_config()
    info = fastseg.build_info()
    assert info["version"] == fastseg.__version__
    if config is None:
        assert "+" not in fastseg.__version__
        return
    assert fastseg.__version__ == config.version
    assert config.version.endswith("+" + config.variant) or "+" not in config.version  # tagged, or bare
    if info["extension_loaded"]:
        assert config.torch_version == info["torch_version"]
        assert (config.variant == "cpu") == (not info["cuda_kernels"])
        if info["cuda_kernels"]:
            assert config.variant == fb.cuda_tag(info["cuda_version"]) or \
                fb.parse_cuda_version(config.variant)[0] == fb.parse_cuda_version(info["cuda_version"])[0]


def test_wheel_built_for_other_torch_refuses_before_loading(monkeypatch):
    """A wheel for another torch release: ImportError naming both torch versions and what to install, raised
    before fastseg._C is imported (importing it could fail with an undefined symbol, or crash)."""
    fake_config = types.SimpleNamespace(version="0.1.0+cu128", variant="cu128", torch_version="2.9.1+cu128",
                                        cuda_version="12.8", arch_list="9.0")
    imported = []
    real_import = _backend.importlib.import_module

    def fake_import(name, *args, **kwargs):
        imported.append(name)
        if name == "fastseg._build_config":
            return fake_config
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_backend.importlib, "import_module", fake_import)
    with pytest.raises(ImportError) as err:
        _backend._load_extension()
    message = str(err.value)
    assert "2.9.1+cu128" in message and torch.__version__ in message
    assert "torch 2.9.x" in message and "cu128" in message
    assert "fastseg._C" not in imported


def test_build_config_for_this_torch_passes(monkeypatch):
    if _backend.extension() is None:
        pytest.skip("fastseg._C is not built")
    fake_config = types.SimpleNamespace(version="0.1.0+cpu", variant="cpu", torch_version=torch.__version__,
                                        cuda_version=None, arch_list=None)
    real_import = _backend.importlib.import_module
    monkeypatch.setattr(_backend.importlib, "import_module",
                        lambda name, *a, **k: fake_config if name == "fastseg._build_config"
                        else real_import(name, *a, **k))
    assert _backend._load_extension() is not None


def test_version_module_without_build_config(monkeypatch):
    """A source tree never built: fastseg._version reports the bare version (no local tag)."""
    import fastseg._version as version_module

    monkeypatch.setitem(sys.modules, "fastseg._build_config", None)  # makes the import fail
    try:
        reloaded = importlib.reload(version_module)
        assert "+" not in reloaded.__version__
    finally:
        monkeypatch.delitem(sys.modules, "fastseg._build_config")
        importlib.reload(version_module)


# --------------------------------------------------------------------------------------------------------------
# the CI matrix (scripts/wheel_matrix.py), on a saved-style index page
# --------------------------------------------------------------------------------------------------------------
def _wheel_matrix():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        return importlib.import_module("wheel_matrix")
    finally:
        sys.path.pop(0)


INDEX_PAGE = "\n".join(
    f'<a href="/whl/cu128/torch-{v}%2Bcu128-cp{py}-cp{py}-manylinux_2_28_x86_64.whl#sha256=00">x</a><br/>'
    for v, py in [("2.5.1", "311"), ("2.7.0", "310"), ("2.7.1", "310"), ("2.7.1", "311"), ("2.8.0", "313"),
                  ("2.8.0", "313t"), ("2.9.0", "312")]
) + '\n<a href="/whl/cu128/torch-2.7.1%2Bcu128-cp311-cp311-win_amd64.whl">w</a>' \
    '\n<a href="/whl/cu128/torch-2.9.0%2Bcu128-cp312-cp312-manylinux_2_28_aarch64.whl">a</a>'


def test_wheel_matrix_parses_index():
    wm = _wheel_matrix()
    found = wm.torch_wheels(INDEX_PAGE, "cu128")
    assert found[(2, 7)] == {"3.10": (2, 7, 1), "3.11": (2, 7, 1)}
    assert found[(2, 8)] == {"3.13": (2, 8, 0)}  # cp313t (free-threaded) skipped
    assert found[(2, 9)] == {"3.12": (2, 9, 0)}  # the aarch64 wheel is not x86_64
    rows = wm.matrix({"cu128": INDEX_PAGE}, (2, 6), ["3.10", "3.11", "3.12", "3.13"])
    assert {"flavour": "cu128", "cuda": "12.8", "torch": "2.7.1", "python": "3.10"} in rows
    assert all(r["torch"] != "2.5.1" for r in rows)  # below the minimum
    assert len(rows) == 4
    assert wm.cuda_of("cu130") == "13.0" and wm.cuda_of("cpu") == ""


def test_sdist_manifest_carries_every_source():
    """MANIFEST.in puts every csrc source and header in the sdist (setup.py globs csrc/**/*.cpp and *.cu)."""
    manifest = open(os.path.join(REPO, "MANIFEST.in")).read()
    line = next(ln for ln in manifest.splitlines() if ln.startswith("recursive-include csrc "))
    patterns = line.split()[2:]
    import fnmatch

    for dirpath, _, files in os.walk(os.path.join(REPO, "csrc")):
        for name in files:
            assert any(fnmatch.fnmatch(name, p) for p in patterns), f"csrc file {name} would not be in the sdist"
    assert "fastseg_build.py" in manifest and "exclude fastseg/_build_config.py" in manifest
