"""The wheel build matrix: for each flavour (cpu, cu126, cu128, cu130), each torch minor release >= the minimum
fastseg supports that PyTorch publishes for that flavour, and each Python 3.10-3.13 it has a wheel for.

    python scripts/wheel_matrix.py [--min-torch 2.6] [--flavours cpu,cu126,cu128,cu130] [--pythons 3.10,...]

prints {"include": [{"flavour": "cu128", "cuda": "12.8", "torch": "2.9.1", "python": "3.12"}, ...]} for a
GitHub Actions matrix. It reads PyTorch's own package index (download.pytorch.org/whl/<flavour>/torch/), so the
matrix follows what exists instead of a hand-kept table; the newest patch release of each minor is used (a
wheel built against 2.9.1 loads with any torch 2.9.x). `--html FILE` parses a saved index page instead (tests).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request

INDEX = "https://download.pytorch.org/whl/{flavour}/torch/"
FLAVOURS = ("cpu", "cu126", "cu128", "cu130")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def torch_wheels(html: str, flavour: str) -> dict[tuple[int, int], dict[str, tuple[int, int, int]]]:
    """{(major, minor): {python: newest (major, minor, patch)}} for the Linux x86_64 wheels of `flavour` listed
    in a PEP 503 page. Pre-releases and free-threaded builds (cp313t) are skipped."""
    pattern = re.compile(
        r"torch-(\d+)\.(\d+)\.(\d+)(?:%2B|\+)" + re.escape(flavour)
        + r"-cp(\d)(\d+)-cp\d+-(?:manylinux[^\"'#<]*x86_64)\.whl"
    )
    found: dict[tuple[int, int], dict[str, tuple[int, int, int]]] = {}
    for m in pattern.finditer(html):
        release = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        python = f"{m.group(4)}.{m.group(5)}"
        per_python = found.setdefault(release[:2], {})
        per_python[python] = max(per_python.get(python, release), release)
    return found


def cuda_of(flavour: str) -> str:
    """'cu128' -> '12.8', 'cpu' -> ''."""
    if flavour == "cpu":
        return ""
    digits = flavour[2:]
    return f"{int(digits[:-1])}.{digits[-1]}"


def matrix(pages: dict[str, str], min_torch: tuple[int, int], pythons) -> list[dict[str, str]]:
    rows = []
    for flavour, html in pages.items():
        for minor, per_python in sorted(torch_wheels(html, flavour).items()):
            if minor < min_torch:
                continue
            for python in pythons:
                if python in per_python:
                    release = ".".join(map(str, per_python[python]))
                    rows.append({"flavour": flavour, "cuda": cuda_of(flavour), "torch": release, "python": python})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-torch", default="2.6")
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--pythons", default=",".join(PYTHONS))
    parser.add_argument("--html", help="parse this saved index page (for one flavour) instead of fetching")
    args = parser.parse_args(argv)
    flavours = args.flavours.split(",")
    pages = {}
    for flavour in flavours:
        if args.html:
            with open(args.html) as f:
                pages[flavour] = f.read()
        else:
            with urllib.request.urlopen(INDEX.format(flavour=flavour), timeout=60) as response:
                pages[flavour] = response.read().decode()
    min_torch = tuple(int(p) for p in args.min_torch.split("."))[:2]
    rows = matrix(pages, min_torch, args.pythons.split(","))
    if not rows:
        print("wheel_matrix.py: no torch wheels found", file=sys.stderr)
        return 1
    print(json.dumps({"include": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
