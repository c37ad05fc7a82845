"""The models group of `python -m fastseg bench` (whole networks against their fastseg.optimize twins), on the CPU.

    pytest benchmarks/test_bench_models.py -q

Runs the quick CPU cases through the benchmark's own entry point with a tiny timing budget, and checks that the
rows are well formed: numbers where they belong, the agreement, images/s and converter notes present, no
failure. The figures to quote come from `python -m fastseg bench --ops models` on a GPU.
"""

import json

import pytest
import torch
from torch import nn

import fastseg.bench as bench
from fastseg.bench import harness, models


@pytest.fixture
def tiny_budget(monkeypatch):
    # Three timed repeats per side: enough to exercise the timing path, small enough for two cores.
    monkeypatch.setattr(harness, "CPU_TIME_BUDGET_S", 0.0)
    monkeypatch.setattr(harness, "CPU_MIN_REPEATS", 3)
    # The runs below pass --threads 1 (two threads on a shared, busy 2-core machine run 10-100x slower): the
    # setting is the process's, so it is put back afterwards.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cases_are_lazy_and_labelled():
    cpu = torch.device("cpu")
    for quick in (True, False):
        found = models.cases(cpu, [torch.float32], quick)
        labels = [case.label for case in found]
        assert len(labels) == len(set(labels))
        assert {case.op for case in found} == {"model"}
        assert {case.pass_ for case in found} == {"forward", "train_step"}
        assert all(case.images >= 1 for case in found)
        assert any("dense CRF" in case.case for case in found)
        # Building the list builds no network: the case objects hold no module.
        assert not any(isinstance(v, nn.Module) for case in found for v in vars(case).values())
    quick_names = {case.case.split()[0] for case in models.cases(cpu, [torch.float32], True)}
    assert {"deeplabv3_resnet50", "unet"} <= quick_names
    assert models.cases(cpu, [torch.bfloat16], True)[0].layout == "channels_last"


def test_gpu_case_list_has_the_networks_and_compile_rows():
    found = models.cases(torch.device("cuda"), [torch.bfloat16, torch.float32], False)  # listing needs no GPU
    names = {case.case.split()[0] for case in found}
    assert {"unet", "deeplabv3_resnet50", "fcn8s", "segnet", "deeplab_v1_largefov"} <= names
    assert any(case.reference == models.COMPILED and case.pass_ == "train_step" for case in found)
    assert all(case.layout == "channels_last" for case in found if case.dtype == torch.bfloat16)


def test_gpu_target_rows_run_first():
    """A GPU run cut by its --budget-s keeps the rows the issues' targets are judged on: the CRF's volume and
    512x512 rows, U-Net float16 inference against eager, the DeepLab + CRF pipeline, DeepLab-v3 float16 inference,
    then five bfloat16 channels_last convolutions against eager and a training step with the Triton backward
    kernels (the case list is built without a GPU: the cases are lazy)."""
    found = bench.collect_cases(["crf", "models", "max_pool", "conv"], torch.device("cuda"),  # gpu_check's order
                                [torch.bfloat16, torch.float16, torch.float32], False, "")
    targets = [case for case in found if case.target]
    assert found[:len(targets)] == targets
    labels = [case.label for case in targets]
    assert len(labels) == 11 and labels[0].startswith("dense_crf | 256x256x128")
    assert "512x512 rgb, 21 labels" in labels[1]
    assert [label.split(" ")[2] for label in labels[2:5]] == ["unet", "deeplab_v1_largefov", "deeplabv3_resnet50"]
    assert all("| float16 | channels_last | forward" in labels[i] for i in (2, 4))
    assert "+ dense CRF" in labels[3]
    convolutions = [label.split(" | ")[1] for label in labels[5:10]]
    assert [name.split(" ")[0] for name in convolutions] == ["aspp", "aspp", "deeplab-v1", "resnet", "unet"]
    assert "8x2048x65x65" in convolutions[0] and "8x2048x33x33" in convolutions[1]
    assert all(label.startswith("fused_conv2d") and "| bfloat16 | channels_last | forward" in label
               and "torch.compile" not in label for label in labels[5:10])
    assert labels[10].startswith("fused_conv2d | aspp d12 8x2048x65x65") and ", Triton backward |" in labels[10]
    assert labels[10].endswith("| bfloat16 | channels_last | train_step")
    assert not any(case.target for case in bench.collect_cases(list(bench.OP_GROUPS), torch.device("cpu"),
                                                               [torch.float32], False, ""))


def test_quick_cpu_rows_are_well_formed(tmp_path, tiny_budget):
    path = tmp_path / "models.json"
    status = bench.main(["--device", "cpu", "--ops", "models", "--quick", "--threads", "1",
                         "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert status == 0, [row["notes"] for row in rows]
    assert len(rows) == len(models.cases(torch.device("cpu"), [torch.float32], True))
    for row in rows:
        assert row["op"] == "model" and row["dtype"] == "float32" and row["pass"] in ("forward", "train_step")
        if row["notes"].startswith("skipped"):  # the CRF pipeline without pydensecrf
            assert "pydensecrf" in row["notes"] and row["fastseg_ms"] is None
            continue
        assert row["reference_ms"] > 0 and row["fastseg_ms"] > 0
        assert row["speedup"] == pytest.approx(row["reference_ms"] / row["fastseg_ms"], rel=1e-2)
        assert "images/s: fastseg" in row["notes"]
        assert "optimize: " in row["notes"]
        assert not any(word in row["notes"] for word in ("MISMATCH", "failed"))
        if "dense CRF" in row["case"]:
            assert "vs pydensecrf: argmax agreement" in row["notes"]
        elif row["pass"] == "train_step":
            assert "gradients: max abs diff" in row["notes"]
        else:
            assert "max abs diff" in row["notes"] and "argmax agreement" in row["notes"]


def test_crf_pipeline_without_pydensecrf_is_a_skipped_row(monkeypatch, capsys, tiny_budget):
    monkeypatch.setattr(models, "pydensecrf_available", lambda: False)
    status = bench.main(["--device", "cpu", "--ops", "models", "--quick", "--threads", "1",
                         "--filter", "dense CRF"])
    out = capsys.readouterr().out
    assert status == 0
    assert "skipped: pydensecrf is not installed" in out


def test_conversion_summary_counts_chains_and_reasons():
    from fastseg.convert import optimize

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2),
                          nn.Conv2d(4, 2, 1)).eval()
    twin, report = optimize(model, report=True)
    summary = models.conversion_summary(twin, report)
    assert summary.startswith("optimize: ")
    assert "1 conv-bn-relu" in summary and "1 conv-relu" in summary
    assert "1 pool" in summary and "1 conv replaced" in summary
    assert "left 1 ConvTranspose2d (" in summary


def test_checks_flag_a_wrong_result():
    expected = torch.randn(2, 5, 8, 8)
    assert "max abs diff 0.00e+00" in models.check_outputs(expected, expected.clone(), torch.float32)
    with pytest.raises(AssertionError, match="rel RMS"):
        models.check_outputs(expected, expected + 0.1 * torch.randn_like(expected), torch.float32)
    with pytest.raises(AssertionError, match="non-finite"):
        models.check_outputs(expected, expected * float("nan"), torch.float32)
    grads = (torch.randn(3, 3), torch.randn(4))
    loss = torch.tensor(2.0)
    assert "rel RMS diff 0.0e+00" in models.check_training_step((loss, grads), (loss, grads), torch.float32)
    with pytest.raises(AssertionError, match="tolerance"):
        models.check_training_step((loss, grads), (loss, tuple(2 * g for g in grads)), torch.float32)


def test_randomized_batchnorm_is_well_conditioned():
    network = models.CPU_NETWORKS[0]  # DeepLab v3, the deepest
    assert network.name == "deeplabv3_resnet50"
    workload = models.model_workload(network, torch.bfloat16, "channels_last", "forward", models.EAGER,
                                     torch.device("cpu"))
    note = workload.check(workload.reference(), workload.fastseg())
    assert "argmax agreement" in note
