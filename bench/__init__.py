"""Benchmarks: the paper's serving workload with its baselines (serving.py), and the kernels'
(kernels.py)."""
