"""fastseg.backend / current_backend, which implementation actually runs, build_info, `python -m fastseg info`,
and fastseg without its compiled extension."""

import os
import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import (
    DispatchedOps,
    assert_same,
    extension_available,
    make_input,
    skip_unless_backend,
    triton_runs_on_cpu,
)
from fastseg import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("auto", "triton", "extension", "reference")


# --------------------------------------------------------------------------------------------------------------
# the context manager
# --------------------------------------------------------------------------------------------------------------
def test_default_is_auto():
    assert fastseg.current_backend() == "auto"


@pytest.mark.parametrize("name", NAMES)
def test_backend_sets_and_restores(name):
    with fastseg.backend(name):
        assert fastseg.current_backend() == name
    assert fastseg.current_backend() == "auto"


def test_backend_nests_and_restores_on_error():
    with fastseg.backend("reference"):
        with fastseg.backend("triton"):
            assert fastseg.current_backend() == "triton"
            with pytest.raises(KeyError):
                with fastseg.backend("extension"):
                    assert fastseg.current_backend() == "extension"
                    raise KeyError("boom")
            assert fastseg.current_backend() == "triton"
        assert fastseg.current_backend() == "reference"
    assert fastseg.current_backend() == "auto"


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", "ref", None, 3])
def test_invalid_backend_name(bad):
    with pytest.raises(ValueError, match="(?i)backend"):
        with fastseg.backend(bad):
            pass
    assert fastseg.current_backend() == "auto"


def test_backend_is_per_thread():
    seen = []
    with fastseg.backend("reference"):
        t = threading.Thread(target=lambda: seen.append(fastseg.current_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


# --------------------------------------------------------------------------------------------------------------
# which implementation runs
# --------------------------------------------------------------------------------------------------------------
class _Spy:
    """Wraps a callable and counts calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    """Counts calls into the reference and (when it can run) Triton implementations of each kernel."""
    from fastseg.ops import max_pool as M

    s = types.SimpleNamespace()
    for name in ("forward", "backward", "unpool", "unpool_backward"):
        ref = {"forward": "_reference_forward_into", "backward": "_reference_backward_into",
               "unpool": "_reference_unpool_into", "unpool_backward": "_reference_unpool_backward_into"}[name]
        spy = _Spy(getattr(M, ref))
        monkeypatch.setattr(M, ref, spy)
        setattr(s, "reference_" + name, spy)
    if triton_runs_on_cpu():
        from fastseg.ops import max_pool_kernels as K

        for name in ("forward", "backward", "unpool", "unpool_backward"):
            spy = _Spy(getattr(K, name))
            monkeypatch.setattr(K, name, spy)
            setattr(s, "triton_" + name, spy)
    return s


def _run_all_ops():
    x = make_input((1, 2, 6, 7), torch.float32, "randn").requires_grad_()
    out, idx = fastseg.max_pool2d_with_indices(x, 2)
    y = fastseg.max_unpool2d(out, idx, 2, output_size=x.shape[-2:])
    y.sum().backward()
    z = fastseg.max_pool2d(x, 3, 1, 1)
    z.sum().backward()
    return x, out, idx


def test_reference_backend_runs_reference(spies):
    with fastseg.backend("reference"):
        _run_all_ops()
    assert spies.reference_forward.calls == 2 and spies.reference_backward.calls == 2
    assert spies.reference_unpool.calls == 1 and spies.reference_unpool_backward.calls == 1
    for name in ("forward", "backward", "unpool", "unpool_backward"):
        assert getattr(spies, "triton_" + name, _Spy(None)).calls == 0


def test_triton_backend_runs_triton_on_cpu(spies):
    skip_unless_backend("triton")
    with fastseg.backend("triton"):
        x, out, idx = _run_all_ops()
    assert spies.triton_forward.calls == 2 and spies.triton_backward.calls == 2
    assert spies.triton_unpool.calls == 1 and spies.triton_unpool_backward.calls == 1
    assert spies.reference_forward.calls == spies.reference_backward.calls == 0
    assert spies.reference_unpool.calls == spies.reference_unpool_backward.calls == 0
    exp_out, exp_idx = F.max_pool2d(x.detach(), 2, return_indices=True)
    assert_same(out.detach(), exp_out)
    assert_same(idx, exp_idx)


def test_extension_backend_runs_extension(spies):
    skip_unless_backend("extension")
    x = make_input((1, 2, 6, 7), torch.float32, "randn").requires_grad_()
    with fastseg.backend("extension"):
        out, idx = fastseg.max_pool2d_with_indices(x, 2)
        out.sum().backward()
    assert spies.reference_forward.calls == spies.reference_backward.calls == 0
    assert getattr(spies, "triton_forward", _Spy(None)).calls == 0
    assert_same(idx, F.max_pool2d(x.detach(), 2, return_indices=True)[1])


def test_auto_on_cpu_prefers_extension(spies):
    """"auto" on CPU: the C++ extension when built, else the reference; never the Triton interpreter."""
    _run_all_ops()
    if extension_available():
        assert spies.reference_forward.calls == 0 and spies.reference_backward.calls == 0
    else:
        assert spies.reference_forward.calls == 2
    assert getattr(spies, "triton_forward", _Spy(None)).calls == 0


def test_backend_without_implementation_raises():
    """Forcing a backend an op does not have is an error naming the op and what it has, not a silent
    fallback."""
    have = _backend.registered_ops()["max_unpool2d"]
    missing = [n for n in ("triton", "extension", "aten", "reference") if n not in have]
    if not missing:
        pytest.skip("max_unpool2d has every backend")
    x = torch.randn(1, 1, 2, 2)
    idx = torch.tensor([[[[0, 3], [8, 15]]]])
    with fastseg.backend(missing[0]):
        with pytest.raises(RuntimeError, match="max_unpool2d"):
            fastseg.max_unpool2d(x, idx, 2)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastseg.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fastseg.max_pool2d(torch.randn(1, 1, 4, 4), 2)


# --------------------------------------------------------------------------------------------------------------
# build info and the CLI
# --------------------------------------------------------------------------------------------------------------
def test_build_info():
    info = fastseg.build_info()
    assert isinstance(info, dict)
    for key in ("version", "torch_version", "cuda_version", "arch_list", "cuda_kernels"):
        assert key in info, key
    assert info["version"] == fastseg.__version__
    assert isinstance(info["cuda_kernels"], bool)
    if extension_available():
        assert info["torch_version"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
        if info["cuda_kernels"]:
            assert info["cuda_version"] and info["arch_list"]
            assert all(isinstance(a, str) for a in info["arch_list"])
        else:
            assert info["cuda_version"] is None
    else:
        assert info["cuda_kernels"] is False


def _run(code_or_args, env_extra=None, timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    args = code_or_args if isinstance(code_or_args, list) else ["-c", textwrap.dedent(code_or_args)]
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_info():
    r = _run(["-m", "fastseg", "info"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"fastseg {fastseg.__version__}" in out
    assert torch.__version__ in out
    for word in ("cuda_kernels", "torch_version", "devices", "cpu", "max_pool2d", "max_unpool2d"):
        assert word in out, f"{word!r} missing from `python -m fastseg info`:\n{out}"
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in out


def test_cli_rejects_unknown_command():
    r = _run(["-m", "fastseg", "frobnicate"])
    assert r.returncode != 0


# --------------------------------------------------------------------------------------------------------------
# without fastseg._C
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_extension(monkeypatch):
    """fastseg as it is when fastseg._C is missing: the loader state re-initialised with the import failing."""
    real_import = _backend.importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "fastseg._C":
            raise ModuleNotFoundError("No module named 'fastseg._C'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_backend, "_extension", None)  # as at first import (restored afterwards)
    monkeypatch.setattr(_backend, "_extension_error", None)
    monkeypatch.setattr(_backend.importlib, "import_module", failing_import)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a built _C file next to the sources makes it warn
        _backend._init_extension()
    monkeypatch.setattr(_backend.importlib, "import_module", real_import)
    assert _backend.extension() is None


BUILD_HINT = r"build_ext --inplace|pip install"


def test_missing_extension_forced_raises_with_build_hint(no_extension):
    x = torch.randn(1, 2, 5, 5)
    with fastseg.backend("extension"):
        with pytest.raises(RuntimeError, match=BUILD_HINT):
            fastseg.max_pool2d(x, 2)
        with pytest.raises(RuntimeError, match=BUILD_HINT):
            fastseg.max_pool2d_with_indices(x, 2)


def test_missing_extension_auto_and_reference_work(no_extension):
    x = make_input((2, 3, 7, 9), torch.float32, "mixed")
    exp = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    for name in ("auto", "reference"):
        with fastseg.backend(name):
            out, idx = fastseg.max_pool2d_with_indices(x, 3, 2, 1)
        assert_same(out, exp[0])
        assert_same(idx, exp[1])
    info = fastseg.build_info()
    assert info["cuda_kernels"] is False
    for key in ("version", "torch_version", "cuda_version", "arch_list"):
        assert key in info


def test_missing_extension_triton_works(no_extension):
    skip_unless_backend("triton")
    x = make_input((1, 2, 7, 9), torch.float32, "ties").requires_grad_()
    with fastseg.backend("triton"):
        out, idx = fastseg.max_pool2d_with_indices(x, 3, 1, 1)
        (g,) = torch.autograd.grad(out.sum(), x)
    xt = x.detach().requires_grad_()
    eo, ei = F.max_pool2d(xt, 3, 1, 1, return_indices=True)
    assert_same(out.detach(), eo.detach())
    assert_same(idx, ei)
    torch.testing.assert_close(g, torch.autograd.grad(eo.sum(), xt)[0])


def test_import_without_extension_subprocess():
    """A fresh interpreter where importing fastseg._C fails: fastseg imports, auto works, extension explains
    how to build."""
    code = r'''
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fastseg._C":
                    raise ModuleNotFoundError("No module named 'fastseg._C'")
                return None

        sys.meta_path.insert(0, Block())
        import warnings
        warnings.simplefilter("ignore")
        import torch, torch.nn.functional as F
        import fastseg
        x = torch.randn(1, 2, 6, 6)
        assert torch.equal(fastseg.max_pool2d(x, 2), F.max_pool2d(x, 2))
        assert fastseg.build_info()["cuda_kernels"] is False
        try:
            with fastseg.backend("extension"):
                fastseg.max_pool2d(x, 2)
        except RuntimeError as e:
            print("ERROR:", e)
        else:
            print("NO ERROR")
        if __import__("os").environ.get("TRITON_INTERPRET") == "1":
            with fastseg.backend("triton"):
                assert torch.equal(fastseg.max_pool2d(x, 2), F.max_pool2d(x, 2))
        print("OK")
    '''
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert "ERROR:" in r.stdout, r.stdout
    err = r.stdout.split("ERROR:", 1)[1]
    assert "build_ext --inplace" in err or "pip install" in err, err


def test_extension_built_for_other_torch_refuses(monkeypatch):
    """An extension built against another torch release is not loaded (it would crash): ImportError saying
    to rebuild."""
    fake = types.SimpleNamespace(build_info=lambda: {
        "version": fastseg.__version__, "torch_version": "1.0.0", "cuda_version": None, "arch_list": None,
        "cuda_kernels": False})
    real_import = _backend.importlib.import_module
    monkeypatch.setattr(_backend.importlib, "import_module",
                        lambda name, *a, **k: fake if name == "fastseg._C" else real_import(name, *a, **k))
    with pytest.raises(ImportError, match="(?i)rebuild"):
        _backend._load_extension()


@pytest.mark.parametrize("built_cuda, runtime_cuda, message", [
    ("12.8", "13.0", "built with CUDA 12.8, but torch uses CUDA 13.0"),
    ("13.0", None, "CPU-only build"),
])
def test_extension_built_for_other_cuda_refuses(monkeypatch, built_cuda, runtime_cuda, message):
    """An extension built with another CUDA major version, or with CUDA for a CPU-only torch, is not loaded:
    ImportError saying what to rebuild with (a minor-version difference is fine)."""
    fake = types.SimpleNamespace(build_info=lambda: {
        "version": fastseg.__version__, "torch_version": torch.__version__, "cuda_version": built_cuda,
        "arch_list": ["9.0"], "cuda_kernels": True})
    real_import = _backend.importlib.import_module
    monkeypatch.setattr(_backend.importlib, "import_module",
                        lambda name, *a, **k: fake if name == "fastseg._C" else real_import(name, *a, **k))
    monkeypatch.setattr(_backend.torch.version, "cuda", runtime_cuda)
    with pytest.raises(ImportError, match=message) as error:
        _backend._load_extension()
    assert "build_ext --inplace" in str(error.value)
    info = fake.build_info()
    monkeypatch.setattr(_backend.torch.version, "cuda", "13.2")
    monkeypatch.setattr(fake, "build_info", lambda: {**info, "cuda_version": "13.0"})
    assert _backend._load_extension() is fake


def test_a_broken_extension_fails_its_tests_instead_of_skipping(monkeypatch):
    """conftest's extension_available(): a compiled fastseg._C that does not load is an error (its tests must not
    quietly skip), and so is a missing one when CI requires it; a never-built source checkout skips."""
    import conftest

    monkeypatch.setattr(_backend, "_extension", None)
    monkeypatch.setattr(_backend, "_extension_error", ImportError("undefined symbol: _ZN3c10 (a broken build)"))
    listing = ["__init__.py", "_C.cpython-311-x86_64-linux-gnu.so"]
    monkeypatch.setattr(conftest.os, "listdir", lambda path: listing)
    with pytest.raises(RuntimeError, match="does not load.*a broken build"):
        conftest.extension_available()
    listing.pop()
    monkeypatch.setattr(conftest, "REQUIRE_TEST_DEPS", False)
    assert conftest.extension_available() is False
    monkeypatch.setattr(conftest, "REQUIRE_TEST_DEPS", True)
    with pytest.raises(RuntimeError, match="not built"):
        conftest.extension_available()


# --------------------------------------------------------------------------------------------------------------
# eager calls skip the registered ops' dispatch (ops/_eager.py), everything else goes through the ops
# --------------------------------------------------------------------------------------------------------------
def test_eager_calls_skip_the_op_dispatch_where_it_is_safe():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastseg.ops._eager import needs_grad, skips_dispatch

    x = torch.randn(1, 2, 4, 4)
    assert skips_dispatch(x) and skips_dispatch(x.requires_grad_())
    assert not skips_dispatch(torch.empty(1, 2, 4, 4, device="meta"))
    with FakeTensorMode() as mode:
        assert not skips_dispatch(mode.from_tensor(x))
    assert not skips_dispatch(torch.nn.Parameter(torch.randn(2)).data.as_subclass(torch.nn.Parameter))
    assert torch.compile(lambda t: t + skips_dispatch(t), fullgraph=True, backend="eager")(torch.zeros(1)) == 0
    traced = torch.jit.trace(lambda t: fastseg.max_pool2d(t, 2), x.detach())
    assert "fastseg::max_pool2d" in str(traced.graph)  # the op recorded, not the kernels it launches
    assert_same(traced(x.detach() + 1), fastseg.max_pool2d(x.detach() + 1, 2), "traced")
    w = torch.randn(2, requires_grad=True)
    assert needs_grad(None, x) and needs_grad(torch.randn(2), None, w) and not needs_grad(torch.randn(2), None)
    with torch.no_grad():
        assert not needs_grad(x, w)


@pytest.mark.parametrize("op", ["max_pool2d", "max_unpool2d", "fused_conv2d"])
def test_op_dispatch_and_eager_paths_agree(op):
    """The public functions give the same results and gradients whether they run the registered op (under a
    dispatch mode, as fake tensors and torch.compile see it) or its implementation directly."""
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    _, indices = F.max_pool2d(x.detach(), 2, return_indices=True)

    def run():
        if op == "max_pool2d":
            out = fastseg.max_pool2d(x, 2, 1)
        elif op == "max_unpool2d":
            out = fastseg.max_unpool2d(x[:, :, :3, :2], indices, 2, output_size=(6, 5))
        else:
            out = fastseg.fused_conv2d(x, weight, None, 1, 1, activation="relu")
        grads = torch.autograd.grad(out, (x, weight) if op == "fused_conv2d" else (x,), torch.ones_like(out))
        return out, grads

    eager = run()
    with DispatchedOps() as mode:
        dispatched = run()
    assert any(f"fastseg.{op}" in name for name in mode.names), mode.names
    for a, b in zip((eager[0], *eager[1]), (dispatched[0], *dispatched[1])):
        assert_same(a, b, op)
