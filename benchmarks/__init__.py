"""Benchmarks: run each as a module from the repository root, e.g. `python -m benchmarks.distill`.

Running a file directly would put this folder first on sys.path, where `kernels.py` shadows the
Hugging Face `kernels` package that transformers probes for.
"""
