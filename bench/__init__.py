"""citron's benchmark suite: ``python -m bench`` (``--quick`` for a smoke run).

Every figure is a ratio against a baseline measured in the same run, so that
a noisy machine moves both sides alike. See docs/benchmarks.md.
"""
