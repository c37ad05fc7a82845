"""pytest-benchmark: pydensecrf (or, without it on a GPU machine, fastseg on the CPU) against fastseg.dense_crf.

    pytest benchmarks/test_bench_crf.py                           # time them
    pytest benchmarks/test_bench_crf.py --benchmark-disable -q    # run each once, agreement checked

The README workload (21 labels, 10 iterations, Gaussian 3/3 + bilateral 80/13/10): 256x256 on the CPU,
256x256 and 512x512 on CUDA. Host-clock timings; the figures to quote come from `python -m fastseg bench`.
The other tests check the crf group's pieces on the CPU, untimed: the 3-D case at a tiny size, the GPU-target
note, the MONAI probe's skip path (through the bench's entry point) and the time plot.
"""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

import fastseg.bench as bench
from fastseg.bench import crf
from fastseg.bench.harness import Row
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (256, 512) if DEVICE.type == "cuda" else (256,)
if crf.pydensecrf_available():
    REFERENCE = crf.REFERENCE
elif DEVICE.type == "cuda":
    REFERENCE = "fastseg-cpu"
else:
    REFERENCE = None


@pytest.mark.skipif(REFERENCE is None, reason="pydensecrf is not installed (pip install pydensecrf2)")
@pytest.mark.parametrize("implementation", ["reference", "fastseg"])
@pytest.mark.parametrize("size", SIZES)
def test_dense_crf(benchmark, size, implementation):
    benchmark.group = f"dense_crf {size}x{size}, {crf.LABELS} labels, {crf.ITERATIONS} it"
    workload = crf.crf_workload(size, DEVICE, REFERENCE)
    result = run_benchmark(benchmark, workload.reference if implementation == "reference" else workload.fastseg, DEVICE)
    if implementation == "fastseg":
        workload.check(workload.reference(), result)


def test_volume_workload_runs_at_a_tiny_size():
    reference = crf.REFERENCE if crf.pydensecrf_available() else crf.CPU_REFERENCE
    workload = crf.volume_workload((4, 12, 10), torch.device("cpu"), reference)
    q = workload.fastseg()
    assert q.shape == (1, crf.VOLUME_LABELS, 4, 12, 10)
    assert workload.check(workload.reference(), q).startswith(f"vs {reference}: argmax agreement")


def test_volume_is_deterministic_and_the_unaries_noisy():
    volume, truth = crf.sample_volume((8, 16, 16))
    again, _ = crf.sample_volume((8, 16, 16))
    np.testing.assert_array_equal(volume, again)
    assert volume.dtype == np.float32 and 0 <= volume.min() and volume.max() <= 255
    assert set(np.unique(truth)) == set(range(crf.VOLUME_LABELS))
    unary = crf.segmentation_unary(truth, crf.VOLUME_LABELS)
    assert 0.5 < (unary.argmin(0) == truth.ravel()).mean() < 0.95  # noisy, not hopeless: work for the CRF


def test_gpu_volume_case_notes_the_target():
    case = crf.volume_case(crf.VOLUME_SHAPES["cuda"], torch.device("cuda"), crf.CPU_REFERENCE)  # no GPU needed
    assert case.case.startswith("256x256x128 grey volume, 4 labels")
    for fastseg_ms, verdict in ((crf.GPU_TARGET_MS / 2, "met"), (crf.GPU_TARGET_MS * 2, "MISSED")):
        row = Row.for_case(case)
        row.fastseg_ms = fastseg_ms
        case.finish_row(row)
        assert row.notes == [f"GPU target < {crf.GPU_TARGET_MS:g} ms: {verdict}"]
    cpu_case = crf.volume_case(crf.VOLUME_SHAPES["cpu"], torch.device("cpu"), crf.REFERENCE)
    row = Row.for_case(cpu_case)
    row.fastseg_ms = 1.0
    cpu_case.finish_row(row)
    assert row.notes == []


@pytest.fixture
def monai_probe():
    """The MONAI probe's cache, emptied before and after (the tests below fake what it imports)."""
    crf.monai_skip_reason.cache_clear()
    yield crf.monai_skip_reason
    crf.monai_skip_reason.cache_clear()


def fake_monai(monkeypatch, crf_class):
    blocks = types.ModuleType("monai.networks.blocks")
    blocks.CRF = crf_class
    for name, module in (("monai", types.ModuleType("monai")), ("monai.networks", types.ModuleType("monai.networks")),
                         ("monai.networks.blocks", blocks)):
        monkeypatch.setitem(sys.modules, name, module)


class CRFWithoutExtension:
    """What pip's MONAI wheels do: the CRF builds, its filter raises for want of the compiled monai._C."""

    def __init__(self, **kwargs):
        pass

    def __call__(self, logits, image):
        raise ImportError("import monai._C (No module named 'monai._C').")


def test_monai_probe_says_why_not(monkeypatch, monai_probe):
    for name in ("monai", "monai.networks", "monai.networks.blocks"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    assert monai_probe("cpu").startswith("MONAI's CRF is not importable (")
    monai_probe.cache_clear()
    fake_monai(monkeypatch, CRFWithoutExtension)
    reason = monai_probe("cpu")
    assert reason == "MONAI's CRF does not run here (ImportError: import monai._C (No module named 'monai._C'))"
    found = crf.monai_cases([(256, crf.LABELS), (128, crf.LABELS)], crf.VOLUME_SHAPES["cpu"], torch.device("cpu"))
    assert len(found) == 1  # one row for all: the reason is the same
    assert found[0].reference == crf.MONAI and found[0].skip_reason == reason
    assert found[0].case.endswith(", vs MONAI")


def test_monai_skip_reaches_progress_and_results(monkeypatch, monai_probe, tmp_path, capsys):
    fake_monai(monkeypatch, CRFWithoutExtension)
    path = tmp_path / "crf.json"
    threads = torch.get_num_threads()
    try:
        status = bench.main(["--device", "cpu", "--ops", "crf", "--quick", "--threads", "1", "--filter", "vs MONAI",
                             "--json", str(path), "--plot", str(tmp_path / "crf.png")])
    finally:
        torch.set_num_threads(threads)
    assert status == 0  # a skipped reference is not a failure
    (row,) = json.loads(path.read_text())["rows"]
    assert row["reference"] == crf.MONAI and row["fastseg_ms"] is None
    assert row["notes"] == f"skipped: {monai_probe('cpu')}"
    out = capsys.readouterr().out
    assert "[skipped: MONAI's CRF does not run here (ImportError: import monai._C" in out
    if importlib.util.find_spec("matplotlib"):  # the group's plot is written even with no row measured
        assert (tmp_path / "crf-crf.png").exists() and f"crf plot written to {tmp_path / 'crf-crf.png'}" in out
    else:
        assert "no crf plot: matplotlib is not installed" in out


def test_monai_rows_get_pydensecrf_parameters(monkeypatch, monai_probe):
    made = []

    class RecordingCRF:
        """A MONAI CRF that runs: it records how it was made and returns softmax(logits)."""

        def __init__(self, **kwargs):
            made.append(kwargs)

        def __call__(self, logits, image):
            return torch.softmax(logits, 1)

    fake_monai(monkeypatch, RecordingCRF)
    assert monai_probe("cpu") is None
    volume, photo = crf.monai_cases([(16, 3)], (4, 8, 8), torch.device("cpu"))
    assert (volume.reference, photo.reference) == (crf.MONAI, crf.MONAI)
    assert volume.skip_reason is None and photo.skip_reason is None
    for case, kernels in ((volume, crf.VOLUME_KERNELS), (photo, crf.PHOTO_KERNELS)):
        workload = case.setup()
        assert workload.check(workload.reference(), workload.fastseg()).startswith("vs monai (")
        assert made[-1] == dict(iterations=crf.ITERATIONS, bilateral_weight=kernels.bilateral_weight,
                                gaussian_weight=kernels.gaussian_weight, bilateral_spatial_sigma=kernels.bilateral_sxy,
                                bilateral_color_sigma=kernels.bilateral_srgb,
                                gaussian_spatial_sigma=kernels.gaussian_sxy, update_factor=1.0,
                                compatibility_matrix=None)


def test_monai_agreement_is_a_note_never_a_mismatch():
    expected = torch.softmax(torch.randn(1, 3, 8, 8), 1)
    note = crf.describe_monai_agreement(expected, torch.softmax(torch.randn(1, 3, 8, 8), 1))
    assert note.startswith("vs monai (") and "argmax agreement" in note


def synthetic_rows() -> list[Row]:
    """Measured-looking rows of a GPU run without pydensecrf, with MONAI rows and a skipped one."""
    def row(case, reference, reference_ms, fastseg_ms):
        return Row("dense_crf", case, "float32", "nchw", "forward", reference, reference_ms, fastseg_ms)

    kernels = crf.PHOTO_KERNELS.label
    rows = [row(f"256x256x128 grey volume, 4 labels, 10 it, {crf.VOLUME_KERNELS.label}", crf.CPU_REFERENCE, 900, 40)]
    rows += [row(f"{size}x{size} rgb, {crf.LABELS} labels, 10 it, {kernels}", crf.CPU_REFERENCE, size / 2, size / 50)
             for size in (128, 256, 512)]
    rows += [row(f"256x256 rgb, {labels} labels, 10 it, {kernels}", crf.CPU_REFERENCE, 2 * labels, labels / 10)
             for labels in (2, 8, 64)]
    rows += [row(f"256x256 rgb, {labels} labels, 10 it, {kernels}, vs MONAI", crf.MONAI, 30 * labels, 1.0)
             for labels in (2, 8)]
    rows.append(row(f"256x256 rgb, 64 labels, 10 it, {kernels}, vs MONAI", crf.MONAI, None, None))
    return rows


def test_plot_points_per_implementation():
    times = crf.implementation_times(synthetic_rows(), "fastseg GPU")
    assert set(times) == {"fastseg CPU", "fastseg GPU", "MONAI"}
    assert times["fastseg CPU"][("grey volume", 256 * 256 * 128, 4)] == 900
    assert times["fastseg GPU"][("rgb", 512 * 512, crf.LABELS)] == 512 / 50
    # the MONAI rows' fastseg times do not replace the first row's
    assert times["fastseg GPU"][("rgb", 256 * 256, 2)] == pytest.approx(0.2)
    assert times["MONAI"] == {("rgb", 256 * 256, 2): 60, ("rgb", 256 * 256, 8): 240}


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install fastseg[bench])")
    path = tmp_path / "bench-crf.png"
    assert crf.write_plot(path, synthetic_rows(), "synthetic rows", torch.device("cuda"))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not crf.write_plot(tmp_path / "bench-crf.png", synthetic_rows(), "synthetic rows", torch.device("cpu"))
    assert not (tmp_path / "bench-crf.png").exists()


def test_group_plot_goes_beside_the_speedup_plot():
    assert str(bench.group_plot_path("out/2026-11-27-h100-abc.png", "crf")) == "out/2026-11-27-h100-abc-crf.png"
