"""Lets `pytest benchmarks/` import fastseg from this source tree (an in-place build) without installing it;
an editable install (`pip install -e .`) resolves to the same directory."""

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
