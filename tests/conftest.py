"""Keeps our top-level folders from being importable by their bare names while tests run.

`python -m pytest` (and `python -c`, and a bare `python -m` in a subprocess) put the current
directory on `sys.path`; run from the repo root that makes `kernels/`, `worker/`, ...
importable as `kernels`, `worker`, ... and `kernels` is also a PyPI package that
transformers imports. Our code imports only `slora.<folder>`, so the root has no business on
`sys.path`: it is taken off before any test module is imported, and PYTHONSAFEPATH keeps it
off in every process a test starts. tests/test_layout.py fails if a bare import still finds
one of our folders.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ["PYTHONSAFEPATH"] = "1"
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
