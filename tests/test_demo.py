"""`python -m fastseg demo`: a coarse segmentation of a real image refined by fastseg's dense CRF, written as a PNG."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the demo's image comes from scikit-image")
pytest.importorskip("scipy")

from fastseg import demo  # noqa: E402
from fastseg.__main__ import main as cli_main  # noqa: E402

SIZE = 64  # the demo's smallest sensible size: a fraction of a second on two cores


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_the_figure_and_reports_both_ious(tmp_path, capsys):
    out = tmp_path / "figure" / "demo.png"
    assert cli_main(["demo", "--size", str(SIZE), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and _is_png(out)
    coarse = float(printed.split("IoU ")[1].split()[0])
    refined = float(printed.split("IoU ")[2].split()[0])
    assert 0.5 < coarse < 1 and 0.5 < refined <= 1
    assert f"figure written to {out}" in printed


def test_the_crf_improves_the_coarse_segmentation():
    image = demo.load_image(SIZE)
    reference = demo.reference_mask(image)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert 0.2 < reference.mean() < 0.8  # the stained tissue covers about half of the sample
    logits = demo.coarse_logits(reference)
    coarse = logits[1] > logits[0]
    refined, ms = demo.refine(logits, image, torch.device("cpu"))
    assert refined.shape == reference.shape and ms > 0
    assert demo.iou(refined, reference) > demo.iou(coarse, reference)


def test_figure_falls_back_to_pillow_then_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = demo.run_demo(tmp_path / "pil.png", "cpu", SIZE)
    if _importable("PIL"):
        assert result.writer == "Pillow" and _is_png(result.path)
    panels = [np.zeros((8, 8, 3), np.uint8)] * 3
    monkeypatch.setitem(sys.modules, "PIL", None)  # (scikit-image reads its sample images with Pillow: set after)
    with pytest.raises(ImportError, match="matplotlib"):
        demo.write_png(tmp_path / "none.png", panels, ["a", "b", "c"], "title")
    assert not (tmp_path / "none.png").exists()


def test_without_a_png_writer_the_numbers_are_still_reported(tmp_path, monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise ImportError("neither matplotlib nor Pillow is installed (pip install matplotlib)")

    monkeypatch.setattr(demo, "write_png", missing)
    assert demo.main(["--size", str(SIZE), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 1
    captured = capsys.readouterr()
    assert "IoU" in captured.out and "no PNG written: neither matplotlib nor Pillow" in captured.err


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_bad_arguments_are_refused(capsys):
    assert demo.main(["--size", "8"]) == 2
    assert "at least 32" in capsys.readouterr().err
