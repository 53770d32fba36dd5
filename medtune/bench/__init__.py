"""Scout-shaped benchmarks on one GPU (random weights at real dimensions): training, generation, log-likelihood.

Run with ``python -m medtune.bench`` (see :mod:`medtune.bench.__main__`).
"""
